"""Prometheus metrics of one gateway, in its own registry (no global state).

Labels stay bounded: models and backends come from the config (an unknown
model is counted as "_unknown"), statuses are HTTP codes the gateway answers
with, and gauges are read from the live objects when scraped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .backends import Backend, Health
from .breaker import BreakerState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
BREAKER_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class _LiveState(Collector):
    """Gauges read from the backends and queues at scrape time."""

    def __init__(self, backends: Callable[[], Iterable[Backend]], waiting: Callable[[], dict[str, int]]):
        self._backends = backends
        self._waiting = waiting

    def collect(self):
        health = GaugeMetricFamily(
            "cortex_gateway_backend_up", "1 when the backend is ready", labels=["model", "engine", "backend"]
        )
        state = GaugeMetricFamily(
            "cortex_gateway_breaker_state",
            "Circuit breaker per backend: 0 closed, 1 half-open, 2 open",
            labels=["model", "engine", "backend"],
        )
        in_flight = GaugeMetricFamily(
            "cortex_gateway_in_flight",
            "Requests running on the backend",
            labels=["model", "engine", "backend"],
        )
        for b in self._backends():
            labels = [b.model, b.engine, b.name]
            health.add_metric(labels, 1.0 if b.health is Health.READY else 0.0)
            state.add_metric(labels, BREAKER_VALUES[b.breaker.state])
            in_flight.add_metric(labels, b.outstanding)
        queued = GaugeMetricFamily(
            "cortex_gateway_queue_depth", "Requests waiting for a slot", labels=["model"]
        )
        for model, count in sorted(self._waiting().items()):
            queued.add_metric([model], count)
        yield from (health, state, in_flight, queued)


class Metrics:
    def __init__(
        self, backends: Callable[[], Iterable[Backend]], waiting: Callable[[], dict[str, int]]
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
            "Time waited for a free engine slot",
            ["model"],
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
        self.registry.register(_LiveState(backends, waiting))

    def count_usage(self, model: str, engine: str, usage: dict | None) -> None:
        if not usage:
            return
        for kind in ("prompt_tokens", "completion_tokens"):
            value = usage.get(kind)
            if isinstance(value, int) and value >= 0:
                self.tokens.labels(model, engine, kind.removesuffix("_tokens")).inc(value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def usage_of(body: bytes) -> dict | None:
    """The `usage` object of a whole JSON answer, if it has one."""
    try:
        usage = json.loads(body).get("usage")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return usage if isinstance(usage, dict) else None


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
        self, metrics: Metrics, model: str, engine: str, started: float, clock: Callable[[], float]
    ) -> None:
        self._ttft = metrics.ttft.labels(model, engine)
        self._started = started
        self._clock = clock
        self.first_chunk: float | None = None
        self.usage = StreamUsage()

    def __call__(self, chunk: bytes) -> None:
        if self.first_chunk is None:
            self.first_chunk = self._clock()
            self._ttft.observe(self.first_chunk - self._started)
        self.usage.feed(chunk)
