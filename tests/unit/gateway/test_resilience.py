"""The circuit breaker and the bounded admission queue, alone and in the gateway."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from cortex_gateway.breaker import BreakerPolicy, BreakerState, CircuitBreaker, Failure

from .conftest import AUTH, FakeEngine, make_config

POLICY = BreakerPolicy(window=10, min_samples=4, failure_rate=0.5, cooldown=5.0)


def test_a_refused_connection_opens_the_breaker_at_once():
    breaker = CircuitBreaker(POLICY)
    breaker.record_failure(Failure.REFUSED, now=100.0)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allows(now=104.0)
    assert breaker.allows(now=105.0)  # cooldown over: one trial
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allows(now=105.1)  # only one trial at a time
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allows(now=105.2)


def test_a_failed_trial_opens_it_again():
    breaker = CircuitBreaker(POLICY)
    breaker.record_failure(Failure.REFUSED, now=0.0)
    assert breaker.allows(now=6.0)
    breaker.record_failure(Failure.TIMEOUT, now=6.0)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allows(now=10.0)


def test_the_failure_rate_opens_it_after_the_minimum_sample():
    breaker = CircuitBreaker(POLICY)
    for outcome in (True, False, True):
        breaker.record_success() if outcome else breaker.record_failure(Failure.TIMEOUT, now=1.0)
    assert breaker.state is BreakerState.CLOSED  # 3 samples: below the minimum
    breaker.record_failure(Failure.TIMEOUT, now=1.0)
    assert breaker.state is BreakerState.OPEN  # 2 of 4 failed


def test_a_cut_stream_opens_the_breaker_at_once_unless_it_is_the_last_backend():
    breaker = CircuitBreaker(BreakerPolicy(min_samples=5, cooldown=10))
    breaker.record_failure(Failure.STREAM_CUT, now=1.0)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allows(now=5.0)
    last = CircuitBreaker(BreakerPolicy(min_samples=5, cooldown=10))
    last.record_failure(Failure.STREAM_CUT, last_ready=True, now=1.0)
    # A struggling backend beats none.
    assert last.state is BreakerState.CLOSED


def test_the_last_ready_backend_never_opens_on_rate_alone():
    breaker = CircuitBreaker(POLICY)
    for _attempt in range(10):
        breaker.record_failure(Failure.TIMEOUT, last_ready=True, now=1.0)
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure(Failure.REFUSED, last_ready=True, now=1.0)
    assert breaker.state is BreakerState.OPEN  # refusing connections is not a rate


def test_retry_after_keeps_it_open_at_least_that_long():
    breaker = CircuitBreaker(POLICY)
    breaker.record_failure(Failure.STATUS, retry_after=30.0, now=0.0)
    assert not breaker.allows(now=29.0)
    assert breaker.allows(now=30.0)


async def wait_ready(client, model: str, count: int) -> None:
    for _attempt in range(50):
        health = await (await client.get("/healthz")).json()
        if health["ready_backends"].get(model) == count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{model} never had {count} ready backends")


async def test_a_replica_that_dies_is_skipped_and_its_breaker_opens(gateway_client):
    dying, healthy = FakeEngine(), FakeEngine()
    dying_server = TestServer(dying.app(), host="127.0.0.1")
    healthy_server = TestServer(healthy.app(), host="127.0.0.1")
    await dying_server.start_server()
    await healthy_server.start_server()
    urls = [str(s.make_url("")).rstrip("/") for s in (dying_server, healthy_server)]
    client = await gateway_client(make_config({"chat": urls}, health={"interval": 30, "unhealthy_after": 5}))
    await wait_ready(client, "chat", 2)
    await dying_server.close()  # killed: connections are refused from now on
    try:
        statuses = []
        for _attempt in range(6):
            response = await client.post("/v1/chat/completions", json={"model": "chat"}, headers=AUTH)
            statuses.append(response.status)
        assert statuses == [200] * 6
        dead = next(b for b in client.gateway.router.backends("chat") if b.url == urls[0])
        assert dead.breaker.state is BreakerState.OPEN
        assert len(healthy.received) == 6
    finally:
        await healthy_server.close()


async def test_an_engine_503_with_retry_after_is_honoured(engine_server, gateway_client):
    busy = FakeEngine(status=503, retry_after="40")
    fine = FakeEngine()
    urls = [await engine_server(busy), await engine_server(fine)]
    client = await gateway_client(make_config({"chat": urls}))
    await wait_ready(client, "chat", 2)
    for _attempt in range(4):
        response = await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)
        assert response.status == 200
    breaker = next(b for b in client.gateway.router.backends("chat") if b.url == urls[0]).breaker
    assert breaker.state is BreakerState.OPEN
    assert len(busy.received) == 1  # tried once, then left alone for 40 s


async def test_a_full_queue_answers_429_with_retry_after(engine_server, gateway_client):
    slow = FakeEngine(delay=0.6)
    url = await engine_server(slow)
    config = make_config({"chat": [url]}, queue={"per_slot": 1, "max_wait": 5})
    config["models"][0]["backends"][0]["max_concurrency"] = 1
    client = await gateway_client(config)
    await wait_ready(client, "chat", 1)

    async def ask():
        return await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)

    running = asyncio.create_task(ask())
    await asyncio.sleep(0.1)
    queued = asyncio.create_task(ask())
    await asyncio.sleep(0.1)
    refused = await ask()  # one slot busy, the one queue place taken
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    body = await refused.json()
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "queue_full"
    assert (await running).status == 200
    assert (await queued).status == 200  # it waited for the slot


async def test_a_wait_beyond_the_maximum_is_a_429(engine_server, gateway_client):
    url = await engine_server(FakeEngine(delay=1.0))
    config = make_config({"chat": [url]}, queue={"per_slot": 4, "max_wait": 0.2})
    config["models"][0]["backends"][0]["max_concurrency"] = 1
    client = await gateway_client(config)
    await wait_ready(client, "chat", 1)
    running = asyncio.create_task(client.post("/v1/completions", json={"model": "chat"}, headers=AUTH))
    await asyncio.sleep(0.1)
    waited = await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)
    assert waited.status == 429
    assert (await running).status == 200


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"breaker": {"failure_rate": 2}}, "breaker.failure_rate: must be at most 1"),
        (
            {"breaker": {"window": 3, "min_samples": 5}},
            "breaker.min_samples: must be between 1 and breaker.window",
        ),
        ({"queue": {"max_wait": 0}}, "queue.max_wait: must be greater than 0"),
        ({"queue": {"depth": 3}}, "queue.depth: unknown option"),
    ],
)
def test_bad_policies_name_the_field(section, message):
    from cortex_gateway.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=message):
        parse_config(make_config({"chat": ["http://127.0.0.1:9"]}, **section))


@pytest.mark.parametrize(
    "stale",
    [
        aiohttp.ServerDisconnectedError(),
        # What aiohttp raises when a reused connection was reset under it (an
        # engine container replaced while the connection sat in the pool).
        aiohttp.ClientOSError(32, "Can not write request body for http://127.0.0.1:1/v1/completions"),
    ],
    ids=["closed", "reset"],
)
async def test_a_connection_the_engine_closed_while_idle_is_retried(engine_server, gateway_client, stale):
    engine = FakeEngine()
    url = await engine_server(engine)
    client = await gateway_client(make_config({"chat": [url]}))
    await wait_ready(client, "chat", 1)
    session = client.gateway.session
    original = session.post
    calls = []

    async def flaky_post(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise stale
        return await original(*args, **kwargs)

    session.post = flaky_post
    try:
        response = await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)
    finally:
        session.post = original
    assert response.status == 200
    assert len(calls) == 2
    assert len(engine.received) == 1


async def test_a_refused_connection_is_not_sent_again(gateway_client):
    server = TestServer(FakeEngine().app(), host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    client = await gateway_client(make_config({"chat": [url]}, health={"interval": 30, "unhealthy_after": 5}))
    await wait_ready(client, "chat", 1)
    await server.close()  # killed: connections are refused from now on
    session = client.gateway.session
    original = session.post
    calls = []

    async def counted_post(*args, **kwargs):
        calls.append(1)
        return await original(*args, **kwargs)

    session.post = counted_post
    try:
        response = await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)
    finally:
        session.post = original
    assert response.status == 502
    assert len(calls) == 1


async def test_a_models_own_first_byte_timeout_wins(engine_server, gateway_client):
    slow, quick = FakeEngine(delay=0.5), FakeEngine(delay=0.5)
    config = make_config({"slow": [await engine_server(slow)], "quick": [await engine_server(quick)]})
    config["timeouts"] = {"first_byte": 5}
    config["models"][1]["timeouts"] = {"first_byte": 0.2}
    client = await gateway_client(config)
    await wait_ready(client, "slow", 1)
    await wait_ready(client, "quick", 1)
    assert (await client.post("/v1/completions", json={"model": "slow"}, headers=AUTH)).status == 200
    timed_out = await client.post("/v1/completions", json={"model": "quick"}, headers=AUTH)
    assert timed_out.status == 504
    assert "no answer within 0.2s" in (await timed_out.json())["error"]["message"]
