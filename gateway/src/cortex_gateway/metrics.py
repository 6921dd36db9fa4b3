"""Prometheus metrics of one gateway, in its own registry (no global state).

Labels stay bounded: models and backends come from the config (an unknown
model is counted as "_unknown"), statuses are HTTP codes the gateway answers
with, and gauges are set from the live objects when scraped and every second.

With several worker processes (PROMETHEUS_MULTIPROC_DIR set before
prometheus_client is imported; the supervisor does it) every worker writes its
samples to memory-mapped files and any worker's /metrics reads them all:
counters and histograms add up over the workers, in-flight requests and queue
depths add up over the live workers, a backend is up only if every live
worker sees it ready, it is draining only once every live worker drains it,
and the breaker shows the most open of the workers' breakers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from .backends import Backend
from .breaker import BreakerState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
PREDICTION_ERROR_BUCKETS = (-10, -5, -2, -1, -0.5, -0.25, -0.1, 0, 0.1, 0.25, 0.5, 1, 2, 5, 10)
BREAKER_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class Metrics:
    def __init__(
        self,
        backends: Callable[[], Iterable[Backend]],
        waiting: Callable[[], dict[str, dict[str, int]]],
        usage_buffered: Callable[[], int] = lambda: 0,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model", "engine"]
        self.requests = Counter(
            "cortex_gateway_requests",
            "Requests answered, by model, engine, backend and status",
            [*labels, "backend", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cortex_gateway_request_duration_seconds",
            "Time from request to the end of the answer",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "cortex_gateway_time_to_first_token_seconds",
            "Streams: time from request to the first chunk",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "cortex_gateway_queue_wait_seconds",
            "Time waited for a free engine slot, by model and the key's priority class",
            ["model", "class"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.overhead = Histogram(
            "cortex_gateway_overhead_seconds",
            "The gateway's own time per request, upstream time and queue wait excluded",
            labels,
            buckets=OVERHEAD_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "cortex_gateway_tokens",
            "Tokens reported by the engines",
            [*labels, "kind"],
            registry=self.registry,
        )
        backend_labels = ["model", "engine", "backend"]
        # What prefix affinity earns: the engines' own count of prompt tokens
        # they took from their cache, per backend (hit rate = hit / (hit + miss)).
        self.prompt_cache = Counter(
            "cortex_gateway_prompt_cache_tokens",
            "Prompt tokens the engine reused from its cache (hit) or computed (miss), per backend",
            [*backend_labels, "result"],
            registry=self.registry,
        )
        # predicted_ttft routing: how far off its predictions are.
        self.prediction_error = Histogram(
            "cortex_gateway_ttft_prediction_error_seconds",
            "predicted_ttft routing: the predicted time to first token minus the measured one, per stream",
            ["model"],
            buckets=PREDICTION_ERROR_BUCKETS,
            registry=self.registry,
        )
        self.cache_expectations = Counter(
            "cortex_gateway_cache_expectations",
            "predicted_ttft routing: streams whose engine reported about as many cached prompt tokens as the"
            " prefix index expected (agree) or not (disagree)",
            ["model", "result"],
            registry=self.registry,
        )
        self.routing = Counter(
            "cortex_gateway_routing_decisions",
            "Replica choices of prefix-affinity models: affinity (the replica holding the prefix),"
            " spill (another one: that replica was too busy or unusable), new (no replica held it)",
            ["model", "decision"],
            registry=self.registry,
        )
        # On-demand models (pools.py): loads the gateway waited for, by result
        # (loaded, failed, timeout), their seconds, and evictions seen.
        self.loads = Counter(
            "cortex_gateway_model_loads",
            "Loads of on-demand models the gateway waited for, by result: loaded, failed, timeout",
            ["model", "backend", "result"],
            registry=self.registry,
        )
        self.load_seconds = Histogram(
            "cortex_gateway_model_load_seconds",
            "Time from a request finding its on-demand model unloaded to the model loaded",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.evictions = Counter(
            "cortex_gateway_model_evictions",
            "On-demand models seen going from loaded to unloaded (the router made room for another)",
            ["model", "backend"],
            registry=self.registry,
        )
        self.backend_up = Gauge(
            "cortex_gateway_backend_up", "1 when the backend is ready and not draining", backend_labels,
            registry=self.registry, multiprocess_mode="livemin",
        )  # fmt: skip
        self.backend_draining = Gauge(
            "cortex_gateway_backend_draining", "1 when the backend is drained on purpose", backend_labels,
            registry=self.registry, multiprocess_mode="livemin",
        )  # fmt: skip
        self.breaker_state = Gauge(
            "cortex_gateway_breaker_state", "Circuit breaker per backend: 0 closed, 1 half-open, 2 open",
            backend_labels, registry=self.registry, multiprocess_mode="livemax",
        )  # fmt: skip
        self.in_flight = Gauge(
            "cortex_gateway_in_flight", "Requests running on the backend", backend_labels,
            registry=self.registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.queue_depth = Gauge(
            "cortex_gateway_queue_depth", "Requests waiting for a slot", ["model"],
            registry=self.registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.class_queue_depth = Gauge(
            "cortex_gateway_class_queue_depth", "Requests waiting for a slot, by the key's priority class",
            ["model", "class"], registry=self.registry, multiprocess_mode="livesum",
        )  # fmt: skip
        # Labels stay bounded: key names come from the config ("anonymous"
        # without one), reasons from the gateway's own codes.
        self.refusals = Counter(
            "cortex_gateway_refusals",
            "Requests refused with 429, by key and reason: queue_full, max_wait, pushed_out (the queue"
            " made room for a more important request or a key under its share), or a key limit's code",
            ["key", "reason"],
            registry=self.registry,
        )
        # Usage records: none may vanish unseen. Both series exist from the start.
        self.usage_dropped = Counter(
            "cortex_gateway_usage_records_dropped",
            "Usage records that could not be kept (the database away and the buffer full)",
            registry=self.registry,
        )
        self.usage_buffered = Gauge(
            "cortex_gateway_usage_records_buffered", "Usage records waiting to be written",
            registry=self.registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self._usage_buffered = usage_buffered
        self._backends = backends
        self._waiting = waiting
        self._live_labels: set[tuple[str, ...]] = set()
        # Per request-path series (counters and histograms, never removed):
        # the labelled child, looked up once instead of per request.
        self._children: dict[tuple[object, ...], Any] = {}
        self._live_models: set[str] = set()
        self._live_classes: set[tuple[str, str]] = set()
        # Set by the supervisor for every worker; read once, here, not per scrape.
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

    def child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept: the request path asks for the
        same few series again and again. Only for series never removed."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def refresh(self) -> None:
        """Set the gauges from the live backends and queues."""
        seen: set[tuple[str, ...]] = set()
        for b in self._backends():
            labels = (b.model, b.engine, b.name)
            seen.add(labels)
            self.backend_up.labels(*labels).set(1.0 if b.routable else 0.0)
            self.backend_draining.labels(*labels).set(1.0 if b.draining else 0.0)
            self.breaker_state.labels(*labels).set(BREAKER_VALUES[b.breaker.state])
            # This worker's own: the series adds up over the live workers.
            self.in_flight.labels(*labels).set(b.own_in_flight)
        self.usage_buffered.set(self._usage_buffered())
        waiting = self._waiting()
        for model, by_class in waiting.items():
            self.queue_depth.labels(model).set(sum(by_class.values()))
            for name, count in by_class.items():
                self.class_queue_depth.labels(model, name).set(count)
        # Backends and models gone after a reload: zero them, then drop them.
        # (A worker's multiprocess file keeps the zero until the worker restarts.)
        for gone in self._live_labels - seen:
            for gauge in (self.backend_up, self.backend_draining, self.breaker_state, self.in_flight):
                gauge.labels(*gone).set(0)
                gauge.remove(*gone)
        for gone in self._live_models - set(waiting):
            self.queue_depth.labels(gone).set(0)
            self.queue_depth.remove(gone)
        for gone_class in self._live_classes - {(m, c) for m, by in waiting.items() for c in by}:
            self.class_queue_depth.labels(*gone_class).set(0)
            self.class_queue_depth.remove(*gone_class)
        self._live_classes = {(m, c) for m, by in waiting.items() for c in by}
        self._live_labels, self._live_models = seen, set(waiting)

    def collect_registry(self) -> CollectorRegistry:
        """The registry to read: this process's, or every worker's files."""
        self.refresh()
        if self.multiprocess_dir is None:
            return self.registry
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)
        return merged

    def count_usage(self, model: str, engine: str, usage: dict | None, backend: str | None = None) -> None:
        if not usage:
            return
        for kind in ("prompt_tokens", "completion_tokens"):
            value = usage.get(kind)
            if isinstance(value, int) and value >= 0:
                self.child(self.tokens, model, engine, kind.removesuffix("_tokens")).inc(value)
        prompt, cached = usage.get("prompt_tokens"), cached_tokens(usage)
        if backend is not None and cached is not None and isinstance(prompt, int) and prompt >= 0:
            hit = min(cached, prompt)
            self.child(self.prompt_cache, model, engine, backend, "hit").inc(hit)
            self.child(self.prompt_cache, model, engine, backend, "miss").inc(prompt - hit)

    def exposition(self) -> bytes:
        return generate_latest(self.collect_registry())


def usage_of(body: bytes) -> dict | None:
    """The `usage` object of a whole JSON answer (or of one stream event), if
    it has one; llama.cpp's `timings.cache_n` stands in for
    `prompt_tokens_details.cached_tokens` when only it is there."""
    try:
        answer = json.loads(body)
        usage = answer.get("usage")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    if not isinstance(usage, dict):
        return None
    timings = answer.get("timings")
    if cached_tokens(usage) is None and isinstance(timings, dict):
        cache_n = timings.get("cache_n")
        if isinstance(cache_n, int) and cache_n >= 0:
            usage = {**usage, "prompt_tokens_details": {"cached_tokens": cache_n}}
    return usage


def cached_tokens(usage: dict) -> int | None:
    """Prompt tokens the engine reported taking from its cache, if it reported them."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and not isinstance(cached, bool) and cached >= 0 else None


class StreamUsage:
    """Finds the last `usage` of an SSE stream from a bounded tail of it."""

    TAIL = 8192

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        self._tail = (self._tail + chunk)[-self.TAIL :]

    def usage(self) -> dict | None:
        for line in reversed(self._tail.split(b"\n")):
            line = line.strip()
            if line.startswith(b"data: {") and b'"usage"' in line:
                found = usage_of(line[6:])
                if found:
                    return found
        return None


class StreamTap:
    """Sees a relayed stream's chunks: time to the first one, and the usage at the end."""

    def __init__(
        self,
        metrics: Metrics,
        model: str,
        engine: str,
        started: float,
        clock: Callable[[], float],
        on_first: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self._ttft = metrics.child(metrics.ttft, model, engine)
        self._started = started
        self._clock = clock
        self._on_first = on_first
        self.first_chunk: float | None = None
        self.usage = StreamUsage()

    def __call__(self, chunk: bytes) -> None:
        if self.first_chunk is None:
            self.first_chunk = self._clock()
            self._ttft.observe(self.first_chunk - self._started)
            if self._on_first is not None:
                self._on_first()
        self.usage.feed(chunk)
