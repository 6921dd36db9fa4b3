"""On-demand models: what the gateway knows of pools (llama-server in router
mode, several models loaded when asked for).

A model that is not loaded is not dead. llama-server's router loads a model
when a request names it, queues the requests that arrive while it loads, and
makes room by unloading the least recently used idle model; the gateway
leaves the loading to it (one queue per pool, whatever the number of
gateways) and adds what it cannot know:

- the wait for a load is bounded by the model's load timeout: a request
  whose model is still not loaded then is answered 503, naming the model;
- while a request waits for its model's load in a full pool, new requests for
  the pool's loaded models wait in the gateway: the loaded ones go idle, the
  router can make room, and a busy model cannot starve one that waits;
- ``/v1/models`` says each model's state, read from the router's ``/models``;
- loads, their seconds and evictions (a model seen going from loaded to
  unloaded) are counted in the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from .backends import Backend
from .errors import error_response

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

# States of a model in a router (llama-server's own words), and those in
# which a request is served without a load the gateway must wait for: a
# sleeping model's process is there and wakes on the request.
LOADED = "loaded"
SERVING_STATES = frozenset({LOADED, "sleeping"})
RESIDENT_STATES = frozenset({LOADED, "loading", "sleeping"})
# Every state, most ready first (/v1/models names the best of a model's backends).
LOAD_STATES = (LOADED, "sleeping", "loading", "unloaded", "failed")
# How often a load in progress is looked at.
POLL_SECONDS = 0.25
# The router's answers that need a look at their body (pools.send): what it
# says when it never ran a request, and when the model's process failed.
ROUTER_ERROR_STATUSES = frozenset({400, 500})
NEVER_RAN_MARKS = (b"is not running", b"proxy error: Could not establish connection")
# The router's proxy thread failing on the model's process (its words, as
# plain text): lost to a swap when the model then reads unloaded.
PROXY_ERROR_MARK = b"proxy error:"
# How often one request is sent again after its model's process went away
# under it: a request that itself kills the process is not sent for ever.
SWAP_RESENDS = 2
FAILED_LOAD_MARK = b"failed to load"
# The most of a router's error answer that is read to tell which it is.
ROUTER_ERROR_BYTES = 64 * 1024


async def _small_body(answer: aiohttp.ClientResponse) -> bytes:
    """An error answer's body, at most ROUTER_ERROR_BYTES of it."""
    try:
        body = await answer.content.read(ROUTER_ERROR_BYTES)
    except aiohttp.ClientError:
        body = b""
    finally:
        answer.close()
    return body


def _router_error(status: int, body: bytes, backend: Backend) -> web.Response:
    """A router's error answer for the client: its own OpenAI-style error as
    it is; anything else (its proxy thread's plain words, sent as JSON) a 502
    that names the model and quotes them."""
    with contextlib.suppress(ValueError):
        answer = json.loads(body)
        error = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return web.Response(status=status, body=body, content_type="application/json")
    words = body.decode("utf-8", "replace").strip()[:300] or f"status {status} and no body"
    message = f"the model server for '{backend.model}' on {backend.name} failed: {words}"
    return error_response(502, message, code="upstream_error")


class LoadError(Exception):
    """A model could not be loaded in time; the message says which and why."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(slots=True)
class _Pool:
    """One router (by URL): its models' backends and the loads under way."""

    url: str
    api_key: str | None
    backends: dict[str, Backend] = field(default_factory=dict)
    max_resident: int = 1
    # Per model: requests sent there that wait for its load, and when the
    # first of them was sent (the load's start, for its seconds).
    waiters: dict[str, int] = field(default_factory=dict)
    load_started: dict[str, float] = field(default_factory=dict)
    # Set whenever a wait for a load ends: held requests look again.
    turns: asyncio.Event = field(default_factory=asyncio.Event)
    refreshing: asyncio.Future[bool] | None = None
    refreshed: float = float("-inf")

    def resident(self) -> int:
        return sum(1 for b in self.backends.values() if b.load_state in RESIDENT_STATES)


class PoolTracker:
    """Every pool of the gateway's config, by router URL."""

    def __init__(
        self,
        backends: Iterable[Backend],
        metrics: Metrics,
        clock: Callable[[], float],
        session: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._session = session
        self._pools: dict[str, _Pool] = {}
        self.replace_backends(backends)

    def replace_backends(self, backends: Iterable[Backend]) -> None:
        """Track these backends (after a reload)."""
        pools: dict[str, _Pool] = {}
        for backend in backends:
            if backend.pool is None:
                continue
            pool = pools.get(backend.url)
            if pool is None:
                old = self._pools.get(backend.url)
                # Kept across a reload: its waiters and their loads go on.
                pool = pools[backend.url] = old if old is not None else _Pool(backend.url, backend.api_key)
                pool.api_key = backend.api_key
                pool.backends = {}
            pool.backends[backend.model] = backend
            pool.max_resident = max(1, backend.max_resident)
        self._pools = pools

    def pool_of(self, backend: Backend) -> _Pool | None:
        return self._pools.get(backend.url) if backend.pool is not None else None

    # --- what the routers say ----------------------------------------------

    async def refresh(self, pool: _Pool) -> bool:
        """Read the router's model states into its backends; False when it did not answer."""
        headers = {"Authorization": f"Bearer {pool.api_key}"} if pool.api_key else {}
        try:
            async with self._session().get(
                pool.url + "/models", headers=headers, timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                if resp.status != 200:
                    return False
                listing = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
        states: dict[str, str] = {}
        for entry in listing.get("data") or [] if isinstance(listing, dict) else []:
            if isinstance(entry, dict) and isinstance(entry.get("status"), dict):
                states[str(entry.get("id"))] = str(entry["status"].get("value"))
                if entry["status"].get("failed"):
                    states[str(entry.get("id"))] = "failed"
        for model, backend in pool.backends.items():
            self._set_state(backend, states.get(model, "unknown"))
        pool.refreshed = self._clock()
        return True

    async def refresh_all(self) -> None:
        await asyncio.gather(*(self.refresh(p) for p in self._pools.values()))

    def _set_state(self, backend: Backend, state: str) -> None:
        before = backend.load_state
        if state == before:
            return
        backend.load_state = state
        log.info("model %s on %s is now %s", backend.model, backend.name, state)
        # Gone from memory without the gateway asking for another of its models
        # to be loaded there: llama-server made room for a load, or an operator unloaded it.
        if before in SERVING_STATES and state in ("unloaded", "failed"):
            self._metrics.evictions.labels(backend.model, backend.name).inc()

    # --- loads ---------------------------------------------------------------

    def waiting_for_load(self, backend: Backend) -> bool:
        """Whether a request sent there now would wait for a load."""
        return backend.pool is not None and backend.load_state not in SERVING_STATES

    async def wait_turn(self, backend: Backend, load_timeout: float) -> None:
        """Before a request for a loaded model of a full pool goes on: while a
        request for another of its models waits for that one's load, wait
        (at most ``load_timeout``): this model goes idle and the router can
        make room."""
        pool = self.pool_of(backend)
        if pool is None:
            return
        # A fresh look (shared by the requests of a burst): another gateway,
        # or another worker, may have made the router load or unload since.
        await self._refresh_soon(pool)
        if self.waiting_for_load(backend):
            return
        deadline = self._clock() + load_timeout
        while (
            any(n for m, n in pool.waiters.items() if m != backend.model)
            and pool.resident() >= pool.max_resident
            and self._clock() < deadline
        ):
            pool.turns.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(POLL_SECONDS, max(deadline - self._clock(), 0.0))):
                    await pool.turns.wait()

    async def send(
        self,
        backend: Backend,
        request: Callable[[], Awaitable[aiohttp.ClientResponse]],
        load_timeout: float,
    ) -> aiohttp.ClientResponse | web.Response:
        """Send a request (``request()`` sends it once) to ``backend``; on a
        pool, watch the load it may wait for (``while_loading``) and send it
        again when the router answers that it never ran it.

        A router that swaps models can lose the race between its load and
        its proxying: the model it loaded is unloaded again for another
        model's load before the request reaches its process. It then answers
        400 "is not running", or 500 "proxy error: Could not establish
        connection" (the process was gone). Neither request ran, so it goes
        to the router again (its model is loaded again) until its load
        timeout. A router's other errors are the request's answer (read
        whole here, since its body was looked at).
        """
        if backend.pool is None:
            return await request()
        deadline = self._clock() + load_timeout
        resends_left = SWAP_RESENDS
        while True:
            answer = await self.while_loading(backend, request, load_timeout)
            if answer.status not in ROUTER_ERROR_STATUSES:
                return answer
            body = await _small_body(answer)
            if FAILED_LOAD_MARK in body:
                pool = self.pool_of(backend)
                if pool is not None:
                    await self.refresh(pool)
                if backend.load_state == "failed":
                    model = backend.model
                    if pool is not None and pool.load_started.pop(model, None) is not None:
                        self._metrics.loads.labels(model, backend.name, "failed").inc()
                    raise LoadError(
                        f"model '{model}' failed to load on {backend.name} (its process exited)", 30
                    )
            lost = any(mark in body for mark in NEVER_RAN_MARKS)
            if not lost and body.startswith(PROXY_ERROR_MARK) and resends_left:
                # The process went away under the request: lost to a swap
                # when the router now has the model unloaded (it stopped it
                # for another model's load); a process that broke off while
                # loaded may have run it, and its answer is a 502.
                resends_left -= 1
                lost = await self._unloaded_now(backend)
            if not lost or self._clock() >= deadline:
                return _router_error(answer.status, body, backend)
            log.info(
                "model %s on %s: the router unloaded it before running the request; sending it again",
                backend.model, backend.name,
            )  # fmt: skip
            self._set_state(backend, "unloaded")
            await asyncio.sleep(POLL_SECONDS / 5)

    async def _unloaded_now(self, backend: Backend) -> bool:
        """Whether the router lists ``backend``'s model as not loaded now (a fresh look)."""
        pool = self.pool_of(backend)
        return pool is not None and await self.refresh(pool) and backend.load_state not in SERVING_STATES

    async def while_loading(
        self,
        backend: Backend,
        request: Callable[[], Awaitable[aiohttp.ClientResponse]],
        load_timeout: float,
    ) -> aiohttp.ClientResponse:
        """Send ``request()`` (a request to a pool whose model is not loaded)
        while watching the load: LoadError when the model has not loaded
        within ``load_timeout`` or its process failed."""
        pool = self.pool_of(backend)
        if pool is not None:
            await self._refresh_soon(pool)
        if pool is None or not self.waiting_for_load(backend):
            return await request()
        model = backend.model
        pool.waiters[model] = pool.waiters.get(model, 0) + 1
        pool.load_started.setdefault(model, self._clock())
        sent = asyncio.ensure_future(request())
        watch = asyncio.create_task(self._watch(pool, backend, self._clock() + load_timeout, load_timeout))
        try:
            done, _pending = await asyncio.wait({sent, watch}, return_when=asyncio.FIRST_COMPLETED)
            if sent not in done:
                error = watch.exception()
                if error is not None:
                    sent.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await sent
                    raise error
            answer = await sent
            if answer.status not in ROUTER_ERROR_STATUSES:
                # Answered: the model was loaded, whether or not a look saw it first.
                self._loaded(pool, backend)
            return answer
        finally:
            watch.cancel()
            if not sent.done():
                sent.cancel()  # the client went away: so does its upstream request
            pool.waiters[model] -= 1
            if not pool.waiters[model]:
                del pool.waiters[model]
            pool.turns.set()

    async def _watch(self, pool: _Pool, backend: Backend, deadline: float, load_timeout: float) -> None:
        """Return once the model is loaded there; raise LoadError at the deadline or on a failed load."""
        model = backend.model
        saw_loading = False
        while True:
            await self._refresh_soon(pool)
            state = backend.load_state
            if state in SERVING_STATES:
                self._loaded(pool, backend)
                return
            saw_loading = saw_loading or state == "loading"
            if state == "failed" and saw_loading:
                if pool.load_started.pop(model, None) is not None:
                    self._metrics.loads.labels(model, backend.name, "failed").inc()
                raise LoadError(f"model '{model}' failed to load on {backend.name} (its process exited)", 30)
            if self._clock() >= deadline:
                if pool.load_started.pop(model, None) is not None:
                    self._metrics.loads.labels(model, backend.name, "timeout").inc()
                raise LoadError(f"model '{model}' did not finish loading within {load_timeout:g} s", 5)
            await asyncio.sleep(POLL_SECONDS)

    def _loaded(self, pool: _Pool, backend: Backend) -> None:
        """Count the load the model's waiting requests saw end (once)."""
        self._set_state(backend, LOADED)  # known now, before the next look
        started = pool.load_started.pop(backend.model, None)
        if started is None:
            return
        seconds = self._clock() - started
        self._metrics.loads.labels(backend.model, backend.name, "loaded").inc()
        self._metrics.load_seconds.labels(backend.model).observe(seconds)
        log.info("model %s loaded on %s in %.1f s", backend.model, backend.name, seconds)

    async def _refresh_soon(self, pool: _Pool) -> None:
        """One look at the router for every request watching a load there."""
        if pool.refreshing is None or pool.refreshing.done():
            if self._clock() - pool.refreshed < POLL_SECONDS / 2:
                return
            pool.refreshing = asyncio.ensure_future(self.refresh(pool))
        await asyncio.shield(pool.refreshing)
