"""A model whose engine spans hosts: its first rank's /health answered 200
while a lost rank made every request hang (seen with vLLM on two hosts). The
gateway's health round sends such a model a 1-token request, and a model that
cannot answer one is unavailable, while the other models serve."""

from __future__ import annotations

import asyncio

from cortex_gateway.backends import Health

from .conftest import AUTH, FakeEngine, make_config
from .test_resilience import wait_ready


async def test_a_group_that_hangs_behind_a_healthy_health_endpoint_turns_unavailable(
    engine_server, gateway_client, monkeypatch
):
    monkeypatch.setattr("cortex_gateway.backends.PROBE_SECONDS", 0.3)
    group, probed_alone, other = FakeEngine(), FakeEngine(), FakeEngine()
    config = make_config(
        {"spanning": [await engine_server(group)], "not-probed": [await engine_server(probed_alone)],
         "other": [await engine_server(other)]},
        health={"interval": 0.1, "unhealthy_after": 2},
    )  # fmt: skip
    config["models"][0]["health_probe"] = "completion"
    client = await gateway_client(config)
    await wait_ready(client, "spanning", 1)
    # Healthy: the probe is a real 1-token completion for the model.
    assert any(b'"max_tokens": 1' in body or b'"max_tokens":1' in body for _p, body, _k in group.received)
    # A rank is lost: /health still answers 200, every request hangs.
    group.delay = probed_alone.delay = 30
    backend = client.gateway.router.backends("spanning")[0]
    for _round in range(100):
        if backend.health is Health.UNHEALTHY:
            break
        await asyncio.sleep(0.1)
    assert backend.health is Health.UNHEALTHY
    answer = await client.post(
        "/v1/chat/completions", json={"model": "spanning", "messages": []}, headers=AUTH
    )
    assert answer.status == 503
    assert answer.headers["Retry-After"]
    assert (await answer.json())["error"]["code"] == "model_unavailable"
    # A model without the probe is judged by /health alone; the others serve.
    assert client.gateway.router.backends("not-probed")[0].health is Health.READY
    answer = await client.post("/v1/chat/completions", json={"model": "other", "messages": []}, headers=AUTH)
    assert answer.status == 200
