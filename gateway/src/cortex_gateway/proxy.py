"""Forwarding a request to one backend, and relaying its answer.

The client's body bytes go upstream untouched; a streamed answer is relayed
chunk by chunk as it arrives, never held whole in memory.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable

import aiohttp
from aiohttp import web

from .backends import Backend
from .breaker import Failure
from .config import Timeouts
from .errors import error_body

# The upstream status after which another replica may still be tried: the
# engine says it did not take the request (llama-server while it loads its
# model, an engine out of room), so nothing ran. It counts against the
# engine's circuit breaker. Every other status is the request's answer and
# goes to the client as it is: a 500 that one request causes is that
# request's error, not the replica's, and is never sent to another replica.
RETRYABLE_STATUSES = frozenset({503})


class UpstreamUnavailable(Exception):
    """The backend could not be reached or would not answer.

    ``reached`` says the engine may have the request (it was written, and no
    answer came within the first-byte bound, or the connection broke after
    it was written): such a request is answered, never sent to another
    replica, where it would run a second time. Otherwise nothing reached the
    engine (no connection, or the engine refused it with a 503).
    """

    def __init__(
        self, message: str, kind: Failure, retry_after: float | None = None, *, reached: bool = False
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after
        self.reached = reached


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: the breaker's own cooldown applies


@functools.lru_cache(maxsize=64)
def _connect_only(connect: float) -> aiohttp.ClientTimeout:
    """The client timeout of an upstream call (a few distinct values: one per model's timeouts)."""
    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=None)


async def open_upstream(
    session: aiohttp.ClientSession,
    backend: Backend,
    path: str,
    body: bytes,
    timeouts: Timeouts,
) -> aiohttp.ClientResponse:
    """POST the body to the backend and wait for its status line and headers."""
    headers = {"Content-Type": "application/json"}
    if backend.api_key:
        headers["Authorization"] = f"Bearer {backend.api_key}"
    # sock_read stays off here: until the first byte, first_byte is the bound.
    timeout = _connect_only(timeouts.connect)
    try:
        async with asyncio.timeout(timeouts.first_byte):
            try:
                upstream = await session.post(backend.url + path, data=body, headers=headers, timeout=timeout)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if isinstance(exc, aiohttp.ClientConnectorError):
                    raise  # no connection at all: refused, not stale
                # A pooled connection the engine had closed or reset while it
                # sat idle (or an engine container replaced under it): the
                # request never got through, so send it once more.
                upstream = await session.post(backend.url + path, data=body, headers=headers, timeout=timeout)
    except aiohttp.ConnectionTimeoutError as exc:
        # No connection within the connect bound: nothing was sent.
        raise UpstreamUnavailable(f"no connection within {timeouts.connect:g}s", Failure.TIMEOUT) from exc
    except TimeoutError as exc:
        raise UpstreamUnavailable(
            f"no answer within {timeouts.first_byte:g}s", Failure.TIMEOUT, reached=True
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamUnavailable(str(exc) or type(exc).__name__, Failure.REFUSED) from exc
    except aiohttp.ClientError as exc:
        # The request was written (twice, the second time on a new
        # connection) and the connection broke before an answer.
        raise UpstreamUnavailable(str(exc) or type(exc).__name__, Failure.REFUSED, reached=True) from exc
    if upstream.status in RETRYABLE_STATUSES:
        retry_after = _retry_after(upstream.headers.get("Retry-After"))
        upstream.release()
        raise UpstreamUnavailable(f"answered {upstream.status}", Failure.STATUS, retry_after)
    return upstream


class UpstreamAnswerError(Exception):
    """The answer's headers came, but its body could not be relayed."""

    def __init__(self, message: str, code: str, engine_fault: bool) -> None:
        super().__init__(message)
        self.code = code
        # A broken answer is the engine's fault; a larger one than the gateway holds is not.
        self.engine_fault = engine_fault


def _too_large(max_bytes: int) -> UpstreamAnswerError:
    return UpstreamAnswerError(
        f"the model server's answer is larger than the {max_bytes} bytes this gateway relays "
        "(limits.max_answer_bytes); ask for a stream",
        "upstream_answer_too_large",
        engine_fault=False,
    )


async def relay_whole(upstream: aiohttp.ClientResponse, idle: float, max_bytes: int) -> web.Response:
    """Relay a non-streamed answer: status, content type and bytes as they are,
    read within ``idle`` seconds and never more than ``max_bytes``."""
    try:
        if (upstream.content_length or 0) > max_bytes:
            raise _too_large(max_bytes)
        parts: list[bytes] = []
        size = 0
        async with asyncio.timeout(idle):
            async for part in upstream.content.iter_any():
                size += len(part)
                if size > max_bytes:
                    raise _too_large(max_bytes)
                parts.append(part)
        payload = b"".join(parts)
    except TimeoutError as exc:
        upstream.close()
        raise UpstreamAnswerError(
            f"the model server's answer did not arrive whole within {idle:g}s",
            "upstream_answer_broken",
            engine_fault=True,
        ) from exc
    except aiohttp.ClientError as exc:
        upstream.close()
        raise UpstreamAnswerError(
            f"the model server broke off its answer: {exc or type(exc).__name__}",
            "upstream_answer_broken",
            engine_fault=True,
        ) from exc
    except (UpstreamAnswerError, asyncio.CancelledError):
        # The rest is not read (an answer too large, or a client that left):
        # closing the connection also stops the engine's generation.
        upstream.close()
        raise
    upstream.release()
    return web.Response(
        status=upstream.status,
        body=payload,
        content_type=upstream.content_type,
        charset=upstream.charset,
    )


class ClientGone(Exception):
    """The client closed its connection before the stream ended."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("the client closed the connection mid-stream")
        self.response = response


# An event this large without its end is no event an engine sends.
MAX_EVENT_BYTES = 1 << 20


def _events_end(data: bytes) -> int:
    """Where the last whole server-sent event in ``data`` ends (0: none yet)."""
    return max(data.rfind(b"\n\n") + 2 if b"\n\n" in data else 0,
               data.rfind(b"\r\n\r\n") + 4 if b"\r\n\r\n" in data else 0)  # fmt: skip


async def _relay_events(
    response: web.StreamResponse,
    data: bytes,
    tap: Callable[[bytes], None] | None,
    transform: Callable[[bytes], bytes] | None,
) -> None:
    # Seen first: what the engine sent counts even if the write is cut short.
    if tap is not None:
        tap(data)
    out = data if transform is None else transform(data)
    if out:
        await response.write(out)


def sse_error_event(message: str) -> bytes:
    body = error_body(502, message, code="upstream_stream_broken")
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def relay_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    idle: float,
    *,
    headers: dict[str, str] | None = None,
    tap: Callable[[bytes], None] | None = None,
    transform: Callable[[bytes], bytes] | None = None,
    on_cut: Callable[[], None] | None = None,
) -> web.StreamResponse:
    """Relay server-sent events as they arrive, each one whole.

    A stream that breaks midway, or sends no whole event for ``idle`` seconds,
    ends with an SSE error event (and no [DONE]), so the client sees an error
    rather than a hang or a silent cut; ``on_cut`` is then told (the engine's
    fault, counted against it). ``transform`` takes whole events and returns
    what the client gets of them; ``tap`` sees the events as the engine sent
    them, before they are written (timing, usage).
    """
    response = web.StreamResponse(
        status=upstream.status,
        headers={
            "Content-Type": upstream.headers.get("Content-Type", "text/event-stream"),
            "Cache-Control": "no-cache",
            # nginx must not buffer a stream, whatever its site config says.
            "X-Accel-Buffering": "no",
            **(headers or {}),
        },
    )
    await response.prepare(request)
    completed = client_gone = cut = False
    # Events go out whole. The idle bound counts whole events, not bytes: an
    # engine that trickles a byte now and then never completes one, and is
    # cut like an engine that has stopped; and an error event never lands in
    # the middle of a half-sent one, where a client could not parse either.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + idle
    pending = b""
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await upstream.content.readany()
            except TimeoutError:
                cut = True
                await response.write(
                    sse_error_event(f"the model server sent no complete event for {idle:g}s")
                )
                break
            except aiohttp.ClientError as exc:
                cut = True
                await response.write(sse_error_event(f"the model server broke off the stream: {exc}"))
                break
            if not chunk:
                if pending:  # the last event, without its blank line
                    await _relay_events(response, pending, tap, transform)
                completed = True
                break
            pending += chunk
            end = _events_end(pending)
            if end:
                await _relay_events(response, pending[:end], tap, transform)
                pending = pending[end:]
                deadline = loop.time() + idle
            if len(pending) > MAX_EVENT_BYTES:
                cut = True
                await response.write(
                    sse_error_event(f"the model server sent an event over {MAX_EVENT_BYTES} bytes")
                )
                break
        # Ended properly even after an error event: a proxy in between (nginx)
        # drops what came in the same read as a broken chunked body, and the
        # client would get the cut without the event that says why.
        await response.write_eof()
    except ConnectionResetError:
        # The client hung up: nobody is left to tell. Not an error of ours.
        completed, client_gone = False, True
    finally:
        # Closing (not releasing) an unfinished upstream aborts the
        # generation on the engine instead of letting it run for nobody.
        if completed:
            upstream.release()
        else:
            upstream.close()
    if cut and on_cut is not None:
        on_cut()
    if client_gone:
        raise ClientGone(response)
    return response
