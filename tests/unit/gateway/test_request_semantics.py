"""What a client may legally send, and what the gateway may repeat.

- A stream's tokens are always counted, whatever `stream_options` the client
  sends: the gateway asks the engine for the usage event itself, and gives it
  to the client only when the client asked for it.
- A request that may have reached an engine is never sent to another replica:
  a first-byte timeout and an engine's 500 are answered, not retried, and a
  500 that one request causes does not count against the replica's breaker.
"""

from __future__ import annotations

import json

from aiohttp import web
from aiohttp.test_utils import TestServer
from cortex_gateway.auth import hash_key
from cortex_gateway.usage import report

from .conftest import AUTH, CLIENT_KEY, FakeEngine, make_config
from .test_resilience import wait_ready


def vllm_config(urls: list[str], **extra) -> dict:
    config = make_config({"chat": urls}, **extra)
    config["models"][0]["engine"] = "vllm"
    return config


def events(raw: bytes) -> list[dict]:
    """The JSON events of an SSE answer ([DONE] left out)."""
    return [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]


STREAM_OPT_OUTS = (
    {"stream_options": {"include_usage": False}},
    {"stream_options": {}},
    {"stream_options": None},
    {},
)


async def test_a_stream_that_opts_out_of_usage_is_still_counted_and_limited(
    engine_server, aiohttp_client, tmp_path
):
    """Defect 1: with `include_usage: false` (or `{}`) the gateway recorded 0
    tokens and a key's tokens_per_minute never refused it."""
    from cortex_gateway.app import Gateway
    from cortex_gateway.config import parse_config

    engine = FakeEngine(chunks=3, usage_when_asked=True)
    path = tmp_path / "usage.db"
    config = vllm_config([await engine_server(engine)], usage={"sqlite": str(path)})
    # One stream is 5 + 3 = 8 tokens: over this limit, so the next is refused.
    config["auth"]["api_keys"] = [
        {"name": "tests", "sha256": hash_key(CLIENT_KEY), "limits": {"tokens_per_minute": 6}}
    ]
    gateway = Gateway(parse_config(config))
    client = await aiohttp_client(gateway.build_app())
    await wait_ready(client, "chat", 1)
    body = {"model": "chat", "stream": True, "stream_options": {"include_usage": False}}
    first = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert first.status == 200
    relayed = events(await first.read())
    # The client asked for no usage: it gets none, in no chunk.
    assert relayed, "the stream relayed no event"
    assert all("usage" not in event or event["usage"] is None for event in relayed)
    assert all(event["choices"] for event in relayed), "an empty-choices usage chunk reached the client"
    # ...but the engine was asked for it.
    assert json.loads(engine.received[-1][1])["stream_options"]["include_usage"] is True
    second = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert second.status == 429
    assert (await second.json())["error"]["code"] == "tokens_per_minute_exceeded"
    await client.close()
    rows = report(path, ["key"])
    assert rows[0]["prompt_tokens"] == 5
    assert rows[0]["completion_tokens"] == 3


async def test_every_legal_usage_opt_out_is_counted(engine_server, aiohttp_client, tmp_path):
    from cortex_gateway.app import Gateway
    from cortex_gateway.config import parse_config

    engine = FakeEngine(chunks=2, usage_when_asked=True)
    path = tmp_path / "usage.db"
    gateway = Gateway(parse_config(vllm_config([await engine_server(engine)], usage={"sqlite": str(path)})))
    client = await aiohttp_client(gateway.build_app())
    await wait_ready(client, "chat", 1)
    for extra in STREAM_OPT_OUTS:
        answer = await client.post(
            "/v1/chat/completions", json={"model": "chat", "stream": True, **extra}, headers=AUTH
        )
        assert answer.status == 200, extra
        assert all(event["choices"] for event in events(await answer.read())), extra
    await client.close()
    rows = report(path, ["key"])
    assert rows[0]["requests"] == len(STREAM_OPT_OUTS)
    assert rows[0]["completion_tokens"] == 2 * len(STREAM_OPT_OUTS)


async def test_a_client_that_asks_for_usage_gets_the_usage_chunk(engine_server, gateway_client):
    engine = FakeEngine(chunks=2, usage_when_asked=True)
    client = await gateway_client(vllm_config([await engine_server(engine)]))
    await wait_ready(client, "chat", 1)
    raw = b'{"model":"chat","stream":true,"stream_options":{"include_usage":true}}'
    answer = await client.post(
        "/v1/chat/completions", data=raw, headers={**AUTH, "Content-Type": "application/json"}
    )
    relayed = events(await answer.read())
    assert relayed[-1]["choices"] == []
    assert relayed[-1]["usage"]["completion_tokens"] == 2
    # Nothing had to be set: the client's bytes went on as they came.
    assert engine.received[-1][1] == raw


# --- what a retry may repeat --------------------------------------------------


async def test_a_first_byte_timeout_is_not_sent_to_another_replica(engine_server, gateway_client):
    """Defect 3: an engine that accepted the request but had not answered
    within first_byte got the request again on the next replica."""
    slow, other = FakeEngine(delay=1.5), FakeEngine(delay=1.5)
    urls = [await engine_server(slow), await engine_server(other)]
    config = make_config({"chat": urls}, timeouts={"first_byte": 0.5})
    client = await gateway_client(config)
    await wait_ready(client, "chat", 2)
    answer = await client.post("/v1/completions", json={"model": "chat", "prompt": "x"}, headers=AUTH)
    assert answer.status == 504
    assert (await answer.json())["error"]["code"] == "upstream_timeout"
    assert len(slow.received) + len(other.received) == 1


async def test_an_engine_500_is_the_requests_answer_and_opens_no_breaker(engine_server, gateway_client):
    """Defect 3: one client's request that makes engines answer 500 was tried
    on every replica and opened every healthy replica's breaker."""
    failing = [FakeEngine(status=500), FakeEngine(status=500)]
    urls = [await engine_server(engine) for engine in failing]
    client = await gateway_client(make_config({"chat": urls}))
    await wait_ready(client, "chat", 2)
    for _attempt in range(6):
        answer = await client.post("/v1/completions", json={"model": "chat", "prompt": "x"}, headers=AUTH)
        assert answer.status == 500
        assert await answer.json() == {"error": "busy"}  # the engine's own answer
    assert sum(len(engine.received) for engine in failing) == 6
    states = {b.breaker.state.value for b in client.gateway.router.backends("chat")}
    assert states == {"closed"}
    assert all(b.routable for b in client.gateway.router.backends("chat"))


async def test_a_500_from_an_engine_whose_health_fails_goes_to_another_replica(engine_server, gateway_client):
    """A broken engine (its health check fails too) ran nothing: the request
    is the other replica's, and the broken one's breaker counts it."""
    broken, healthy = FakeEngine(status=500), FakeEngine()
    urls = [await engine_server(broken), await engine_server(healthy)]
    client = await gateway_client(make_config({"chat": urls}))
    await wait_ready(client, "chat", 2)
    broken.health_status = 500
    for _attempt in range(4):
        answer = await client.post("/v1/completions", json={"model": "chat", "prompt": "x"}, headers=AUTH)
        assert answer.status == 200
    assert len(healthy.received) == 4
    backend = next(b for b in client.gateway.router.backends("chat") if b.url == urls[0])
    assert list(backend.breaker.outcomes) == [False] * len(broken.received)


async def test_a_refused_connection_is_retried_on_another_replica(engine_server, gateway_client):
    """What provably never reached an engine may go elsewhere."""
    healthy = FakeEngine()
    dead = TestServer(web.Application(), host="127.0.0.1")
    await dead.start_server()
    dead_url = str(dead.make_url("")).rstrip("/")
    urls = [dead_url, await engine_server(healthy)]
    client = await gateway_client(make_config({"chat": urls}))
    # Both ready, then the first one's port stops listening.
    client.gateway.router.backends("chat")[0].set_health(client.gateway.router.backends("chat")[1].health)
    await wait_ready(client, "chat", 1)
    for backend in client.gateway.router.backends("chat"):
        backend.record_success()
    await dead.close()
    for _attempt in range(3):
        answer = await client.post("/v1/completions", json={"model": "chat", "prompt": "x"}, headers=AUTH)
        assert answer.status == 200
    assert len(healthy.received) == 3


async def test_a_cookie_one_answer_sets_never_goes_back_with_another_request(aiohttp_client):
    """The gateway's one upstream session serves every client: an engine (or
    anything at a backend's address) that sets a cookie must not get it back
    with the next request, which may be another key's. Backends named by host
    name (not IP addresses, whose cookies aiohttp refuses anyway) kept them."""
    from cortex_gateway.app import Gateway
    from cortex_gateway.config import parse_config

    cookies_seen: list[str | None] = []

    async def complete(request: web.Request) -> web.Response:
        cookies_seen.append(request.headers.get("Cookie"))
        usage = {"prompt_tokens": 1, "completion_tokens": 1}
        response = web.json_response({"choices": [{"message": {"content": "ok"}}], "usage": usage})
        response.set_cookie("session", f"for-request-{len(cookies_seen)}")
        return response

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    engine = web.Application()
    engine.router.add_post("/v1/chat/completions", complete)
    engine.router.add_get("/health", health)
    server = TestServer(engine, host="127.0.0.1")
    await server.start_server()
    try:
        config = make_config({"chat": [f"http://localhost:{server.port}"]})
        client = await aiohttp_client(Gateway(parse_config(config)).build_app())
        await wait_ready(client, "chat", 1)
        for _request in range(2):
            answer = await client.post(
                "/v1/chat/completions",
                json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
                headers=AUTH,
            )
            assert answer.status == 200, await answer.text()
        assert cookies_seen == [None, None]
    finally:
        await server.close()
