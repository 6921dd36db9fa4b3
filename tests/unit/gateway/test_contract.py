"""The request path keeps its contract under engine faults: an OpenAI-style
error body and a counted request for every way an upstream answer can fail,
5xx answers counted against the engine's breaker and sent to another replica,
bounded reads, and usage records that are never silently lost."""

from __future__ import annotations

from cortex_gateway.breaker import BreakerState

from .conftest import AUTH, FakeEngine, make_config
from .test_metrics import scrape, value
from .test_resilience import wait_ready


async def test_an_engine_refusing_with_503_fails_and_another_replica_answers(engine_server, gateway_client):
    """A 503 says the engine did not take the request: it goes to another
    replica, and counts against the refusing one's breaker. (An engine's 500
    is the request's own answer: test_request_semantics.py.)"""
    broken, fine = FakeEngine(status=503), FakeEngine()
    urls = [await engine_server(broken), await engine_server(fine)]
    client = await gateway_client(make_config({"chat": urls}))
    await wait_ready(client, "chat", 2)
    statuses = []
    for _request in range(10):
        response = await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)
        statuses.append(response.status)
    assert statuses == [200] * 10
    backend = next(b for b in client.gateway.router.backends("chat") if b.url == urls[0])
    # Every 503 was a failure of that engine, and it was soon left alone.
    assert list(backend.breaker.outcomes) == [False] * len(broken.received)
    assert len(broken.received) <= 3
    assert backend.breaker.state is BreakerState.OPEN or not backend.routable


async def test_a_models_only_replica_answering_500_passes_its_error_on(engine_server, gateway_client):
    url = await engine_server(FakeEngine(status=500))
    client = await gateway_client(make_config({"chat": [url]}))
    await wait_ready(client, "chat", 1)
    response = await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)
    assert response.status in (500, 502)
    body = await response.json()
    assert set(body) == {"error"}


async def test_an_answer_cut_midway_is_an_openai_error_and_is_counted(engine_server, gateway_client):
    url = await engine_server(FakeEngine(cut_answer=True, answer_bytes=200_000))
    client = await gateway_client(make_config({"chat": [url]}))
    await wait_ready(client, "chat", 1)
    response = await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)
    assert response.status == 502
    assert response.content_type == "application/json"
    error = (await response.json())["error"]
    assert error["code"] == "upstream_answer_broken"
    samples = await scrape(client)
    backend = url.removeprefix("http://")
    assert value(samples, "cortex_gateway_requests_total", model="chat", engine="llamacpp",
                 backend=backend, status="502") == 1  # fmt: skip


async def test_an_answer_larger_than_the_bound_is_refused_not_held(engine_server, gateway_client):
    url = await engine_server(FakeEngine(answer_bytes=50_000))
    config = make_config({"chat": [url]}, limits={"max_body_bytes": 4096, "max_answer_bytes": 10_000})
    client = await gateway_client(config)
    await wait_ready(client, "chat", 1)
    response = await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)
    assert response.status == 502
    error = (await response.json())["error"]
    assert error["code"] == "upstream_answer_too_large"
    assert "10000 bytes" in error["message"]
