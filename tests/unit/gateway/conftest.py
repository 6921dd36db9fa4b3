"""Fixtures: real aiohttp servers standing in for engines, and a gateway in front."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from cortex_gateway.admin import AdminApi
from cortex_gateway.app import Gateway
from cortex_gateway.auth import hash_key
from cortex_gateway.config import parse_config

CLIENT_KEY = "sk-test-client-key-0123456789abcdef"
ENGINE_KEY = "engine-secret-key"


@dataclass
class FakeEngine:
    """An OpenAI-compatible engine that records what it was sent."""

    health_status: int = 200
    # Seconds each health check takes (a slow engine holds a worker's start).
    health_delay: float = 0.0
    chunks: int = 3
    chunk_delay: float = 0.0
    break_stream_after: int | None = None
    delay: float = 0.0
    status: int = 200
    retry_after: str | None = None
    # Non-streamed answers: padding to make them this many bytes or more, and
    # whether to close the connection halfway through the body.
    answer_bytes: int = 0
    cut_answer: bool = False
    # Streams hold their usage tail and [DONE] until this event is set (when given).
    stream_gate: asyncio.Event | None = None
    # Streams hold the end of their body, after [DONE], until this event is set (when given).
    hold_end: asyncio.Event | None = None
    # Streamed events written one byte at a time, this many seconds apart.
    trickle: float | None = None
    # As vLLM: a stream's usage event only when the request asks for it
    # (stream_options.include_usage), and `"usage": null` in every other
    # chunk then. Otherwise (llama.cpp) always.
    usage_when_asked: bool = False
    # Prompt tokens a stream's usage says came from the engine's cache (None: not said).
    cached_tokens: int | None = None
    received: list[tuple[str, bytes, str | None]] = field(default_factory=list)
    # Requests being answered now, and the most there ever were at once.
    running: int = 0
    most_running: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/chat/completions", self.complete)
        app.router.add_post("/v1/completions", self.complete)
        return app

    async def health(self, _request: web.Request) -> web.Response:
        await asyncio.sleep(self.health_delay)
        return web.json_response({"status": "ok"}, status=self.health_status)

    async def complete(self, request: web.Request) -> web.StreamResponse:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            return await self._complete(request)
        finally:
            self.running -= 1

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append((request.path, body, request.headers.get("Authorization")))
        payload = json.loads(body)
        await asyncio.sleep(self.delay)
        if self.status != 200:
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return web.json_response({"error": "busy"}, status=self.status, headers=headers)
        if not payload.get("stream"):
            answer = json.dumps(
                {
                    "id": "cmpl-1",
                    "object": "chat.completion",
                    "model": payload["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hello"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
                    "padding": "x" * self.answer_bytes,
                }
            ).encode()
            if not self.cut_answer:
                return web.Response(body=answer, content_type="application/json")
            # Headers promise the whole answer; the connection ends halfway.
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = len(answer)
            await response.prepare(request)
            await response.write(answer[: len(answer) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        options = payload.get("stream_options")
        asked = isinstance(options, dict) and options.get("include_usage") is True
        send_usage = asked or not self.usage_when_asked
        for i in range(self.chunks):
            if self.break_stream_after is not None and i == self.break_stream_after:
                assert request.transport is not None
                request.transport.close()
                return response
            event = {
                "id": "c",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": f"t{i}"}}],
                **({"usage": None} if self.usage_when_asked and asked else {}),
            }
            data = b"data: " + json.dumps(event).encode() + b"\n\n"
            if self.trickle is None:
                await response.write(data)
            for byte in data if self.trickle is not None else b"":
                await response.write(bytes([byte]))
                await asyncio.sleep(self.trickle)
            await asyncio.sleep(self.chunk_delay)
        if self.stream_gate is not None:
            await self.stream_gate.wait()
        usage: dict[str, Any] = {
            "prompt_tokens": 5,
            "completion_tokens": self.chunks,
            "total_tokens": 5 + self.chunks,
        }
        if self.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if send_usage:
            event = {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage}
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        if self.hold_end is not None:
            await self.hold_end.wait()
        await response.write_eof()
        return response


def make_config(backends: dict[str, list[str]], **extra: Any) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": 8000},
        "auth": {"require_api_key": True, "api_keys": [{"name": "tests", "sha256": hash_key(CLIENT_KEY)}]},
        "models": [
            {
                "name": name,
                "engine": "llamacpp",
                "backends": [{"url": url, "api_key": ENGINE_KEY, "max_concurrency": 2} for url in urls],
            }
            for name, urls in backends.items()
        ],
        "health": {"interval": 0.2, "unhealthy_after": 2},
        **extra,
    }


@pytest.fixture
async def engine_server() -> Callable[..., Any]:
    servers: list[TestServer] = []

    async def start(engine: FakeEngine) -> str:
        server = TestServer(engine.app(), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def gateway_client(aiohttp_client: Callable[..., Any]) -> Callable[..., Any]:
    async def start(raw_config: dict[str, Any]) -> Any:
        gateway = Gateway(parse_config(raw_config))
        client = await aiohttp_client(gateway.build_app())
        client.gateway = gateway
        # The admin API's own app over the same gateway (its own listener in production).
        client.admin = await aiohttp_client(AdminApi(gateway).build_app())
        return client

    return start


AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class GatewayProcess:
    process: asyncio.subprocess.Process
    base: str
    config_path: Path
    config: dict[str, Any]
    # The admin API's own listener.
    admin_base: str


def listeners(port: int) -> int:
    """Sockets listening on this loopback TCP port (one per worker)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for row in rows if row.split()[1] == f"0100007F:{port:04X}" and row.split()[3] == "0A")


def socket_activated(command: list[str], fd: int) -> list[str]:
    """``command`` started as systemd's socket activation starts it: the
    socket ``fd`` as fd 3, LISTEN_FDS=1, and its own pid in LISTEN_PID
    (exec keeps the pid)."""
    shim = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); os.execv(sys.argv[2], sys.argv[2:])"
    )
    return [sys.executable, "-c", shim, str(fd), *command]


@contextlib.asynccontextmanager
async def gateway_process(
    config: dict[str, Any],
    folder: Path,
    ready_model: str = "chat",
    env: dict[str, str] | None = None,
    port: int | None = None,
    listener: socket.socket | None = None,
):
    """A real `cortex-gateway serve` process on a free loopback port (or
    ``port``), once it serves `ready_model`; stopped (SIGTERM, then SIGKILL)
    when the block ends. With ``listener``, the process is given that
    listening socket as systemd's socket activation gives it (fd 3,
    LISTEN_FDS, LISTEN_PID), and serves on it."""
    config["listen"]["port"] = listener.getsockname()[1] if listener else port or free_port()
    config["admin_listen"] = {"host": "127.0.0.1", "port": free_port()}
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump(config))
    log = (folder / "gateway.log").open("wb")  # read it when a test fails
    command = [sys.executable, "-m", "cortex_gateway", "serve", "--config", str(path)]
    passed: dict[str, Any] = {}
    if listener is not None:
        command = socket_activated(command, listener.fileno())
        passed["pass_fds"] = (listener.fileno(),)
    process = await asyncio.create_subprocess_exec(
        *command, stdout=log, stderr=log,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}, **passed,
    )  # fmt: skip
    base = f"http://127.0.0.1:{config['listen']['port']}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            for _attempt in range(100):  # up to 10 s to listen and see its backend
                try:
                    async with session.get(base + "/healthz") as response:
                        if (await response.json())["ready_backends"].get(ready_model):
                            break
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.1)
            # With several workers, wait until every one of them listens.
            for _attempt in range(100):
                # A passed socket is one listener, however many workers accept on it.
                ports = (
                    (config["admin_listen"]["port"],)
                    if listener
                    else (config["listen"]["port"], config["admin_listen"]["port"])
                )
                if all(listeners(port) >= config.get("workers", 1) for port in ports):
                    break
                await asyncio.sleep(0.1)
        yield GatewayProcess(
            process, base, path, config, f"http://127.0.0.1:{config['admin_listen']['port']}"
        )
    finally:
        await stop_process(process)
        log.close()


async def stop_process(process: asyncio.subprocess.Process) -> None:
    """SIGTERM (a gateway drains), then SIGKILL after 30 s."""
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
