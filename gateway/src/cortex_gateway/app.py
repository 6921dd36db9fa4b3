"""The gateway: one object that owns all state (config, backends, drains,
reload, lifecycle) and composes the request path (forwarding.py) and the
admin API (admin.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from . import __version__
from .affinity import PrefixIndex
from .auth import KeyRing
from .backends import Backend, HealthMonitor
from .config import RESTART_FIELDS, ConfigError, GatewayConfig, load_config
from .drains import DrainBook
from .errors import Handler, error_response, errors_middleware
from .forwarding import KEY_NAME, Forwarder
from .limits import CounterTable, Limiter
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .pools import PoolTracker
from .predict import Predictor
from .queueing import FlowBoard
from .routing import Router
from .slots import SlotTable
from .usage import UsageRecorder, store_for

log = logging.getLogger(__name__)

# Open without a key: liveness for nginx and the health timers, and metrics
# for Prometheus (the gateway listens on loopback or the internal address;
# the nginx site does not pass /metrics on). The admin API is not here at
# all: it has its own listener (admin.py).
PUBLIC_PATHS = frozenset({"/healthz", "/metrics"})


class Gateway:
    """Owns the configuration, the backends, the router and the HTTP client."""

    def __init__(
        self,
        config: GatewayConfig,
        config_path: str | None = None,
        limits_table: CounterTable | None = None,
        drains_path: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        prefix_index_path: str | None = None,
        early_hangup: Callable[[], bool] | None = None,
        slot_table: SlotTable | None = None,
    ) -> None:
        self.config = config
        # Whether a SIGHUP came before the app listened for it (a worker's start).
        self._early_hangup = early_hangup
        # What the request path reads its times from (tests give their own).
        self.clock = clock
        self.config_path = config_path
        self.keyring = KeyRing(config.api_keys)
        self.admin_keyring = KeyRing(config.admin_keys)
        # Worker processes pass the table they share; alone, the gateway makes its own.
        self.limiter = Limiter(dict(config.key_policies), limits_table)
        self.usage: UsageRecorder | None = None
        self.backends = [
            Backend.from_config(model, backend, config.breaker)
            for model in config.models.values()
            for backend in model.backends
        ]
        # Worker processes count engine slots in one shared table (slots.py).
        self.slots = slot_table
        self._share_slots(self.backends)
        # The queues' shared counts (queueing.py), in the same table.
        self.flow_board = FlowBoard(slot_table)
        # Each replica's learnt latencies (predicted_ttft routing), in the same table.
        self.predictor = Predictor(slot_table)
        self.router = Router(self.backends)
        # Prefix affinity: its settings as started (the index is sized by them),
        # and the index, in a file the workers share or, alone, a private one.
        self.affinity = config.affinity
        self.prefix_index = PrefixIndex(prefix_index_path, config.affinity.index_entries)
        # Worker processes share one drains file; alone, the gateway keeps them in memory.
        self.drains = DrainBook(drains_path)
        self.started = time.time()
        self._session: aiohttp.ClientSession | None = None
        self._monitor: HealthMonitor | None = None
        self.forwarder = Forwarder(self)
        self.metrics = Metrics(
            lambda: self.backends,
            lambda: {m: a.waiting_by_class() for m, a in self.forwarder.admissions.items()},
            lambda: self.usage.buffered if self.usage is not None else 0,
        )
        # What the gateway knows of on-demand models' loads (pools.py).
        self.pools = PoolTracker(self.backends, self.metrics, self.clock, lambda: self.session)
        self._reloading = asyncio.Lock()

    # --- configuration reload ----------------------------------------------

    def apply_config(self, config: GatewayConfig) -> list[Backend]:
        """Switch to a new config between two requests; returns the new backends.

        A backend that stays (same model and URL) keeps its object, so its
        health and outstanding requests carry over; requests in flight finish
        on the backend they started on, whatever the new config says.
        """
        kept = {(b.model, b.url): b for b in self.backends}
        backends: list[Backend] = []
        added: list[Backend] = []
        for model in config.models.values():
            for backend_config in model.backends:
                backend = kept.get((model.name, backend_config.url))
                if backend is None:
                    backend = Backend.from_config(model, backend_config, config.breaker)
                    self._share_slots([backend])
                    added.append(backend)
                else:
                    backend.engine = model.engine
                    backend.api_key = backend_config.api_key
                    backend.max_concurrency = backend_config.max_concurrency
                    backend.pool = backend_config.pool
                    backend.max_resident = backend_config.max_resident
                    backend.health_probe = model.health_probe
                backends.append(backend)
        for field_name in RESTART_FIELDS:
            if getattr(config, field_name) != getattr(self.config, field_name):
                log.warning("config reload: %s changed; it takes effect at the next restart", field_name)
        self.config = config
        self.keyring = KeyRing(config.api_keys)
        self.admin_keyring = KeyRing(config.admin_keys)
        self.limiter.policies = dict(config.key_policies)  # counts carry over
        self.backends = backends
        self.router = Router(backends)
        self.pools.replace_backends(backends)
        self._apply_drains(self.drains.current())
        if self._monitor is not None:
            self._monitor.replace_backends(backends)
        return added

    def _share_slots(self, backends: list[Backend]) -> None:
        if self.slots is not None:
            for backend in backends:
                backend.slot_table = self.slots
                backend.slot_column = self.slots.column(backend.model, backend.url)

    # --- drains --------------------------------------------------------------

    def _apply_drains(self, until: dict[str, float]) -> list[Backend]:
        """Set each backend's drain from the book; returns those whose drain ended."""
        ended = []
        for backend in self.backends:
            drain_until = until.get(backend.url)
            if backend.drain_until is not None and drain_until is None:
                ended.append(backend)
            backend.drain_until = drain_until
        return ended

    async def sync_drains(self, until: dict[str, float]) -> None:
        ended = self._apply_drains(until)
        if ended and self._monitor is not None:
            # Back in rotation as soon as it answers, not at the next poll.
            await self._monitor.check_all(ended)

    def _on_drains_changed(self) -> None:
        """SIGUSR1: another worker changed the drains file."""

        async def reread() -> None:
            await self.sync_drains(await asyncio.to_thread(self.drains.load))

        asyncio.get_running_loop().create_task(reread(), name="drains-reload")

    async def reload(self) -> bool:
        """Read the config file again (SIGHUP); on any error keep the running config."""
        if self.config_path is None:
            log.warning("config reload asked for, but the gateway was started without a config file")
            return False
        async with self._reloading:
            try:
                config = await asyncio.to_thread(load_config, self.config_path)
            except ConfigError as exc:
                log.error("config reload failed, keeping the running config: %s", exc)
                return False
            added = self.apply_config(config)
            if self._monitor is not None and added:
                # New backends start "starting"; learn their state before routing to them.
                await self._monitor.check_all(added)
            log.info("config reloaded from %s: %d model(s), %d backend(s)", self.config_path,
                     len(config.models), len(self.backends))  # fmt: skip
            return True

    def _on_hangup(self) -> None:
        asyncio.get_running_loop().create_task(self.reload(), name="config-reload")

    async def answers_health(self, backend: Backend) -> bool:
        """Does the backend answer its health check right now?"""
        if self._monitor is None:
            return True  # not serving: nothing to ask
        return await self._monitor.answers(backend)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the gateway's client session is not open")
        return self._session

    # --- lifecycle -------------------------------------------------------

    async def _usage_context(self, _app: web.Application) -> AsyncIterator[None]:
        store = store_for(self.config.usage_path, self.config.usage_postgres_dsn)
        if store is None:
            yield
            return
        self.usage = UsageRecorder(store, on_drop=self.metrics.usage_dropped.inc)
        await self.usage.start()
        try:
            yield
        finally:
            await self.usage.close()
            self.usage = None

    async def _client_context(self, _app: web.Application) -> AsyncIterator[None]:
        # One pooled session for every upstream call; its pool is bounded by
        # the sum of the backends' concurrency, with headroom for health polls.
        limit = sum(b.max_concurrency for b in self.backends) * 2 + 16
        self._session = aiohttp.ClientSession(
            # Idle connections are dropped before the engines drop them (llama.cpp's
            # and uvicorn's keep-alive is 5 s), so few stale ones are ever reused.
            connector=aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=4),
            auto_decompress=False,
            # One session serves every client: a cookie an engine sets must
            # never go back with another client's request (nor cost a lookup).
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        loop = asyncio.get_running_loop()
        monitor = self._monitor = HealthMonitor(
            self._session,
            self.backends,
            interval=self.config.health_interval,
            unhealthy_after=self.config.unhealthy_after,
            after_round=self.pools.refresh_all,
        )
        # A worker started again after a crash takes the drains in force.
        if self.drains.shared:
            self._apply_drains(await asyncio.to_thread(self.drains.load))
            loop.add_signal_handler(signal.SIGUSR1, self._on_drains_changed)
        # A reload may come while the first health round runs (it can take
        # seconds): listen for it from now on, and make up for one that came
        # before the app was there to take it.
        if self.config_path is not None:
            loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
            if self._early_hangup is not None and self._early_hangup():
                log.info("a reload was asked for while this worker started: reloading")
                self._on_hangup()
        # Know the backends' state before the first request, then keep polling.
        await monitor.check_all()
        await self.pools.refresh_all()
        task = asyncio.create_task(monitor.run(), name="health-monitor")
        gauges = (
            asyncio.create_task(self._refresh_gauges(), name="metrics-gauges")
            if self.metrics.multiprocess_dir
            else None
        )
        try:
            yield
        finally:
            if self.config_path is not None:
                loop.remove_signal_handler(signal.SIGHUP)
            if self.drains.shared:
                loop.remove_signal_handler(signal.SIGUSR1)
            for running in (task, gauges):
                if running is not None:
                    running.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await running
            await self._session.close()
            self._session = None
            self._monitor = None

    async def _refresh_gauges(self) -> None:
        """With several workers, another worker's /metrics reads this one's gauges from its file."""
        while True:
            self.metrics.refresh()
            await asyncio.sleep(1.0)

    def build_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.config.max_body_bytes,
            middlewares=[errors_middleware(lambda: self.config.max_body_bytes), self._auth_middleware],
        )
        # Cleanup runs in reverse: the usage records are flushed last, after
        # the requests in flight have finished and been recorded.
        app.cleanup_ctx.append(self._usage_context)
        app.cleanup_ctx.append(self._client_context)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_page)
        self.forwarder.add_routes(app)
        return app

    # --- middlewares -----------------------------------------------------

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS or not self.config.require_api_key:
            return await handler(request)
        key_name = self.keyring.identify(request.headers.get("Authorization"))
        if key_name is None:
            return error_response(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        request[KEY_NAME] = key_name
        return await handler(request)

    # --- handlers --------------------------------------------------------

    async def healthz(self, _request: web.Request) -> web.Response:
        models = {
            name: sum(1 for b in self.router.backends(name) if b.routable) for name in self.config.models
        }
        return web.json_response({"status": "ok", "version": __version__, "ready_backends": models})

    async def metrics_page(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE})
