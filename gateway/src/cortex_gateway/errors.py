"""Errors in the shape OpenAI's API and its clients expect."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

# The `type` field OpenAI uses for each status class we answer with.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> dict[str, object]:
    error_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.json_response(
        error_body(status, message, code=code, param=param), status=status, headers=headers
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def errors_middleware(max_body_bytes: Callable[[], int]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Every error leaves in OpenAI's shape, whatever raised it (for each of the gateway's apps)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                413, f"request body is larger than {max_body_bytes()} bytes", code="request_too_large"
            )
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            allow = exc.headers.get("Allow")
            return error_response(
                exc.status, exc.reason or "error", headers={"Allow": allow} if allow else None
            )

    return middleware


def json_object(body: bytes) -> dict | web.Response:
    """A request body that must be a JSON object, or the 400 that says why not."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return error_response(400, f"request body is not valid JSON: {exc}", code="invalid_json")
    if not isinstance(payload, dict):
        return error_response(400, "request body must be a JSON object", code="invalid_json")
    return payload
