"""Per-key limits: allowed models, requests and tokens per minute, open streams."""

from __future__ import annotations

import asyncio

import pytest
from cortex_gateway.auth import hash_key
from cortex_gateway.config import ConfigError, parse_config
from cortex_gateway.limits import KeyPolicy, Limiter, Refusal

from .conftest import AUTH, CLIENT_KEY, FakeEngine, make_config
from .test_resilience import wait_ready


def limited(url: str, **policy) -> dict:
    config = make_config({"chat": [url], "embed": [url]})
    config["auth"]["api_keys"] = [{"name": "tests", "sha256": hash_key(CLIENT_KEY), **policy}]
    return config


def test_the_minute_slides():
    limiter = Limiter({"k": KeyPolicy(requests_per_minute=2)})
    limiter.admit("k", "m", False, now=1000.0)
    limiter.admit("k", "m", False, now=1030.0)
    with pytest.raises(Refusal) as info:
        limiter.admit("k", "m", False, now=1059.0)
    assert info.value.status == 429
    assert info.value.retry_after == 1  # the first request leaves the minute at 1060
    limiter.admit("k", "m", False, now=1060.5)


def test_tokens_count_after_the_answer():
    limiter = Limiter({"k": KeyPolicy(tokens_per_minute=100)})
    limiter.admit("k", "m", False, now=0.0)
    limiter.done("k", False, 120, now=1.0)
    with pytest.raises(Refusal, match="over its 100 tokens per minute"):
        limiter.admit("k", "m", False, now=2.0)


async def test_a_key_uses_only_its_models(engine_server, gateway_client):
    client = await gateway_client(limited(await engine_server(FakeEngine()), models=["chat"]))
    await wait_ready(client, "chat", 1)
    assert (await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)).status == 200
    refused = await client.post("/v1/completions", json={"model": "embed"}, headers=AUTH)
    assert refused.status == 403
    body = await refused.json()
    assert body["error"]["code"] == "model_not_allowed"
    assert body["error"]["type"] == "permission_error"


async def test_requests_per_minute_answer_429_with_retry_after(engine_server, gateway_client):
    client = await gateway_client(
        limited(await engine_server(FakeEngine()), limits={"requests_per_minute": 3})
    )
    await wait_ready(client, "chat", 1)
    statuses = [
        (await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)).status
        for _attempt in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    refused = await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


async def test_open_streams_are_limited(engine_server, gateway_client):
    slow = FakeEngine(chunks=4, chunk_delay=0.2)
    client = await gateway_client(limited(await engine_server(slow), limits={"concurrent_streams": 1}))
    await wait_ready(client, "chat", 1)
    first = await client.post("/v1/chat/completions", json={"model": "chat", "stream": True}, headers=AUTH)
    second = await client.post("/v1/chat/completions", json={"model": "chat", "stream": True}, headers=AUTH)
    assert second.status == 429
    assert (await second.json())["error"]["code"] == "concurrent_streams_exceeded"
    await first.read()
    await asyncio.sleep(0.05)
    third = await client.post("/v1/chat/completions", json={"model": "chat", "stream": True}, headers=AUTH)
    assert third.status == 200
    await third.read()


def test_a_key_allowed_a_model_nobody_serves_is_a_config_error():
    with pytest.raises(ConfigError, match="the key 'tests' is allowed 'gpt-9', a model that is not served"):
        parse_config(limited("http://127.0.0.1:9", models=["gpt-9"]))
