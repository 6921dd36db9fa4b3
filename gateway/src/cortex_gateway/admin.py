"""The admin API: usage reports, backend drains and the status page.

It is its own aiohttp application on its own listener (``admin_listen``,
loopback by default), never on the public one that nginx passes clients to:
a client that reaches the public site cannot reach it at all, whatever key it
holds. Every path but the status page's HTML needs an admin key.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from . import status
from .drains import DEFAULT_SECONDS, MAX_SECONDS
from .errors import Handler, error_response, errors_middleware, json_object
from .usage import day_start, to_csv

if TYPE_CHECKING:
    from .auth import KeyRing
    from .backends import Backend
    from .config import GatewayConfig
    from .drains import DrainBook
    from .metrics import Metrics
    from .usage import UsageRecorder


class AdminState(Protocol):
    """What the admin API reads and changes of the gateway (app.Gateway owns it)."""

    admin_keyring: KeyRing
    backends: list[Backend]
    config: GatewayConfig
    drains: DrainBook
    keyring: KeyRing
    metrics: Metrics
    started: float
    usage: UsageRecorder | None

    async def sync_drains(self, until: dict[str, float]) -> None: ...


log = logging.getLogger(__name__)

# The status page's HTML holds no data: it asks for an admin key and sends it
# with each request for /admin/status.json, which the admin check guards.
STATUS_PAGE = "/admin/status"
# The page runs only its own script and talks only to this listener.
STATUS_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"
)
# The longest an admin request waits for a drain to settle.
MAX_WAIT_SECONDS = 3600
# Admin requests are small JSON bodies.
MAX_BODY_BYTES = 64 * 1024


class AdminApi:
    """The admin handlers, over the state one Gateway owns."""

    def __init__(self, gateway: AdminState) -> None:
        self.gateway = gateway

    def build_app(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_BODY_BYTES,
            middlewares=[errors_middleware(lambda: MAX_BODY_BYTES), self._auth_middleware],
        )
        app.router.add_get("/admin/usage", self.usage_page)
        app.router.add_get("/admin/backends", self.list_backends)
        app.router.add_post("/admin/backends/drain", self.drain_backend)
        app.router.add_post("/admin/backends/undrain", self.undrain_backend)
        app.router.add_get(STATUS_PAGE, self.status_page)
        app.router.add_get(STATUS_PAGE + ".json", self.status_json)
        return app

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == STATUS_PAGE:
            return await handler(request)
        authorization = request.headers.get("Authorization")
        if self.gateway.admin_keyring.identify(authorization) is not None:
            return await handler(request)
        if self.gateway.keyring.identify(authorization) is not None:
            return error_response(403, "this key may not use the admin endpoints", code="admin_key_required")
        return error_response(401, "missing or invalid admin key", code="invalid_api_key")

    async def usage_page(self, request: web.Request) -> web.Response:
        """Usage by key, model and day: ?group_by=key,model,day&since=2026-11-01&format=csv"""
        usage = self.gateway.usage
        if usage is None:
            return error_response(404, "this gateway keeps no usage records (usage is not configured)")
        group_by = [g for g in request.query.get("group_by", "key,model,day").split(",") if g]
        try:
            since = day_start(request.query.get("since"))
            rows = await asyncio.to_thread(usage.store.report, group_by, since)
        except ValueError as exc:
            return error_response(400, str(exc), param="group_by" if "group" in str(exc) else "since")
        if request.query.get("format") == "csv":
            return web.Response(text=to_csv(rows), content_type="text/csv")
        return web.json_response({"object": "list", "data": rows})

    async def list_backends(self, _request: web.Request) -> web.Response:
        """Every backend as the whole gateway sees it (all workers), for operators and playbooks."""
        data = self._rows()
        return web.json_response({"object": "list", "data": data}, headers={"Cache-Control": "no-store"})

    async def drain_backend(self, request: web.Request) -> web.Response:
        """{"backend": URL or host:port, "seconds": how long at most, "wait": seconds}:
        no new requests for it; with "wait", answers once none is in flight."""
        parsed = await _drain_request(request, with_seconds=True)
        if isinstance(parsed, web.Response):
            return parsed
        name, seconds, wait = parsed
        return await self._set_drain(name, time.time() + seconds, wait)

    async def undrain_backend(self, request: web.Request) -> web.Response:
        """{"backend": URL or host:port, "wait": seconds}: back in rotation once
        its health check passes; with "wait", answers once every worker routes to it."""
        parsed = await _drain_request(request, with_seconds=False)
        if isinstance(parsed, web.Response):
            return parsed
        name, _seconds, wait = parsed
        return await self._set_drain(name, None, wait)

    def _rows(self) -> list[dict]:
        gateway = self.gateway
        return status.backend_rows(gateway.backends, gateway.metrics.collect_registry())

    async def _set_drain(self, name: str, until: float | None, wait: float) -> web.Response:
        gateway = self.gateway
        matching = {b.url for b in gateway.backends if name in (b.url, b.name)}
        if not matching:
            message = f"no backend '{name}' in this gateway's config"
            return error_response(404, message, code="backend_not_found", param="backend")
        for url in matching:
            current = await asyncio.to_thread(gateway.drains.set, url, until)
        await gateway.sync_drains(current)
        if gateway.drains.shared:
            os.kill(os.getppid(), signal.SIGUSR1)  # the supervisor tells every worker
        log.info("backend %s %s", name, "drained" if until else "back in rotation")

        def settled(row: dict) -> bool:
            # Drained: every worker drains it and nothing runs on it. Back: every worker routes to it.
            return row["draining"] and row["in_flight"] == 0 if until else row["ready"]

        def rows() -> list[dict]:
            return [row for row in self._rows() if row["url"] in matching]

        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        current = rows()
        # What a drain waits for: the requests in flight as it began.
        at_drain = sum(int(row["in_flight"]) for row in current)
        while not (done := all(settled(row) for row in current)) and loop.time() < deadline:
            # Other workers' gauges are at most a second old (their refresh interval).
            await asyncio.sleep(0.2)
            current = rows()
        answer: dict[str, object] = {"object": "list", "data": current, "settled": done}
        if until is not None:
            answer["in_flight_at_drain"] = at_drain
        return web.json_response(answer)

    async def status_page(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=status.page(),
            content_type="text/html",
            headers={"Cache-Control": "no-store", "Content-Security-Policy": STATUS_CSP},
        )

    async def status_json(self, _request: web.Request) -> web.Response:
        gateway = self.gateway
        last_minute = errors = None
        if gateway.usage is not None:
            now = time.time()
            try:
                last_minute = await asyncio.to_thread(
                    gateway.usage.store.report, ["model"], now - status.WINDOW_SECONDS
                )
                errors = await asyncio.to_thread(
                    gateway.usage.store.recent_errors, now - 3600, status.RECENT_ERRORS
                )
            except Exception as exc:  # noqa: BLE001 - the page still shows live state
                log.warning("status page: cannot read the usage records: %s", exc)
        data = status.snapshot(
            gateway.config,
            gateway.backends,
            gateway.metrics.collect_registry(),
            last_minute,
            errors,
            gateway.started,
        )
        return web.json_response(data, headers={"Cache-Control": "no-store"})


def admin_listener(
    admin: AdminApi, host: str, port: int, *, reuse_port: bool
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context for the public app that serves the admin app on its
    own address while the public one runs (started after the gateway's own
    contexts, stopped before them)."""

    async def context(_app: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(admin.build_app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
            yield
        finally:
            await runner.cleanup()

    return context


async def _drain_request(
    request: web.Request, *, with_seconds: bool
) -> tuple[str, float, float] | web.Response:
    """The backend, the drain's length and how long to wait, from an admin request's JSON body."""
    payload = json_object(await request.read())
    if isinstance(payload, web.Response):
        return payload
    name = payload.get("backend")
    if not isinstance(name, str) or not name:
        return error_response(400, "'backend' is required: a backend's URL or host:port", param="backend")
    wait = _seconds_field(payload, "wait", 0, MAX_WAIT_SECONDS, zero_allowed=True)
    if isinstance(wait, web.Response):
        return wait
    seconds = 0.0
    if with_seconds:
        seconds = _seconds_field(payload, "seconds", DEFAULT_SECONDS, MAX_SECONDS, zero_allowed=False)
        if isinstance(seconds, web.Response):
            return seconds
    return name, seconds, wait


def _seconds_field(
    payload: dict, field_name: str, default: float, most: float, *, zero_allowed: bool
) -> float | web.Response:
    """A number of seconds from 0 (or above 0) to ``most``, or the 400 that names the field."""
    value = payload.get(field_name, default)
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    # Written so that NaN (which json.loads accepts) fails every comparison and is refused.
    if not is_number or not 0 <= value <= most or (value == 0 and not zero_allowed):
        bounds = f"from 0 to {most:g}" if zero_allowed else f"above 0 and at most {most:g}"
        return error_response(400, f"'{field_name}' must be a number of seconds {bounds}", param=field_name)
    return float(value)
