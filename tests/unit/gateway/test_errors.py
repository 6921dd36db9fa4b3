"""Every bad request gets an OpenAI-shaped error with the right status."""

from __future__ import annotations

import pytest

from .conftest import AUTH, FakeEngine, make_config


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, b'{"model": "m"}', 401, "invalid_api_key"),
        ({"Authorization": "Bearer wrong"}, b'{"model": "m"}', 401, "invalid_api_key"),
        ({"Authorization": "Basic abc"}, b'{"model": "m"}', 401, "invalid_api_key"),
        (AUTH, b"{not json", 400, "invalid_json"),
        (AUTH, b"\xff\xfe", 400, "invalid_json"),
        (AUTH, b"[1, 2]", 400, "invalid_json"),
        (AUTH, b'{"messages": []}', 400, None),
        (AUTH, b'{"model": 7}', 400, None),
        (AUTH, b'{"model": "m", "stream": "yes"}', 400, None),
        (AUTH, b'{"model": "nope"}', 404, "model_not_found"),
        (AUTH, b'{"model": "m", "pad": "' + b"x" * 5000 + b'"}', 413, "request_too_large"),
    ],
)
async def test_bad_request_gets_openai_error(engine_server, gateway_client, headers, body, status, code):
    engine = FakeEngine()
    config = make_config({"m": [await engine_server(engine)]}, limits={"max_body_bytes": 4096})
    client = await gateway_client(config)
    resp = await client.post("/v1/chat/completions", data=body, headers=headers)
    assert resp.status == status
    error = (await resp.json())["error"]
    assert error["message"]
    assert error["code"] == code
    assert engine.received == []


async def test_unknown_path_and_method_are_openai_errors(engine_server, gateway_client):
    client = await gateway_client(make_config({"m": [await engine_server(FakeEngine())]}))
    resp = await client.get("/v1/nothing-here", headers=AUTH)
    assert resp.status == 404
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    resp = await client.get("/v1/chat/completions", headers=AUTH)
    assert resp.status == 405
    assert "POST" in resp.headers["Allow"]
    assert (await resp.json())["error"]["message"]
