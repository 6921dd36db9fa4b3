"""SIGHUP reloads the config: new models and backends appear, kept backends keep
their state, requests in flight finish, and a bad file leaves the running config."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import yaml
from cortex_gateway.app import Gateway
from cortex_gateway.config import load_config

from .conftest import AUTH, FakeEngine, gateway_process, make_config


async def model_ids(client) -> list[str]:
    response = await client.get("/v1/models", headers=AUTH)
    return sorted(m["id"] for m in (await response.json())["data"])


async def test_reload_adds_models_and_keeps_backends(engine_server, aiohttp_client, tmp_path):
    first, second = await engine_server(FakeEngine()), await engine_server(FakeEngine())
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(make_config({"chat": [first]})))
    gateway = Gateway(load_config(str(path)), config_path=str(path))
    client = await aiohttp_client(gateway.build_app())
    kept = gateway.router.backends("chat")[0]
    assert await model_ids(client) == ["chat"]

    path.write_text(yaml.safe_dump(make_config({"chat": [first], "embed": [second]})))
    assert await gateway.reload() is True
    assert await model_ids(client) == ["chat", "embed"]
    assert gateway.router.backends("chat")[0] is kept  # health and load carry over
    # The new backend was checked before it is routed to.
    response = await client.post("/v1/completions", json={"model": "embed", "prompt": "x"}, headers=AUTH)
    assert response.status == 200


async def test_a_bad_file_keeps_the_running_config(engine_server, aiohttp_client, tmp_path, caplog):
    url = await engine_server(FakeEngine())
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(make_config({"chat": [url]})))
    gateway = Gateway(load_config(str(path)), config_path=str(path))
    client = await aiohttp_client(gateway.build_app())
    path.write_text("models: [{name: broken}]\n")
    assert await gateway.reload() is False
    assert await model_ids(client) == ["chat"]
    assert "config reload failed, keeping the running config" in caplog.text


async def test_sighup_reloads_a_running_gateway_without_cutting_a_stream(engine_server, tmp_path):
    slow = FakeEngine(chunks=6, chunk_delay=0.25)
    first, second = await engine_server(slow), await engine_server(FakeEngine())
    async with (
        gateway_process(make_config({"chat": [first]}), tmp_path) as gateway,
        aiohttp.ClientSession() as session,
    ):

        async def stream() -> bytes:
            body = {"model": "chat", "stream": True, "messages": []}
            async with session.post(
                gateway.base + "/v1/chat/completions", json=body, headers=AUTH
            ) as response:
                return await response.read()

        in_flight = asyncio.create_task(stream())
        await asyncio.sleep(0.3)  # the stream is under way
        config = gateway.config
        config["models"] = make_config({"chat": [first], "embed": [second]})["models"]
        gateway.config_path.write_text(yaml.safe_dump(config))
        gateway.process.send_signal(signal.SIGHUP)
        names: list[str] = []
        for _attempt in range(50):
            async with session.get(gateway.base + "/v1/models", headers=AUTH) as response:
                names = sorted(m["id"] for m in (await response.json())["data"])
            if names == ["chat", "embed"]:
                break
            await asyncio.sleep(0.1)
        assert names == ["chat", "embed"]
        body = await asyncio.wait_for(in_flight, 10)
        assert body.endswith(b"data: [DONE]\n\n")
        assert body.count(b"data: ") == 7  # 6 chunks and [DONE] (no usage event: not asked for)
        assert gateway.process.returncode is None
