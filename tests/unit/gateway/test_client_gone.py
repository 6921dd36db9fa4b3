"""A client that hangs up takes its work with it: the gateway's handler is
cancelled (aiohttp's handler cancellation, on in every worker), and its
upstream request is closed, so the engine stops generating for nobody."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from cortex_gateway.usage import report

from .conftest import AUTH, FakeEngine, gateway_process, make_config


class SlowEngine:
    """Answers /health at once and a completion after ``seconds``; notes when
    a completion's connection was dropped before the answer (its handler is
    cancelled: this engine's server cancels handlers of closed connections)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started: list[float] = []
        self.dropped: list[float] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/chat/completions", self.complete)
        return app

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def complete(self, request: web.Request) -> web.Response:
        await request.read()
        self.started.append(time.monotonic())
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.dropped.append(time.monotonic())
            raise
        return web.json_response({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})


async def test_a_client_that_hangs_up_drops_the_engines_request_within_a_second(tmp_path):
    """Defect 4: the workers ran aiohttp without handler cancellation, so a
    non-streamed generation went on for a client that had left."""
    engine = SlowEngine(seconds=20)
    server = TestServer(engine.app(), host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        async with gateway_process(make_config({"chat": [url]}), tmp_path) as gateway:
            timeout = aiohttp.ClientTimeout(total=1.0)
            gone = None
            async with aiohttp.ClientSession(timeout=timeout) as session:
                try:
                    async with session.post(
                        gateway.base + "/v1/chat/completions",
                        json={"model": "chat", "messages": []},
                        headers=AUTH,
                    ) as answer:
                        await answer.read()
                except TimeoutError:
                    gone = time.monotonic()  # the client's session closes the connection
            assert gone is not None, "the gateway answered before the client left"
            for _attempt in range(40):
                if engine.dropped:
                    break
                await asyncio.sleep(0.05)
            assert len(engine.started) == 1
            assert engine.dropped, "the engine's request went on after the client left"
            assert engine.dropped[0] - gone < 1.0
    finally:
        await server.close()


async def test_a_stream_whose_client_hangs_up_after_the_usage_event_keeps_its_tokens(engine_server, tmp_path):
    """A client that reads the usage event and [DONE], then closes before the
    chunked body's end (an SDK does): its handler is cancelled then, and the
    tokens the engine reported must still be recorded (the default scenario
    saw a request recorded with 0 prompt tokens)."""
    gate, end = asyncio.Event(), asyncio.Event()
    engine = FakeEngine(chunks=3, stream_gate=gate, hold_end=end)
    usage_db = tmp_path / "usage.db"
    config = make_config({"chat": [await engine_server(engine)]}, usage={"sqlite": str(usage_db)})
    async with gateway_process(config, tmp_path) as gateway:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                gateway.base + "/v1/chat/completions",
                json={"model": "chat", "stream": True, "stream_options": {"include_usage": True}},
                headers=AUTH,
            ) as answer,
        ):
            seen = b""
            gate.set()
            while b"[DONE]" not in seen:
                seen += await answer.content.readany()
            # Gone before the end of the chunked body: the connection is closed.
            answer.connection.transport.abort()
        await asyncio.sleep(0.5)
    rows = report(usage_db, ["key"])
    assert rows[0]["requests"] == 1
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (5, 3)
