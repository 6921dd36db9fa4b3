"""The OpenAI request path: the models list, and each request routed by its
`model` to a replica, through the key's limits, the model's queue and the
breakers, then relayed (streamed or whole) and counted."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Protocol

import aiohttp
from aiohttp import web

from .affinity import request_chain
from .backends import Backend
from .breaker import BreakerState, Failure
from .errors import error_response, json_object
from .limits import Refusal
from .metrics import StreamTap, cached_tokens, usage_of
from .policies import PREDICTED_TTFT, PREFIX_AFFINITY
from .pools import LOAD_STATES, LoadError
from .proxy import (
    ClientGone,
    UpstreamAnswerError,
    UpstreamUnavailable,
    open_upstream,
    relay_stream,
    relay_whole,
)
from .queueing import (
    MAX_WAIT,
    PUSHED_OUT,
    RECHECK_SECONDS,
    SHARED_RECHECK_SECONDS,
    Admission,
    QueueFull,
    Ticket,
)
from .usage import UsageRecord

if TYPE_CHECKING:
    from collections.abc import Callable

    from .affinity import PrefixIndex
    from .config import GatewayConfig
    from .limits import Limiter
    from .metrics import Metrics
    from .policies import AffinitySettings
    from .pools import PoolTracker
    from .predict import Predictor
    from .queueing import FlowBoard
    from .routing import Router
    from .slots import SlotTable
    from .usage import UsageRecorder

log = logging.getLogger(__name__)

# The OpenAI endpoints routed by `model`.
MODEL_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# Response header with the gateway's own time for the request, in ms.
OVERHEAD_HEADER = "X-Cortex-Overhead-Ms"
# An engine's answer that is the request's own error, unless the engine's
# health check fails as well (then the engine is broken).
BROKEN_OR_BAD_STATUS = 500
# The status recorded for a request whose client hung up mid-stream.
CLIENT_CLOSED = 499
# The name (never the value) of the client key a request came with.
KEY_NAME = web.RequestKey("key_name", str)


class ForwardingState(Protocol):
    """What the request path reads of the gateway (app.Gateway owns it; a
    reload swaps its parts, so they are read live, never kept)."""

    affinity: AffinitySettings
    clock: Callable[[], float]
    config: GatewayConfig
    flow_board: FlowBoard
    predictor: Predictor
    limiter: Limiter
    metrics: Metrics
    pools: PoolTracker
    prefix_index: PrefixIndex
    router: Router
    slots: SlotTable | None
    started: float
    usage: UsageRecorder | None

    @property
    def session(self) -> aiohttp.ClientSession: ...

    async def answers_health(self, backend: Backend) -> bool: ...


class Forwarder:
    """The /v1/* handlers, over the state one Gateway owns (read live: a reload swaps it)."""

    def __init__(self, gateway: ForwardingState) -> None:
        self.gateway = gateway
        # Per model: its slots and queue (kept across reloads while the policy holds).
        self.admissions: dict[str, Admission] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model}", self.get_model)
        for path in MODEL_ROUTES:
            app.router.add_post(path, self.route_by_model)

    def _model_card(self, name: str) -> dict[str, object]:
        served, adapter = self.gateway.config.served(name)
        model = self.gateway.config.models[served]
        card: dict[str, object] = {
            "id": name,
            "object": "model",
            "created": int(self.gateway.started),
            "owned_by": model.owned_by,
            "engine": model.engine,
        }
        if adapter is not None:
            # As vLLM lists its own LoRA adapters: the model they run on.
            card["parent"] = model.name
        if model.load_timeout:
            # Loaded on demand: its state where it is most ready, in
            # llama-server's own words (loaded, sleeping, loading, unloaded).
            card["status"] = {"value": self._load_state(model.name)}
        return card

    def _load_state(self, model: str) -> str:
        states = [b.load_state for b in self.gateway.router.backends(model)]
        for state in LOAD_STATES:
            if state in states:
                return state
        return "unknown"

    def _names(self) -> list[str]:
        """Every name a client can ask for: each model, then its adapters."""
        return [
            n for m in self.gateway.config.models.values() for n in (m.name, *(a.name for a in m.adapters))
        ]

    async def list_models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card(n) for n in self._names()]})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self.gateway.config.models and name not in self.gateway.config.adapters:
            return _unknown_model(name)
        return web.json_response(self._model_card(name))

    async def route_by_model(self, request: web.Request) -> web.StreamResponse:
        timing = _Timing(self.gateway.clock())
        key_name = request.get(KEY_NAME)
        try:
            response = await self._route(request, timing)
        except asyncio.CancelledError:
            # The server cancels the handler of a client that hung up: counted
            # as such, with the tokens the engine reported before it did (a
            # client may close right after the usage event and [DONE]).
            if timing.tap is not None and timing.usage is None:
                self._settle_stream(timing, timing.tap)
            self._record(request, timing, CLIENT_CLOSED)
            raise
        finally:
            if key_name is not None and timing.admitted:
                self.gateway.limiter.done(key_name, timing.stream, _served_tokens(timing.usage) or 0)
        # 499, as nginx logs it: the client closed the connection before the end.
        self._record(request, timing, CLIENT_CLOSED if timing.client_gone else response.status)
        return response

    def _settle_stream(self, timing: _Timing, tap: StreamTap) -> None:
        """A relayed stream's first-chunk time and usage, from its tap, and its tokens counted."""
        timing.first_chunk = tap.first_chunk
        timing.usage = tap.usage.usage()
        self.gateway.metrics.count_usage(timing.model, tap.engine, timing.usage, timing.backend)

    def _record(self, request: web.Request, timing: _Timing, status: int) -> None:
        """One request's metrics and usage record."""
        gateway = self.gateway
        models = gateway.config.models
        served, _adapter = gateway.config.served(timing.model)
        # An adapter's requests are its own, under its name.
        model = timing.model if served in models else "_unknown"
        engine = models[served].engine if served in models else "none"
        started, ended = timing.started, gateway.clock()
        gateway.metrics.child(gateway.metrics.requests, model, engine, timing.backend, str(status)).inc()
        if model == "_unknown":
            return
        if gateway.usage is not None:
            usage = timing.usage or {}
            gateway.usage.record(
                UsageRecord(
                    ts=time.time(),
                    key_name=request.get(KEY_NAME, "anonymous"),
                    model=model,
                    engine=engine,
                    backend=timing.backend,
                    stream=timing.stream,
                    status=status,
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                    ttft_ms=None if timing.first_chunk is None else (timing.first_chunk - started) * 1000,
                    latency_ms=(ended - started) * 1000,
                )
            )
        gateway.metrics.child(gateway.metrics.latency, model, engine).observe(ended - started)
        if timing.upstream_ended:
            gateway.metrics.child(gateway.metrics.overhead, model, engine).observe(timing.overhead(ended))

    async def _route(self, request: web.Request, timing: _Timing) -> web.StreamResponse:
        body = await request.read()
        parsed = _model_and_stream(body)
        if isinstance(parsed, web.Response):
            return parsed
        payload, model, stream = parsed
        timing.model = model
        timing.stream = stream
        # An adapter's requests run on its parent's replicas, slots and queue.
        served, adapter = self.gateway.config.served(model)
        if not self.gateway.router.knows(served):
            return _unknown_model(model)
        key_name = request.get(KEY_NAME)
        if key_name is not None:
            try:
                self.gateway.limiter.admit(key_name, model, stream)
            except Refusal as exc:
                if exc.status == 429:
                    self.gateway.metrics.child(self.gateway.metrics.refusals, key_name, exc.code).inc()
                headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
                return error_response(exc.status, str(exc), code=exc.code, param="model", headers=headers)
            timing.admitted = True

        if not self.gateway.router.ready(served):
            return error_response(
                503,
                f"model '{model}' has no ready backend right now",
                code="model_unavailable",
                headers={"Retry-After": "5"},
            )
        config = self.gateway.config
        load_timeout = config.models[served].load_timeout
        pooled = [b for b in self.gateway.router.ready(served) if b.pool is not None]
        if load_timeout and pooled:
            # Loaded on a full pool where another model waits for its load:
            # this one's new requests wait their turn (pools.py).
            await self.gateway.pools.wait_turn(pooled[0], load_timeout)
        admission = self._admission(served)
        timeouts = self.gateway.config.timeouts_for(served)
        session = self.gateway.session
        router = self.gateway.router
        # The chain is keyed by the name asked for: an adapter's prompts are
        # cached apart from its base model's.
        chain = self._affinity_chain(request, payload, served, model)
        home, matched = (
            router.home_and_match(served, chain, self.gateway.prefix_index) if chain else (None, 0)
        )
        guess = self._guess(served, body, chain, matched) if chain else None
        # A request waits at most this long for a slot on its home, then takes
        # any: never more than half the queue's wait, so it spills, not times out.
        clock = self.gateway.clock
        home_until = clock() + min(config.models[served].routing.home_wait, config.queue.max_wait / 2)
        # llama.cpp applies an adapter a request names in its `lora` field:
        # the gateway sets it on every request of a model with adapters (a
        # client's own is replaced), so a key gets only the names it may use.
        lora = config.models[served].lora_field(adapter)
        flow_class, weight = config.key_flow(key_name)
        ticket = Ticket(key_name or "anonymous", flow_class, weight)
        # A vLLM engine that schedules by priority gets the key's: the
        # client's own (which could put it ahead of everyone) is replaced.
        priority = flow_class.priority if config.models[served].priority_scheduling else None
        tried: set[int] = set()
        failures: list[str] = []
        metrics = self.gateway.metrics
        while True:
            if home is not None:
                home.affine_waiting += 1
            try:
                grant = await admission.acquire(
                    lambda: self._pick(served, tried, home if clock() < home_until else None, guess, timing),
                    router.backends(served),
                    ticket,
                )
            except QueueFull as exc:
                if failures:
                    break  # every usable replica failed already
                metrics.child(metrics.refusals, ticket.key, exc.reason).inc()
                return error_response(
                    429,
                    f"model '{model}' is at capacity: {_REFUSALS[exc.reason]}",
                    code="queue_full",
                    headers={"Retry-After": str(exc.retry_after)},
                )
            finally:
                if home is not None:
                    home.affine_waiting -= 1
            backend, waited = grant.backend, grant.waited
            tried.add(id(backend))
            if chain:
                # Whatever the reason it went elsewhere, the prefix is there now.
                router.learn(chain, backend, self.gateway.prefix_index)
                decision = "new" if home is None else "affinity" if backend is home else "spill"
                metrics.child(metrics.routing, model, decision).inc()
            timing.waited += waited
            if waited:
                metrics.child(metrics.queue_wait, model, flow_class.name).observe(waited)
            timing.backend = backend.name
            timing.upstream_started = self.gateway.clock()
            if guess is not None and config.models[served].routing.policy == PREDICTED_TTFT:
                self._hold_prefill(timing, backend, guess)
            try:
                try:
                    # A pool's router serves the parent's name; the adapter is the `lora` field.
                    engine_model = served if adapter is not None and backend.pool is not None else None
                    sent = _upstream_body(body, payload, stream, lora, engine_model, priority)
                    # On a pool, the router loads the model first if it must;
                    # the wait for that load is bounded by the model's load timeout.
                    upstream = await self.gateway.pools.send(
                        backend,
                        partial(
                            open_upstream,
                            session,
                            backend,
                            request.path,
                            sent,
                            replace(timeouts, first_byte=timeouts.first_byte + load_timeout)
                            if backend.pool is not None
                            else timeouts,
                        ),
                        load_timeout,
                    )
                    if (
                        isinstance(upstream, aiohttp.ClientResponse)
                        and upstream.status == BROKEN_OR_BAD_STATUS
                        and backend.pool is None
                        and not await self.gateway.answers_health(backend)
                    ):
                        # A 500 from an engine whose health check fails too:
                        # the engine is broken and ran nothing, so another
                        # replica may answer. (One that answers its health
                        # check gave this request its own error, relayed below.)
                        upstream.release()
                        raise UpstreamUnavailable("answered 500, and its health check fails", Failure.STATUS)
                except LoadError as exc:
                    return error_response(
                        503, str(exc), code="model_not_loaded", headers={"Retry-After": str(exc.retry_after)}
                    )
                except UpstreamUnavailable as exc:
                    self._count_failure(backend, exc.kind, exc.retry_after)
                    if exc.reached:
                        # The engine may be running it: never a second time elsewhere.
                        log.warning("backend %s (%s) did not answer: %s", backend.name, model, exc)
                        timed_out = exc.kind is Failure.TIMEOUT
                        return error_response(
                            504 if timed_out else 502,
                            f"the model server for '{model}' did not answer: {exc}",
                            code="upstream_timeout" if timed_out else "upstream_unavailable",
                        )
                    # Nothing reached an engine: the next replica may answer.
                    failures.append(f"{backend.name}: {exc}")
                    log.warning("backend %s (%s) failed before the first byte: %s", backend.name, model, exc)
                    if not self._has_untried(served, tried):
                        break
                    continue
                backend.breaker.record_success()
                if isinstance(upstream, web.Response):
                    return upstream  # a pool router's error, read whole (pools.send)
                engine = backend.engine
                if stream and upstream.status == 200:
                    # The stream's headers go out now: the overhead so far.
                    before = timing.overhead()
                    tap = timing.tap = StreamTap(
                        self.gateway.metrics,
                        model,
                        engine,
                        timing.started,
                        self.gateway.clock,
                        on_first=lambda: self._drop_prefill(timing),
                    )
                    try:
                        response = await relay_stream(
                            request,
                            upstream,
                            timeouts.idle,
                            headers={OVERHEAD_HEADER: f"{before * 1000:.3f}"},
                            tap=tap,
                            transform=None if _client_wants_usage(payload) else _strip_usage_events,
                            on_cut=lambda cut_by=backend: self._count_failure(cut_by, Failure.STREAM_CUT),
                        )
                    except ClientGone as gone:
                        response = gone.response
                        timing.client_gone = True
                    timing.upstream_ended = self.gateway.clock()
                    self._settle_stream(timing, tap)
                    self._learn(timing, backend, len(body), guess)
                    return response
                try:
                    whole = await relay_whole(upstream, timeouts.idle, self.gateway.config.max_answer_bytes)
                except UpstreamAnswerError as exc:
                    log.warning("backend %s (%s): %s", backend.name, model, exc)
                    if not exc.engine_fault:
                        return error_response(502, str(exc), code=exc.code)
                    # The engine ran the request: it is not run again elsewhere.
                    self._count_failure(backend, Failure.REFUSED)
                    return error_response(502, str(exc), code=exc.code)
                timing.upstream_ended = self.gateway.clock()
                if whole.status == 200 and isinstance(whole.body, bytes):
                    timing.usage = usage_of(whole.body)
                    self.gateway.metrics.count_usage(model, engine, timing.usage, backend.name)
                    self._learn(timing, backend, len(body), guess)
                whole.headers[OVERHEAD_HEADER] = f"{timing.overhead(self.gateway.clock()) * 1000:.3f}"
                return whole
            finally:
                self._drop_prefill(timing)
                backend.breaker.release_trial()
                admission.release(grant, _served_tokens(timing.usage))
        return error_response(
            502,
            f"no backend of model '{model}' answered: " + "; ".join(failures),
            code="upstream_unavailable",
        )

    # --- choosing a backend ------------------------------------------------

    def _admission(self, model: str) -> Admission:
        admission = self.admissions.get(model)
        config = self.gateway.config
        if admission is None or admission.policy != config.queue or admission.flow != config.flow:
            recheck = SHARED_RECHECK_SECONDS if self.gateway.slots is not None else RECHECK_SECONDS
            admission = self.admissions[model] = Admission(
                model,
                config.queue,
                config.flow,
                self.gateway.flow_board,
                recheck,
                live=lambda: self.gateway.router.backends(model),
            )
        return admission

    def _affinity_chain(self, request: web.Request, payload: dict, served: str, name: str) -> list[int]:
        """The request's prefix-affinity chain, or [] when its model routes by load alone."""
        if request.path == "/v1/embeddings":
            return []  # no prompt for an engine to reuse
        if self.gateway.config.models[served].routing.policy not in (PREFIX_AFFINITY, PREDICTED_TTFT):
            return []
        settings = self.gateway.affinity
        return request_chain(name, payload, request.headers.get(settings.session_header), settings)

    def _guess(self, model: str, body: bytes, chain: list[int], matched: int) -> _Guess | None:
        """What predicted_ttft routing needs of a request: its size and what
        its home holds of it, in tokens (None: the model routes otherwise)."""
        if self.gateway.config.models[model].routing.policy != PREDICTED_TTFT:
            return None
        predictor = self.gateway.predictor
        prompt = max(predictor.tokens(model, len(body)), 1)
        if len(chain) == 1 and matched:
            # A named session (or a conversation shorter than a block): its
            # home holds the turns before this one, most of the prompt.
            held = int(prompt * SESSION_HELD)
        else:
            held = predictor.tokens(model, matched * self.gateway.affinity.block_bytes)
        return _Guess(prompt, held)

    def _pick(
        self,
        model: str,
        tried: set[int],
        home: Backend | None = None,
        guess: _Guess | None = None,
        timing: _Timing | None = None,
    ) -> Backend | None:
        """A ready replica with a free slot whose breaker lets it through: the
        least loaded, or, for a request with a home (the replica holding its
        prefix), the home unless the router says to spill; a home without a
        free slot is waited for (None) while spilling is not called for. With
        a guess (predicted_ttft), the replica with the least predicted time
        to first token, waited for while it is the fastest even with its queue."""
        router = self.gateway.router
        ready = [b for b in router.candidates(model) if id(b) not in tried]
        if guess is not None:
            return self._pick_predicted(ready, home, guess, timing)
        usable = [b for b in ready if b.outstanding < b.max_concurrency]
        if home is not None:
            usable = router.prefer(ready, usable, home, self.gateway.config.models[model].routing)
        for backend in usable:
            if backend.breaker.allows():
                return backend
        return None

    def _pick_predicted(
        self, ready: list[Backend], home: Backend | None, guess: _Guess, timing: _Timing | None
    ) -> Backend | None:
        ahead = max(home.affine_waiting - 1, 0) if home is not None else 0
        ranked = self.gateway.predictor.rank(ready, guess.prompt, home, guess.held, ahead)
        if timing is not None and timing.predicted is None and ranked:
            timing.predicted = ranked[0].seconds
        for place, prediction in enumerate(ranked):
            backend = prediction.backend
            if backend.outstanding >= backend.max_concurrency:
                if place == 0 and home is not None:
                    return None  # the fastest even counting its queue: wait for it (bounded by home_wait)
                continue
            if backend.breaker.allows():
                if timing is not None:
                    timing.expected_cached = prediction.cached_tokens
                return backend
        return None

    def _hold_prefill(self, timing: _Timing, backend: Backend, guess: _Guess) -> None:
        """The request's uncached prompt tokens count as pending on its replica
        until its first token (or its end): the next predictions wait behind them."""
        predictor = self.gateway.predictor
        tokens = max(guess.prompt - (timing.expected_cached or 0), 0)
        timing.pending_before = predictor.pending(backend)
        predictor.hold(backend, tokens)
        timing.prefill = (backend, tokens)

    def _drop_prefill(self, timing: _Timing) -> None:
        if timing.prefill is not None:
            backend, tokens = timing.prefill
            timing.prefill = None
            self.gateway.predictor.drop(backend, tokens)

    def _learn(self, timing: _Timing, backend: Backend, body_bytes: int, guess: _Guess | None) -> None:
        """What an answer tells of its replica's latencies (every policy learns,
        so that a switch to predicted_ttft starts with estimates)."""
        predictor, usage = self.gateway.predictor, timing.usage or {}
        prompt = usage.get("prompt_tokens")
        if timing.upstream_ended is not None:
            predictor.observe_service(backend, timing.upstream_ended - timing.upstream_started)
        if not isinstance(prompt, int) or isinstance(prompt, bool):
            return
        predictor.observe_prompt(timing.model, body_bytes, prompt)
        if timing.first_chunk is None:
            return
        reported = cached_tokens(usage)
        first_token = timing.first_chunk - timing.upstream_started
        predictor.observe_first_token(backend, first_token, prompt, reported or 0, timing.pending_before)
        metrics = self.gateway.metrics
        if guess is not None and timing.predicted is not None:
            measured = timing.first_chunk - timing.started
            metrics.child(metrics.prediction_error, timing.model).observe(timing.predicted - measured)
        if guess is not None and timing.expected_cached is not None and reported is not None:
            # What the index expected the engine to hold against what it says
            # it reused: within a tenth of the prompt (or 64 tokens) agrees.
            close = abs(timing.expected_cached - reported) <= max(CACHE_AGREEMENT_TOKENS, prompt // 10)
            metrics.child(metrics.cache_expectations, timing.model, "agree" if close else "disagree").inc()

    def _count_failure(self, backend: Backend, kind: Failure, retry_after: float | None = None) -> None:
        """A failed attempt on ``backend``: its health count and its breaker."""
        backend.record_failure(self.gateway.config.unhealthy_after)
        backend.breaker.record_failure(kind, retry_after=retry_after, last_ready=self._last_usable(backend))

    def _has_untried(self, model: str, tried: set[int]) -> bool:
        return any(id(b) not in tried for b in self.gateway.router.ready(model))

    def _last_usable(self, backend: Backend) -> bool:
        """Is this the model's only ready backend with a closed breaker?"""
        return not any(
            other is not backend and other.breaker.state is BreakerState.CLOSED
            for other in self.gateway.router.ready(backend.model)
        )


# The share of a prompt its named session's home is taken to hold.
SESSION_HELD = 0.8
# An expected and a reported count of cached tokens this close agree (or a tenth of the prompt).
CACHE_AGREEMENT_TOKENS = 64


class _Guess:
    """A request's size in tokens, and how many of them its home holds."""

    __slots__ = ("held", "prompt")

    def __init__(self, prompt: int, held: int) -> None:
        self.prompt = prompt
        self.held = held


class _Timing:
    """What one request's metrics need, filled in as it goes."""

    __slots__ = (
        "admitted", "backend", "client_gone", "expected_cached", "first_chunk", "model", "pending_before",
        "predicted", "prefill", "started", "stream", "tap", "upstream_ended", "upstream_started", "usage",
        "waited",
    )  # fmt: skip

    def __init__(self, started: float) -> None:
        self.started = started
        self.admitted = False
        self.client_gone = False
        self.stream = False
        self.first_chunk: float | None = None
        self.usage: dict | None = None
        # A stream's tap, once its relay began (its usage, should the client go).
        self.tap: StreamTap | None = None
        self.model = "_unknown"
        self.backend = "none"
        self.waited = 0.0
        # predicted_ttft: the first prediction, the prompt tokens pending on
        # the replica when it was sent, and its own held there until its first token.
        self.predicted: float | None = None
        self.expected_cached: int | None = None
        self.pending_before = 0
        self.prefill: tuple[Backend, int] | None = None
        self.upstream_started = started
        self.upstream_ended: float | None = None

    def overhead(self, until: float | None = None) -> float:
        """The gateway's own seconds: before the upstream call (queue wait
        excluded) and, given ``until``, from the upstream's end to then."""
        own = self.upstream_started - self.started - self.waited
        if until is not None and self.upstream_ended is not None:
            own += until - self.upstream_ended
        return max(own, 0.0)


_REFUSALS = {
    "queue_full": "all its slots are busy and its queue is full",
    MAX_WAIT: "no slot came free within the longest wait of the key's class",
    PUSHED_OUT: "a more important request, or a key under its fair share, took this one's place in the queue",
}


def _served_tokens(usage: dict | None) -> int | None:
    """Prompt and completion tokens of an answer (None: not known)."""
    if not usage:
        return None
    return sum(int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens"))


def _unknown_model(name: str) -> web.Response:
    return error_response(404, f"the model '{name}' does not exist", code="model_not_found", param="model")


def _client_wants_usage(payload: dict) -> bool:
    """Did the client ask for a stream's usage chunk (stream_options.include_usage)?"""
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _upstream_body(
    body: bytes,
    payload: dict,
    stream: bool,
    lora: list | None,
    model: str | None = None,
    priority: int | None = None,
) -> bytes:
    """The body for the engine: the client's bytes, unless something must be set.

    Every stream asks for the usage event at the end: both engines send a
    stream's token counts only when asked, and usage records and token limits
    need them whatever the client chose (a client that did not ask gets the
    stream without that event: _strip_usage_events). A request for a llama.cpp
    model with adapters carries the `lora` field the gateway chose; ``model``,
    when given, is the name the engine serves (a pool's router knows an
    adapter by its parent's name only); ``priority``, when given, is the key's
    class priority for a vLLM engine that schedules by it. Every other body
    goes on byte for byte.
    """
    changes: dict[str, object] = {}
    if model is not None and payload.get("model") != model:
        changes["model"] = model
    if stream and not _client_wants_usage(payload):
        options = payload.get("stream_options")
        changes["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    if lora is not None:
        changes["lora"] = lora
    if priority is not None and payload.get("priority") != priority:
        changes["priority"] = priority
    if not changes:
        return body
    return json.dumps({**payload, **changes}, ensure_ascii=False, separators=(",", ":")).encode()


_EVENT_BOUNDARY = re.compile(rb"(\r?\n\r?\n)")


def _strip_usage_events(data: bytes) -> bytes:
    """Whole SSE events without the usage-only event (empty `choices`) that the
    gateway asked the engine for on a client's behalf."""
    if b'"usage"' not in data:
        return data
    parts = _EVENT_BOUNDARY.split(data)
    kept: list[bytes] = []
    # parts alternate: event, boundary, event, boundary, ..., tail
    for index in range(0, len(parts), 2):
        event = parts[index]
        boundary = parts[index + 1] if index + 1 < len(parts) else b""
        if b'"usage"' in event and _is_usage_event(event):
            continue
        kept.append(event + boundary)
    return b"".join(kept)


def _is_usage_event(event: bytes) -> bool:
    for line in event.splitlines():
        if line.startswith(b"data:"):
            try:
                parsed = json.loads(line[5:])
            except ValueError:
                return False
            return (
                isinstance(parsed, dict)
                and parsed.get("choices") == []
                and isinstance(parsed.get("usage"), dict)
            )
    return False


def _model_and_stream(body: bytes) -> tuple[dict, str, bool] | web.Response:
    """The request's JSON object, its `model` and its `stream`."""
    payload = json_object(body)
    if isinstance(payload, web.Response):
        return payload
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return error_response(400, "'model' is required and must be a string", param="model")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        return error_response(400, "'stream' must be a boolean", param="stream")
    return payload, model, stream
