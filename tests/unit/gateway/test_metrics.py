"""Prometheus metrics, usage taken from answers and streams, and the overhead header."""

from __future__ import annotations

import pytest
from cortex_gateway.app import Gateway
from cortex_gateway.config import parse_config
from prometheus_client.parser import text_string_to_metric_families

from .conftest import AUTH, FakeEngine, make_config
from .test_resilience import wait_ready


async def scrape(client) -> dict[tuple[str, tuple], float]:
    response = await client.get("/metrics")  # no key: Prometheus scrapes it
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    """A series' value; a series that is not there fails the test (it is not a 0)."""
    key = (name, tuple(sorted(labels.items())))
    if key not in samples:
        same_name = sorted(labels for series, labels in samples if series == name)
        raise AssertionError(f"no series {name}{dict(labels)}; with that name: {same_name}")
    return samples[key]


async def test_requests_tokens_and_live_state_are_counted(engine_server, gateway_client):
    url = await engine_server(FakeEngine(chunks=4))
    client = await gateway_client(make_config({"chat": [url]}))
    await wait_ready(client, "chat", 1)
    backend = url.removeprefix("http://")
    answer = await client.post("/v1/chat/completions", json={"model": "chat"}, headers=AUTH)
    assert answer.status == 200
    stream = await client.post("/v1/chat/completions", json={"model": "chat", "stream": True}, headers=AUTH)
    await stream.read()
    missing = await client.post("/v1/chat/completions", json={"model": "nope"}, headers=AUTH)
    assert missing.status == 404

    samples = await scrape(client)
    labels = {"model": "chat", "engine": "llamacpp"}
    assert value(samples, "cortex_gateway_requests_total", backend=backend, status="200", **labels) == 2
    assert (
        value(
            samples,
            "cortex_gateway_requests_total",
            model="_unknown",
            engine="none",
            backend="none",
            status="404",
        )
        == 1
    )
    # 3 + 5 prompt tokens, 1 + 4 completion tokens: from the answer, and from the stream's last event.
    assert value(samples, "cortex_gateway_tokens_total", kind="prompt", **labels) == 8
    assert value(samples, "cortex_gateway_tokens_total", kind="completion", **labels) == 5
    assert value(samples, "cortex_gateway_time_to_first_token_seconds_count", **labels) == 1
    assert value(samples, "cortex_gateway_request_duration_seconds_count", **labels) == 2
    assert value(samples, "cortex_gateway_backend_up", backend=backend, **labels) == 1
    assert value(samples, "cortex_gateway_breaker_state", backend=backend, **labels) == 0
    assert value(samples, "cortex_gateway_in_flight", backend=backend, **labels) == 0


class SteppedClock:
    """A clock that moves only when told: the engine's time, nothing else."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TimedEngine(FakeEngine):
    """Takes 0.2 s of the gateway's clock per answer (and per stream chunk)."""

    def __init__(self, clock: SteppedClock, **kw) -> None:
        super().__init__(**kw)
        self.clock = clock

    async def complete(self, request):
        self.clock.now += 0.2
        return await super().complete(request)


async def test_every_answer_says_the_gateways_own_time(engine_server, aiohttp_client):
    clock = SteppedClock()
    url = await engine_server(TimedEngine(clock))
    gateway = Gateway(parse_config(make_config({"chat": [url]})), clock=clock)
    client = await aiohttp_client(gateway.build_app())
    await wait_ready(client, "chat", 1)
    answer = await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)
    # All 200 ms on the clock were the engine's: the gateway's own share is nothing.
    assert answer.headers["X-Cortex-Overhead-Ms"] == "0.000"
    stream = await client.post("/v1/chat/completions", json={"model": "chat", "stream": True}, headers=AUTH)
    assert stream.headers["X-Cortex-Overhead-Ms"] == "0.000"
    await stream.read()
    samples = await scrape(client)
    labels = {"model": "chat", "engine": "llamacpp"}
    assert value(samples, "cortex_gateway_request_duration_seconds_count", **labels) == 2
    assert value(samples, "cortex_gateway_request_duration_seconds_sum", **labels) == pytest.approx(0.4)
    assert value(samples, "cortex_gateway_overhead_seconds_sum", **labels) == 0.0
