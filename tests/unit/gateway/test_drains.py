"""Draining a backend: no new requests, the ones in flight finish, across every worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiohttp
import pytest
from cortex_gateway.auth import hash_key
from cortex_gateway.config import parse_config
from cortex_gateway.drains import DrainBook

from .conftest import AUTH, FakeEngine, gateway_process, make_config
from .test_workers import ask, children

ADMIN_KEY = "sk-admin-drains-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def with_admin(config: dict) -> dict:
    config["auth"]["admin_keys"] = [{"name": "ops", "sha256": hash_key(ADMIN_KEY)}]
    return config


def backend_of(url: str) -> str:
    return url.removeprefix("http://")


def test_two_books_on_one_file_see_each_others_drains(tmp_path):
    path = str(tmp_path / "drains.json")
    first, second = DrainBook(path), DrainBook(path)
    first.set("http://a:1", time.time() + 60)
    second.set("http://b:2", time.time() + 60)  # read-modify-write under the lock: a's drain stays
    assert set(first.load()) == {"http://a:1", "http://b:2"}
    first.set("http://a:1", None)
    assert set(second.load()) == {"http://b:2"}


def test_an_ended_drain_is_dropped_and_a_broken_file_is_empty(tmp_path):
    path = tmp_path / "drains.json"
    book = DrainBook(str(path))
    book.set("http://old:1", time.time() - 1)
    assert book.load() == {}
    assert json.loads(path.read_text()) == {}
    path.write_text("not json")
    assert book.load() == {}


async def test_a_drained_replica_gets_no_new_requests_and_finishes_its_stream(engine_server, gateway_client):
    slow, other = FakeEngine(chunks=6, chunk_delay=0.1), FakeEngine()
    slow_url, other_url = await engine_server(slow), await engine_server(other)
    client = await gateway_client(with_admin(make_config({"chat": [slow_url, other_url]})))

    # A stream starts on the first replica (both idle: config order wins the first turn).
    stream = await client.post("/v1/chat/completions", json={"model": "chat", "stream": True}, headers=AUTH)
    assert stream.status == 200
    drained = await client.admin.post(
        "/admin/backends/drain", json={"backend": backend_of(slow_url), "seconds": 60}, headers=ADMIN
    )
    assert drained.status == 200
    assert (await drained.json())["data"][0]["state"] == "draining"
    before = len(slow.received)
    for _request in range(6):
        answer = await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)
        assert answer.status == 200
    assert len(slow.received) == before  # all six went to the other replica
    # The stream that was in flight ends as the engine ended it.
    body = await stream.read()
    assert body.count(b"data: {") == 6  # no usage event: this client did not ask for one
    assert body.endswith(b"data: [DONE]\n\n")

    listing = await (await client.admin.get("/admin/backends", headers=ADMIN)).json()
    rows = {row["url"]: row for row in listing["data"]}
    assert rows[slow_url]["state"] == "draining"
    assert rows[slow_url]["draining"] is True
    assert rows[slow_url]["in_flight"] == 0
    assert rows[other_url]["state"] == "ready"

    undrained = await client.admin.post("/admin/backends/undrain", json={"backend": slow_url}, headers=ADMIN)
    assert undrained.status == 200
    assert (await undrained.json())["data"][0]["state"] == "ready"
    for _request in range(4):
        await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)
    assert len(slow.received) > before  # back in turn


async def test_a_drain_with_wait_answers_once_the_streams_in_flight_have_ended(engine_server, gateway_client):
    gate = asyncio.Event()
    slow = FakeEngine(chunks=2, stream_gate=gate)
    url = await engine_server(slow)
    client = await gateway_client(with_admin(make_config({"chat": [url]})))
    stream = await client.post("/v1/chat/completions", json={"model": "chat", "stream": True}, headers=AUTH)
    # A wait shorter than the stream: the answer says it has not settled, one still runs.
    short = await client.admin.post(
        "/admin/backends/drain", json={"backend": url, "wait": 0.2}, headers=ADMIN
    )
    short_body = await short.json()
    assert short_body["settled"] is False
    assert short_body["data"][0]["in_flight"] == 1
    # What was in flight when the drain began: what it waited for.
    assert short_body["in_flight_at_drain"] == 1
    # A wait of an hour: it must answer when the stream ends, long before that.
    long = asyncio.create_task(
        client.admin.post("/admin/backends/drain", json={"backend": url, "wait": 3600}, headers=ADMIN)
    )
    for _turn in range(20):
        await asyncio.sleep(0)
    assert not long.done(), "the drain answered while a stream was still in flight"
    gate.set()
    assert (await stream.read()).endswith(b"data: [DONE]\n\n")
    # Bounded so that a drain that sits out its whole wait fails here, not hangs.
    long_body = await (await asyncio.wait_for(long, timeout=60)).json()
    assert long_body["settled"] is True
    assert long_body["data"][0]["in_flight"] == 0
    back = await client.admin.post(
        "/admin/backends/undrain", json={"backend": url, "wait": 10}, headers=ADMIN
    )
    back_body = await back.json()
    assert back_body["settled"] is True
    assert "in_flight_at_drain" not in back_body


async def test_a_drain_ends_by_itself_at_its_deadline(engine_server, gateway_client):
    engine = FakeEngine()
    url = await engine_server(engine)
    client = await gateway_client(with_admin(make_config({"chat": [url]})))
    await client.admin.post("/admin/backends/drain", json={"backend": url, "seconds": 0.3}, headers=ADMIN)
    # Every replica drained: the model is unavailable for now, and says when to try again.
    refused = await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "5"
    assert (await refused.json())["error"]["code"] == "model_unavailable"
    await asyncio.sleep(0.4)
    assert (await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)).status == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/admin/backends/drain", {"backend": "127.0.0.1:1"}, 404, "backend"),
        ("/admin/backends/drain", {}, 400, "backend"),
        ("/admin/backends/drain", [], 400, None),
        ("/admin/backends/drain", {"backend": "B", "seconds": 0}, 400, "seconds"),
        ("/admin/backends/drain", {"backend": "B", "seconds": 86401}, 400, "seconds"),
        ("/admin/backends/drain", {"backend": "B", "seconds": True}, 400, "seconds"),
        ("/admin/backends/undrain", {"backend": 7}, 400, "backend"),
        ("/admin/backends/undrain", {"backend": "B", "wait": -1}, 400, "wait"),
        ("/admin/backends/drain", {"backend": "B", "wait": "10"}, 400, "wait"),
        ("/admin/backends/drain", {"backend": "B", "wait": float("nan")}, 400, "wait"),
        ("/admin/backends/drain", {"backend": "B", "seconds": float("inf")}, 400, "seconds"),
    ],
)
async def test_bad_drain_requests_get_openai_errors(engine_server, gateway_client, path, body, status, param):
    url = await engine_server(FakeEngine())
    client = await gateway_client(with_admin(make_config({"chat": [url]})))
    body = json.loads(json.dumps(body).replace('"B"', json.dumps(url)))
    answer = await client.admin.post(path, json=body, headers=ADMIN)
    assert answer.status == status
    assert (await answer.json())["error"]["param"] == param


async def test_only_admin_keys_drain(engine_server, gateway_client):
    url = await engine_server(FakeEngine())
    client = await gateway_client(with_admin(make_config({"chat": [url]})))
    client_key = await client.admin.post("/admin/backends/drain", json={"backend": url}, headers=AUTH)
    assert client_key.status == 403
    assert (await client.admin.post("/admin/backends/drain", json={"backend": url})).status == 401
    assert (await client.admin.get("/admin/backends", headers=AUTH)).status == 403


async def backends(base: str) -> dict[str, dict]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base + "/admin/backends", headers=ADMIN) as answer,
    ):
        return {row["url"]: row for row in (await answer.json())["data"]}


async def until(check, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.1)


async def test_every_worker_drains_and_a_restarted_worker_too(engine_server, tmp_path):
    """A real gateway with three workers: one admin request drains the backend
    on all of them, /admin/backends says so only once all have, a worker
    started again after a crash keeps the drain, and undraining brings it back."""
    drained, other = FakeEngine(), FakeEngine()
    drained_url, other_url = await engine_server(drained), await engine_server(other)
    config = with_admin(make_config({"chat": [drained_url, other_url]}, workers=3))
    env = {"RUNTIME_DIRECTORY": str(tmp_path / "run")}
    async with gateway_process(config, tmp_path, env=env) as gateway:
        async with aiohttp.ClientSession() as session:
            answer = await session.post(
                gateway.admin_base + "/admin/backends/drain",
                json={"backend": drained_url, "wait": 10},
                headers=ADMIN,
            )
            assert answer.status == 200
            assert (await answer.json())["settled"] is True  # every worker drains it

        async def all_workers_drain() -> bool:
            return (await backends(gateway.admin_base))[drained_url]["draining"]

        before = len(drained.received)
        assert [(await ask(gateway.base))[0] for _request in range(30)] == [200] * 30
        assert len(drained.received) == before

        victim = min(children(gateway.process.pid))
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            now = children(gateway.process.pid)
            return len(now) == 3 and victim not in now

        await until(replaced)
        await until(all_workers_drain)
        assert [(await ask(gateway.base))[0] for _request in range(30)] == [200] * 30
        assert len(drained.received) == before

        async with aiohttp.ClientSession() as session:
            answer = await session.post(
                gateway.admin_base + "/admin/backends/undrain",
                json={"backend": drained_url, "wait": 10},
                headers=ADMIN,
            )
            assert (await answer.json())["settled"] is True
        row = (await backends(gateway.admin_base))[drained_url]
        assert row["ready"]
        assert not row["draining"]
        for _request in range(30):
            await ask(gateway.base)
        assert len(drained.received) > before


async def test_a_reload_keeps_the_drains_of_the_backends_that_stay(engine_server, gateway_client):
    first, second = await engine_server(FakeEngine()), await engine_server(FakeEngine())
    raw = with_admin(make_config({"chat": [first, second]}))
    client = await gateway_client(raw)
    await client.admin.post("/admin/backends/drain", json={"backend": first}, headers=ADMIN)
    client.gateway.apply_config(parse_config(raw))
    states = {b.url: b.state.value for b in client.gateway.backends}
    assert states == {first: "draining", second: "ready"}
