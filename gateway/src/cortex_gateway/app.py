"""The gateway application: one object that owns all state, and its handlers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from . import __version__
from .auth import KeyRing
from .backends import Backend, HealthMonitor
from .breaker import BreakerState, Failure
from .config import RESTART_FIELDS, ConfigError, GatewayConfig, load_config
from .drains import DrainBook
from .errors import Handler, error_response, errors_middleware, json_object
from .limits import CounterTable, Limiter, Refusal
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics, StreamTap, usage_of
from .proxy import UpstreamAnswerError, UpstreamUnavailable, open_upstream, relay_stream, relay_whole
from .queueing import Admission, QueueFull
from .routing import Router
from .usage import UsageRecord, UsageRecorder, store_for

log = logging.getLogger(__name__)

# The OpenAI endpoints routed by `model`.
MODEL_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# Open without a key: liveness for nginx and the health timers, and metrics
# for Prometheus (the gateway listens on loopback or the internal address;
# the nginx site does not pass /metrics on). The admin API is not here at
# all: it has its own listener (admin.py).
PUBLIC_PATHS = frozenset({"/healthz", "/metrics"})
# Response header with the gateway's own time for the request, in ms.
OVERHEAD_HEADER = "X-Cortex-Overhead-Ms"
# The name (never the value) of the client key a request came with.
KEY_NAME = web.RequestKey("key_name", str)


class Gateway:
    """Owns the configuration, the backends, the router and the HTTP client."""

    def __init__(
        self,
        config: GatewayConfig,
        config_path: str | None = None,
        limits_table: CounterTable | None = None,
        drains_path: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
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
        self.router = Router(self.backends)
        # Worker processes share one drains file; alone, the gateway keeps them in memory.
        self.drains = DrainBook(drains_path)
        self.started = time.time()
        self._session: aiohttp.ClientSession | None = None
        self._monitor: HealthMonitor | None = None
        self._admissions: dict[str, Admission] = {}
        self.metrics = Metrics(
            lambda: self.backends,
            lambda: {m: a.waiting for m, a in self._admissions.items()},
            lambda: self.usage.buffered if self.usage is not None else 0,
        )
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
                    added.append(backend)
                else:
                    backend.engine = model.engine
                    backend.api_key = backend_config.api_key
                    backend.max_concurrency = backend_config.max_concurrency
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
        self._apply_drains(self.drains.current())
        if self._monitor is not None:
            self._monitor.replace_backends(backends)
        return added

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
        )
        loop = asyncio.get_running_loop()
        monitor = self._monitor = HealthMonitor(
            self._session,
            self.backends,
            interval=self.config.health_interval,
            unhealthy_after=self.config.unhealthy_after,
        )
        # A worker started again after a crash takes the drains in force.
        if self.drains.shared:
            self._apply_drains(await asyncio.to_thread(self.drains.load))
            loop.add_signal_handler(signal.SIGUSR1, self._on_drains_changed)
        # Know the backends' state before the first request, then keep polling.
        await monitor.check_all()
        task = asyncio.create_task(monitor.run(), name="health-monitor")
        gauges = (
            asyncio.create_task(self._refresh_gauges(), name="metrics-gauges")
            if self.metrics.multiprocess_dir
            else None
        )
        if self.config_path is not None:
            loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
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
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model}", self.get_model)
        for path in MODEL_ROUTES:
            app.router.add_post(path, self.route_by_model)
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

    def _model_card(self, name: str) -> dict[str, object]:
        model = self.config.models[name]
        return {
            "id": model.name,
            "object": "model",
            "created": int(self.started),
            "owned_by": model.owned_by,
            "engine": model.engine,
        }

    async def list_models(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [self._model_card(n) for n in self.config.models]}
        )

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self.config.models:
            return _unknown_model(name)
        return web.json_response(self._model_card(name))

    async def route_by_model(self, request: web.Request) -> web.StreamResponse:
        started = self.clock()
        timing = _Timing(started)
        key_name = request.get(KEY_NAME)
        try:
            response = await self._route(request, timing)
        finally:
            if key_name is not None and timing.admitted:
                tokens = sum(
                    int((timing.usage or {}).get(k) or 0) for k in ("prompt_tokens", "completion_tokens")
                )
                self.limiter.done(key_name, timing.stream, tokens)
        model = timing.model if timing.model in self.config.models else "_unknown"
        engine = self.config.models[model].engine if model in self.config.models else "none"
        ended = self.clock()
        self.metrics.requests.labels(model, engine, timing.backend, str(response.status)).inc()
        if self.usage is not None and model != "_unknown":
            usage = timing.usage or {}
            self.usage.record(
                UsageRecord(
                    ts=time.time(),
                    key_name=request.get(KEY_NAME, "anonymous"),
                    model=model,
                    engine=engine,
                    backend=timing.backend,
                    stream=timing.stream,
                    status=response.status,
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                    ttft_ms=None if timing.first_chunk is None else (timing.first_chunk - started) * 1000,
                    latency_ms=(ended - started) * 1000,
                )
            )
        if model != "_unknown":
            self.metrics.latency.labels(model, engine).observe(ended - started)
            if timing.upstream_ended:
                self.metrics.overhead.labels(model, engine).observe(timing.overhead(ended))
        return response

    async def _route(self, request: web.Request, timing: _Timing) -> web.StreamResponse:
        body = await request.read()
        parsed = _model_and_stream(body)
        if isinstance(parsed, web.Response):
            return parsed
        model, stream = parsed
        timing.model = model
        timing.stream = stream
        if not self.router.knows(model):
            return _unknown_model(model)
        key_name = request.get(KEY_NAME)
        if key_name is not None:
            try:
                self.limiter.admit(key_name, model, stream)
            except Refusal as exc:
                headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
                return error_response(exc.status, str(exc), code=exc.code, param="model", headers=headers)
            timing.admitted = True

        if not self.router.ready(model):
            return error_response(
                503,
                f"model '{model}' has no ready backend right now",
                code="model_unavailable",
                headers={"Retry-After": "5"},
            )
        admission = self._admission(model)
        timeouts = self.config.timeouts_for(model)
        tried: set[int] = set()
        failures: list[str] = []
        while True:
            try:
                backend, waited = await admission.acquire(
                    lambda: self._pick(model, tried), self.router.backends(model)
                )
            except QueueFull as exc:
                if failures:
                    break  # every usable replica failed already
                return error_response(
                    429,
                    f"model '{model}' is at capacity: all its slots are busy and its queue is full",
                    code="queue_full",
                    headers={"Retry-After": str(exc.retry_after)},
                )
            tried.add(id(backend))
            timing.waited += waited
            if waited:
                self.metrics.queue_wait.labels(model).observe(waited)
            timing.backend = backend.name
            timing.upstream_started = self.clock()
            try:
                try:
                    sent = _with_stream_usage(body) if stream and backend.engine == "vllm" else body
                    upstream = await open_upstream(self.session, backend, request.path, sent, timeouts)
                except UpstreamUnavailable as exc:
                    # Nothing reached the client yet: the next replica may answer.
                    backend.record_failure(self.config.unhealthy_after)
                    backend.breaker.record_failure(
                        exc.kind, retry_after=exc.retry_after, last_ready=self._last_usable(backend)
                    )
                    failures.append(f"{backend.name}: {exc}")
                    log.warning("backend %s (%s) failed before the first byte: %s", backend.name, model, exc)
                    if not self._has_untried(model, tried):
                        break
                    continue
                backend.breaker.record_success()
                engine = backend.engine
                if stream and upstream.status == 200:
                    # The stream's headers go out now: the overhead so far.
                    before = timing.overhead()
                    tap = StreamTap(self.metrics, model, engine, timing.started, self.clock)
                    response = await relay_stream(
                        request,
                        upstream,
                        timeouts.idle,
                        headers={OVERHEAD_HEADER: f"{before * 1000:.3f}"},
                        tap=tap,
                    )
                    timing.upstream_ended = self.clock()
                    timing.first_chunk = tap.first_chunk
                    timing.usage = tap.usage.usage()
                    self.metrics.count_usage(model, engine, timing.usage)
                    return response
                try:
                    whole = await relay_whole(upstream, timeouts.idle, self.config.max_answer_bytes)
                except UpstreamAnswerError as exc:
                    # The status line came, so the request is not sent again.
                    if exc.engine_fault:
                        backend.record_failure(self.config.unhealthy_after)
                        backend.breaker.record_failure(Failure.REFUSED, last_ready=self._last_usable(backend))
                    log.warning("backend %s (%s): %s", backend.name, model, exc)
                    return error_response(502, str(exc), code=exc.code)
                timing.upstream_ended = self.clock()
                if whole.status == 200 and isinstance(whole.body, bytes):
                    timing.usage = usage_of(whole.body)
                    self.metrics.count_usage(model, engine, timing.usage)
                whole.headers[OVERHEAD_HEADER] = f"{timing.overhead(self.clock()) * 1000:.3f}"
                return whole
            finally:
                backend.breaker.release_trial()
                await admission.release(backend)
        return error_response(
            502,
            f"no backend of model '{model}' answered: " + "; ".join(failures),
            code="upstream_unavailable",
        )

    # --- choosing a backend ------------------------------------------------

    def _admission(self, model: str) -> Admission:
        admission = self._admissions.get(model)
        if admission is None or admission.policy != self.config.queue:
            admission = self._admissions[model] = Admission(self.config.queue)
        return admission

    def _pick(self, model: str, tried: set[int]) -> Backend | None:
        """The least loaded ready replica with a free slot whose breaker lets it through."""
        for backend in self.router.candidates(model):
            if id(backend) in tried or backend.outstanding >= backend.max_concurrency:
                continue
            if backend.breaker.allows():
                return backend
        return None

    def _has_untried(self, model: str, tried: set[int]) -> bool:
        return any(id(b) not in tried for b in self.router.ready(model))

    def _last_usable(self, backend: Backend) -> bool:
        """Is this the model's only ready backend with a closed breaker?"""
        return not any(
            other is not backend and other.breaker.state is BreakerState.CLOSED
            for other in self.router.ready(backend.model)
        )


class _Timing:
    """What one request's metrics need, filled in as it goes."""

    __slots__ = (
        "admitted", "backend", "first_chunk", "model", "started", "stream",
        "upstream_ended", "upstream_started", "usage", "waited",
    )  # fmt: skip

    def __init__(self, started: float) -> None:
        self.started = started
        self.admitted = False
        self.stream = False
        self.first_chunk: float | None = None
        self.usage: dict | None = None
        self.model = "_unknown"
        self.backend = "none"
        self.waited = 0.0
        self.upstream_started = started
        self.upstream_ended: float | None = None

    def overhead(self, until: float | None = None) -> float:
        """The gateway's own seconds: before the upstream call (queue wait
        excluded) and, given ``until``, from the upstream's end to then."""
        own = self.upstream_started - self.started - self.waited
        if until is not None and self.upstream_ended is not None:
            own += until - self.upstream_ended
        return max(own, 0.0)


def _unknown_model(name: str) -> web.Response:
    return error_response(404, f"the model '{name}' does not exist", code="model_not_found", param="model")


def _with_stream_usage(body: bytes) -> bytes:
    """A streamed request for vLLM, asking for the usage event at the end.

    vLLM sends a stream's token counts only when asked; the gateway needs
    them for usage records and limits. Every other body goes on byte for byte.
    """
    payload = json.loads(body)
    if "stream_options" in payload:
        return body  # the client asked for what it wants
    payload["stream_options"] = {"include_usage": True}
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _model_and_stream(body: bytes) -> tuple[str, bool] | web.Response:
    """Read only `model` and `stream` from a request body."""
    payload = json_object(body)
    if isinstance(payload, web.Response):
        return payload
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return error_response(400, "'model' is required and must be a string", param="model")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        return error_response(400, "'stream' must be a boolean", param="stream")
    return model, stream
