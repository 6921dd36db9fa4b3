"""The gateway against real HTTP servers standing in for engines."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp

from .conftest import AUTH, ENGINE_KEY, FakeEngine, gateway_process, make_config

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_non_streaming_answer_passes_through(engine_server, gateway_client):
    engine = FakeEngine()
    client = await gateway_client(make_config({"m": [await engine_server(engine)]}))
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"] == "hello"


async def test_request_body_is_forwarded_byte_for_byte(engine_server, gateway_client):
    engine = FakeEngine()
    client = await gateway_client(make_config({"m": [await engine_server(engine)]}))
    # Odd spacing, key order and an unknown field must all survive.
    raw = b'{ "zeta": [1,2],  "model":"m", "messages": [], "x-extra": {"a": null} }'
    resp = await client.post("/v1/chat/completions", data=raw, headers=AUTH)
    assert resp.status == 200
    assert engine.received[0][1] == raw


async def test_engine_gets_its_own_key_not_the_clients(engine_server, gateway_client):
    engine = FakeEngine()
    client = await gateway_client(make_config({"m": [await engine_server(engine)]}))
    await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert engine.received[0][2] == f"Bearer {ENGINE_KEY}"


async def test_stream_is_relayed_as_server_sent_events(engine_server, gateway_client):
    engine = FakeEngine(chunks=4)
    client = await gateway_client(make_config({"m": [await engine_server(engine)]}))
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["X-Accel-Buffering"] == "no"
    text = (await resp.read()).decode()
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    # The usage event the gateway asked for is not relayed: this client did not ask for it.
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == ["t0", "t1", "t2", "t3"]
    assert all("usage" not in json.loads(e) for e in events[:-1])
    # Asked for, the final usage event is passed through.
    asked = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    resp = await client.post("/v1/chat/completions", json=asked, headers=AUTH)
    events = [line[6:] for line in (await resp.read()).decode().splitlines() if line.startswith("data: ")]
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 4


async def test_stream_broken_midway_ends_with_an_error_event(engine_server, gateway_client):
    engine = FakeEngine(chunks=5, break_stream_after=2)
    client = await gateway_client(make_config({"m": [await engine_server(engine)]}))
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    # The stream ends properly after the error event (no cut a proxy could
    # lose it in): reading it to the end raises nothing.
    body = await resp.read()
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "upstream_stream_broken"


async def read_cut_stream(resp) -> list[str]:
    body = await resp.read()
    return [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]


async def test_a_stream_that_stalls_ends_with_an_error_event_after_idle(engine_server, gateway_client):
    engine = FakeEngine(chunks=3, chunk_delay=5)
    client = await gateway_client(make_config({"m": [await engine_server(engine)]}, timeouts={"idle": 0.5}))
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    events = await read_cut_stream(resp)
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "t0"
    assert json.loads(events[-1])["error"]["message"] == "the model server sent no complete event for 0.5s"


async def test_a_stream_that_trickles_bytes_is_cut_like_a_stalled_one(engine_server, gateway_client):
    """A byte every 0.1 s never lets the connection idle for 0.5 s, but no
    whole event comes in 0.5 s: the idle bound counts events, not bytes."""
    engine = FakeEngine(chunks=3, trickle=0.1)
    client = await gateway_client(make_config({"m": [await engine_server(engine)]}, timeouts={"idle": 0.5}))
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    events = await read_cut_stream(resp)
    assert json.loads(events[-1])["error"]["code"] == "upstream_stream_broken"
    assert "no complete event for 0.5s" in json.loads(events[-1])["error"]["message"]


async def test_a_replica_that_cut_a_stream_gets_no_new_ones_for_a_while(engine_server, gateway_client):
    """A stream cut by its engine (stalled, trickling, broken off) counts against
    that engine: it is not sent the next conversations that hash to it."""
    trickling = FakeEngine(chunks=3, trickle=0.1)
    good = FakeEngine(chunks=3)
    urls = [await engine_server(trickling), await engine_server(good)]
    client = await gateway_client(make_config({"m": urls}, timeouts={"idle": 0.5}))

    async def stream(number: int) -> bool:
        """Send a new conversation as a stream; True when it was cut."""
        body = {**CHAT, "messages": [{"role": "user", "content": f"conversation {number}"}], "stream": True}
        resp = await client.post("/v1/chat/completions", json=body, headers=AUTH)
        events = await read_cut_stream(resp)
        return events[-1] != "[DONE]" and "error" in json.loads(events[-1])

    # Bounded: new conversations land on either replica, so one soon lands on the broken one.
    cuts = 0
    for number in range(20):
        if await stream(number):
            cuts += 1
            break
    assert cuts == 1
    cut_after = [await stream(100 + n) for n in range(8)]
    assert cut_after == [False] * 8
    assert len(trickling.received) == 1
    backend = next(b for b in client.gateway.backends if b.url == urls[0])
    assert backend.breaker.state.value == "open"


async def test_a_whole_answer_broken_midway_is_a_502_and_never_run_twice(engine_server, gateway_client):
    """Nothing of a non-streamed answer reaches the client before it is whole,
    but the engine ran the request: a replica that breaks the answer off
    costs a 502 (and its breaker a failure), never a second generation."""
    broken = FakeEngine(cut_answer=True, answer_bytes=200_000)
    good = FakeEngine()
    urls = [await engine_server(broken), await engine_server(good)]
    client = await gateway_client(make_config({"m": urls}))
    statuses = []
    for _attempt in range(4):
        resp = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        statuses.append(resp.status)
        if resp.status == 502:
            assert (await resp.json())["error"]["code"] == "upstream_answer_broken"
        else:
            assert (await resp.json())["choices"][0]["message"]["content"] == "hello"
    assert len(broken.received) + len(good.received) == 4  # each request ran once
    assert statuses.count(502) == len(broken.received) >= 1
    backend = next(b for b in client.gateway.router.backends("m") if b.url == urls[0])
    # Its headers came (a success), then its body broke (a failure), each time.
    assert list(backend.breaker.outcomes).count(False) == len(broken.received)


async def test_refused_replica_is_skipped_for_the_next(engine_server, gateway_client):
    engine = FakeEngine()
    good = await engine_server(engine)
    dead = f"http://127.0.0.1:{free_port()}"
    client = await gateway_client(make_config({"m": [dead, good]}))
    # The dead replica was never ready; mark it ready to force a real attempt.
    for backend in client.gateway.backends:
        backend.record_success()
    for _attempt in range(4):
        resp = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        assert resp.status == 200
    assert len(engine.received) == 4


async def test_model_with_no_ready_backend_gets_503(engine_server, gateway_client):
    engine = FakeEngine(health_status=503)  # still loading
    client = await gateway_client(make_config({"m": [await engine_server(engine)]}))
    resp = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "5"
    assert (await resp.json())["error"]["code"] == "model_unavailable"
    assert engine.received == []


async def test_models_lists_every_model_with_its_engine(engine_server, gateway_client):
    url = await engine_server(FakeEngine())
    client = await gateway_client(make_config({"a": [url], "b": [url]}))
    resp = await client.get("/v1/models", headers=AUTH)
    data = (await resp.json())["data"]
    assert [(m["id"], m["object"], m["engine"]) for m in data] == [
        ("a", "model", "llamacpp"),
        ("b", "model", "llamacpp"),
    ]


async def test_healthz_needs_no_key_and_counts_ready_backends(engine_server, gateway_client):
    url = await engine_server(FakeEngine())
    client = await gateway_client(make_config({"m": [url]}))
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert (await resp.json())["ready_backends"] == {"m": 1}


async def test_every_stream_asks_the_engine_for_its_usage(engine_server, gateway_client):
    engine = FakeEngine(chunks=2)
    config = make_config({"m": [await engine_server(engine)]})
    config["models"][0]["engine"] = "vllm"
    client = await gateway_client(config)
    for _attempt in range(50):
        if (await (await client.get("/healthz")).json())["ready_backends"]["m"]:
            break
        await asyncio.sleep(0.05)
    streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    await streamed.read()
    chosen = {**CHAT, "stream": True, "stream_options": {"include_usage": False}}
    await (await client.post("/v1/chat/completions", json=chosen, headers=AUTH)).read()
    plain = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    await plain.read()
    sent = [json.loads(body) for _path, body, _key in engine.received]
    assert sent[0]["stream_options"] == {"include_usage": True}
    # A client's opt-out does not switch off counting (the client still gets no usage chunk).
    assert sent[1]["stream_options"] == {"include_usage": True}
    assert "stream_options" not in sent[2]


async def test_a_client_that_goes_away_mid_stream_is_recorded_not_raised(
    engine_server, gateway_client, caplog
):
    gate = asyncio.Event()
    engine = FakeEngine(chunks=2, stream_gate=gate)
    client = await gateway_client(make_config({"m": [await engine_server(engine)]}))
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH)
    assert (await resp.content.readany()).startswith(b"data: ")
    resp.close()  # the client hangs up with the stream half sent
    gate.set()  # the engine goes on: the gateway's next write finds no client
    from .test_metrics import scrape

    for _turn in range(100):  # bounded: the handler ends within a few loop turns
        samples = await scrape(client)
        gone = [
            v
            for (name, labels), v in samples.items()
            if name == "cortex_gateway_requests_total" and ("status", "499") in labels
        ]
        if gone:
            break
        await asyncio.sleep(0.05)
    assert gone == [1.0], "the request was not counted as one the client closed (499)"
    unhandled = [r for r in caplog.records if r.levelname == "ERROR"]
    assert not unhandled, [r.getMessage() for r in unhandled]


async def test_a_client_gone_mid_stream_leaves_no_traceback_in_a_real_gateway(engine_server, tmp_path):
    gate = asyncio.Event()
    url = await engine_server(FakeEngine(chunks=2, stream_gate=gate))
    config = make_config({"chat": [url]}, workers=1)
    async with gateway_process(config, tmp_path) as gateway, aiohttp.ClientSession() as session:
        body = {**CHAT, "model": "chat", "stream": True}
        resp = await session.post(gateway.base + "/v1/chat/completions", json=body, headers=AUTH)
        assert (await resp.content.readany()).startswith(b"data: ")
        resp.close()
        gate.set()
        for _turn in range(100):  # bounded: the gateway notices within a few writes
            async with session.get(gateway.base + "/metrics") as answer:
                metrics = await answer.text()
            if 'status="499"' in metrics:
                break
            await asyncio.sleep(0.05)
        assert 'cortex_gateway_requests_total{backend="' in metrics
        assert 'status="499"} 1.0' in metrics, metrics
    log = (tmp_path / "gateway.log").read_text()
    assert "Traceback" not in log, log
