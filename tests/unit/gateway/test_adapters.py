"""LoRA adapters served as model names: routed to their parent's replicas, the
llama.cpp `lora` field set by the gateway on every request of such a model,
listed with their parent, and subject to the keys' allowlists."""

from __future__ import annotations

import asyncio
import json

import pytest
from cortex_gateway.auth import hash_key
from cortex_gateway.config import ConfigError, parse_config

from .conftest import AUTH, CLIENT_KEY, FakeEngine, make_config
from .test_resilience import wait_ready

ADAPTERS = [{"name": "chat-pirate", "scale": 0.8}, {"name": "chat-legal"}]


def with_adapters(url: str, engine: str = "llamacpp", **key_policy) -> dict:
    config = make_config({"chat": [url], "other": [url]})
    config["models"][0]["adapters"] = ADAPTERS
    config["models"][0]["engine"] = engine
    config["auth"]["api_keys"] = [{"name": "tests", "sha256": hash_key(CLIENT_KEY), **key_policy}]
    return config


def sent(engine: FakeEngine) -> dict:
    return json.loads(engine.received[-1][1])


async def assert_sent_as_it_came(client, engine: FakeEngine, path: str, raw: bytes) -> None:
    """The engine got the client's bytes, nothing set or reordered."""
    headers = {**AUTH, "Content-Type": "application/json"}
    assert (await client.post(path, data=raw, headers=headers)).status == 200
    assert engine.received[-1][1] == raw


async def test_an_adapter_runs_on_its_parent_with_only_itself_applied(engine_server, gateway_client):
    engine = FakeEngine()
    client = await gateway_client(with_adapters(await engine_server(engine)))
    await wait_ready(client, "chat", 1)
    answer = await client.post(
        "/v1/chat/completions", json={"model": "chat-pirate", "messages": []}, headers=AUTH
    )
    assert answer.status == 200
    assert sent(engine)["lora"] == [{"id": 0, "scale": 0.8}, {"id": 1, "scale": 0.0}]
    answer = await client.post(
        "/v1/chat/completions", json={"model": "chat-legal", "messages": []}, headers=AUTH
    )
    assert answer.status == 200
    assert sent(engine)["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]
    # The rest of the body is the client's.
    assert sent(engine)["model"] == "chat-legal"
    assert sent(engine)["messages"] == []


async def test_the_base_model_gets_every_adapter_at_zero_whatever_the_client_sent(
    engine_server, gateway_client
):
    """llama.cpp applies the adapters a request's `lora` names; a client of the
    base model (or one whose key may not use an adapter) cannot turn one on."""
    engine = FakeEngine()
    client = await gateway_client(with_adapters(await engine_server(engine), models=["chat"]))
    await wait_ready(client, "chat", 1)
    body = {"model": "chat", "messages": [], "lora": [{"id": 0, "scale": 1.0}]}
    assert (await client.post("/v1/chat/completions", json=body, headers=AUTH)).status == 200
    assert sent(engine)["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]


async def test_a_model_without_adapters_gets_the_body_byte_for_byte(engine_server, gateway_client):
    engine = FakeEngine()
    client = await gateway_client(with_adapters(await engine_server(engine)))
    await wait_ready(client, "other", 1)
    await assert_sent_as_it_came(
        client, engine, "/v1/completions", b'{"model": "other", "lora": [{"id": 0}]}'
    )


async def test_a_streamed_adapter_request_is_relayed(engine_server, gateway_client):
    engine = FakeEngine()
    client = await gateway_client(with_adapters(await engine_server(engine)))
    await wait_ready(client, "chat", 1)
    answer = await client.post(
        "/v1/chat/completions", json={"model": "chat-pirate", "stream": True, "messages": []}, headers=AUTH
    )
    assert answer.status == 200
    assert (await answer.read()).endswith(b"data: [DONE]\n\n")
    assert sent(engine)["lora"][0] == {"id": 0, "scale": 0.8}


async def test_vllm_gets_the_adapter_name_and_the_body_as_it_came(engine_server, gateway_client):
    engine = FakeEngine()
    client = await gateway_client(with_adapters(await engine_server(engine), engine="vllm"))
    await wait_ready(client, "chat", 1)
    await assert_sent_as_it_came(
        client, engine, "/v1/chat/completions", b'{"model": "chat-pirate", "messages": []}'
    )


async def test_models_lists_adapters_with_their_parent(engine_server, gateway_client):
    client = await gateway_client(with_adapters(await engine_server(FakeEngine())))
    listed = (await (await client.get("/v1/models", headers=AUTH)).json())["data"]
    by_id = {card["id"]: card for card in listed}
    assert set(by_id) == {"chat", "chat-pirate", "chat-legal", "other"}
    assert by_id["chat-pirate"]["parent"] == "chat"
    assert by_id["chat-pirate"]["engine"] == "llamacpp"
    assert "parent" not in by_id["chat"]
    one = await client.get("/v1/models/chat-legal", headers=AUTH)
    assert one.status == 200
    assert (await one.json())["parent"] == "chat"


async def test_an_unknown_adapter_is_a_404(engine_server, gateway_client):
    engine = FakeEngine()
    client = await gateway_client(with_adapters(await engine_server(engine)))
    await wait_ready(client, "chat", 1)
    answer = await client.post("/v1/chat/completions", json={"model": "chat-sailor"}, headers=AUTH)
    assert answer.status == 404
    assert (await answer.json())["error"]["code"] == "model_not_found"
    assert (await client.get("/v1/models/chat-sailor", headers=AUTH)).status == 404
    assert engine.received == []


async def test_a_key_allowed_the_base_model_is_refused_its_adapters_and_back(engine_server, gateway_client):
    engine = FakeEngine()
    client = await gateway_client(with_adapters(await engine_server(engine), models=["chat"]))
    await wait_ready(client, "chat", 1)
    refused = await client.post("/v1/chat/completions", json={"model": "chat-pirate"}, headers=AUTH)
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "model_not_allowed"
    client = await gateway_client(with_adapters(await engine_server(engine), models=["chat-pirate"]))
    await wait_ready(client, "chat", 1)
    assert (
        await client.post("/v1/chat/completions", json={"model": "chat-pirate"}, headers=AUTH)
    ).status == 200
    assert (await client.post("/v1/chat/completions", json={"model": "chat"}, headers=AUTH)).status == 403


async def test_adapter_requests_are_counted_under_their_own_name(engine_server, gateway_client):
    client = await gateway_client(with_adapters(await engine_server(FakeEngine())))
    await wait_ready(client, "chat", 1)
    await client.post("/v1/chat/completions", json={"model": "chat-pirate"}, headers=AUTH)
    text = await (await client.get("/metrics")).text()
    assert 'cortex_gateway_requests_total{backend="' in text
    assert 'model="chat-pirate"' in text


async def test_an_adapter_shares_its_parents_slots(engine_server, gateway_client):
    """Two slots on the one replica: one base and one adapter request fill them."""
    engine = FakeEngine(delay=0.3)
    client = await gateway_client(with_adapters(await engine_server(engine)))
    await wait_ready(client, "chat", 1)
    first = asyncio.create_task(client.post("/v1/completions", json={"model": "chat"}, headers=AUTH))
    second = asyncio.create_task(client.post("/v1/completions", json={"model": "chat-pirate"}, headers=AUTH))
    await asyncio.sleep(0.1)
    backend = client.gateway.router.backends("chat")[0]
    assert backend.outstanding == 2
    assert [r.status for r in await asyncio.gather(first, second)] == [200, 200]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["models"][0].update(adapters=[{"name": "other"}]),
            "'other' is also the name of a model",
        ),
        (
            lambda c: c["models"][1].update(adapters=[{"name": "chat-pirate"}]),
            "'chat-pirate' is also the name of an adapter of 'chat'",
        ),
        (lambda c: c["models"][0].update(adapters=[{"name": "x", "scale": 0}]), "adapters[0].scale"),
        (lambda c: c["models"][0].update(adapters=[{"name": "x", "rank": 8}]), "adapters[0].rank: unknown"),
        (
            lambda c: c["auth"]["api_keys"][0].update(models=["chat-sailor"]),
            "'chat-sailor', a model that is not",
        ),
    ],
)
def test_bad_adapter_configs_name_the_field(change, message):
    config = with_adapters("http://127.0.0.1:9")
    change(config)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(config)


def test_a_key_may_be_allowed_an_adapter():
    config = parse_config(with_adapters("http://127.0.0.1:9", models=["chat-legal"]))
    assert config.served("chat-legal") == ("chat", config.adapters["chat-legal"])
    assert config.served("chat") == ("chat", None)
