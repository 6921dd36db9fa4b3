"""Prefix affinity: a conversation's turns go to one replica, unless that one is
busy, drained or broken; the index stays bounded and is shared by the workers;
the engines' cached prompt tokens are counted per backend."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cortex_gateway.affinity import (
    AffinitySettings,
    PrefixIndex,
    prefix_chain,
    prefix_text,
    replica_ids,
    request_chain,
)
from cortex_gateway.backends import Health
from cortex_gateway.breaker import Failure
from cortex_gateway.config import ConfigError, parse_config
from cortex_gateway.policies import RoutingPolicy
from cortex_gateway.status import backend_rows

from .conftest import AUTH, FakeEngine, gateway_process, make_config
from .test_workers import metric

REPLICAS = 3
# Long enough that a conversation's first messages fill several blocks.
DOCUMENT = "The quarterly report of department {n}. " * 60


def conversation(user: int, turns: int) -> list[dict]:
    """Turn ``turns`` of user ``user``'s chat: a document of its own, then questions and answers."""
    messages = [{"role": "system", "content": DOCUMENT.format(n=user)}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn} about the report?"})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": f"Answer {turn}."})
    return messages


def served_by(engines: list[FakeEngine], marker: str) -> list[int]:
    """Which engines got a request whose body holds ``marker``."""
    return [
        i
        for i, engine in enumerate(engines)
        if any(marker.encode() in body for _p, body, _a in engine.received)
    ]


async def start_replicas(engine_server, count: int = REPLICAS, **model) -> tuple[list[FakeEngine], dict]:
    engines = [FakeEngine() for _replica in range(count)]
    urls = [await engine_server(engine) for engine in engines]
    config = make_config({"chat": urls})
    config["models"][0].update(model)
    return engines, config


async def chat(client, messages: list[dict], **extra) -> int:
    headers = {**AUTH, **extra.pop("headers", {})}
    response = await client.post(
        "/v1/chat/completions", json={"model": "chat", "messages": messages, **extra}, headers=headers
    )
    await response.read()
    return response.status


def turn_homes(engines: list[FakeEngine], users: int, turns: int) -> dict[int, list[int]]:
    """For each user, the engine of each turn (found by the turn's own question)."""
    homes: dict[int, list[int]] = {}
    for user in range(users):
        marker = DOCUMENT.format(n=user)[:40]
        for engine_number, engine in enumerate(engines):
            for _path, body, _auth in engine.received:
                payload = json.loads(body)
                if payload["messages"][0]["content"].startswith(marker):
                    turn = sum(1 for m in payload["messages"] if m["role"] == "user") - 1
                    homes.setdefault(user, [None] * turns)[turn] = engine_number
    return homes


# --- keys --------------------------------------------------------------------


def test_the_next_turn_repeats_the_last_turns_digests_and_adds_its_own():
    settings = AffinitySettings(block_bytes=256)
    first = request_chain("chat", {"messages": conversation(1, 1)}, None, settings)
    second = request_chain("chat", {"messages": conversation(1, 6)}, None, settings)
    other = request_chain("chat", {"messages": conversation(2, 2)}, None, settings)
    assert len(first) > 1
    assert second[: len(first)] == first
    assert len(second) > len(first)
    assert not set(other) & set(second)
    # Another model's requests never share digests with this one's.
    assert not set(request_chain("other", {"messages": conversation(1, 1)}, None, settings)) & set(first)


def test_the_hashed_prefix_is_bounded():
    huge = {"messages": [{"role": "user", "content": "x" * 10_000_000}]}
    text = prefix_text(huge, 4096)
    assert len(text) == 4096
    assert len(prefix_chain("chat", text, 512)) == 8
    assert len(prefix_text({"prompt": ["y" * 10_000, "z"]}, 1000)) == 1000
    # Content parts and roles are read no further than the bound either.
    parts = {
        "messages": [{"role": "r" * 100_000, "content": [{"type": "text", "text": "p" * 1000}] * 100_000}]
    }
    assert len(prefix_text(parts, 4096)) == 4096
    assert prefix_text(parts, 4096).startswith(b"r" * 32 + b"\x1fppp")
    assert prefix_text({"prompt": [1, 2, 3]}, 100) == b"1,2,3"
    assert prefix_text({"input": "no messages, no prompt"}, 100) == b""


def test_a_session_names_the_key_whatever_the_text():
    settings = AffinitySettings()
    by_header = request_chain("chat", {"prompt": "one"}, "s-1", settings)
    assert by_header == request_chain("chat", {"prompt": "two"}, "s-1", settings)
    assert request_chain("chat", {"prompt": "one", "user": "u-7"}, None, settings) == request_chain(
        "chat", {"prompt": "two", "user": "u-7"}, None, settings
    )
    assert by_header != request_chain("chat", {"prompt": "one"}, "s-2", settings)


def test_replica_ids_are_stable_and_distinct():
    urls = [f"http://10.0.0.{n}:8080" for n in range(200)]
    ids = replica_ids(urls)
    assert len(set(ids.values())) == len(urls)
    assert all(1 <= number <= 0xFFFF for number in ids.values())
    # A reload that removes some replicas and adds others keeps the ids of those that stay.
    after = replica_ids([*urls[50:], "http://10.0.1.1:8080"])
    assert all(after[url] == ids[url] for url in urls[50:])


# --- the index ---------------------------------------------------------------


def test_the_index_stays_bounded_under_100000_distinct_prefixes(tmp_path):
    path = tmp_path / "prefix-index"
    index = PrefixIndex(str(path), entries=4096)
    size = path.stat().st_size
    chains = [prefix_chain("chat", f"conversation {n} ".encode() * 40, 256) for n in range(100_000)]
    for n, chain in enumerate(chains):
        index.learn(chain, 1 + n % 3)
    assert path.stat().st_size == size == index.size_bytes == (1 + 4096) * 8
    assert index.used() <= index.entries
    # The most recent conversations are still there, with their replicas.
    for n in range(100_000 - 50, 100_000):
        assert index.lookup(chains[n]) == (1 + n % 3, len(chains[n]))


def test_the_least_recently_written_way_is_evicted():
    index = PrefixIndex(None, entries=4)  # one set of 4 ways
    digests = {n: n << 40 | 7 for n in (0, 1, 2, 3, 99)}
    for n in range(4):
        index.learn([digests[n]], n + 1)
    index.learn([digests[0]], 9)  # written again: now the most recent
    index.learn([digests[99]], 5)  # evicts digest 1, the oldest
    assert index.lookup([digests[1]]) == (0, 0)
    assert [index.lookup([digests[n]])[0] for n in (0, 2, 3, 99)] == [9, 3, 4, 5]


def test_two_processes_see_one_index(tmp_path):
    path = str(tmp_path / "prefix-index")
    first, second = PrefixIndex(path, entries=1024), PrefixIndex(path, entries=1024)
    chain = prefix_chain("chat", b"a shared conversation " * 100, 256)
    first.learn(chain, 42)
    assert second.lookup(chain) == (42, len(chain))
    # A longer chain (the next turn) finds its longest known part.
    longer = prefix_chain("chat", b"a shared conversation " * 100 + b"and more " * 100, 256)
    assert second.lookup(longer) == (42, len(chain))
    # Only the ids of the model's replicas count.
    assert second.lookup(chain, known={7: object()}) == (0, 0)


def test_spill_needs_both_the_absolute_and_the_relative_margin():
    assert (RoutingPolicy().spill_absolute, RoutingPolicy().spill_relative) == (4, 1.5)
    policy = RoutingPolicy(spill_absolute=2, spill_relative=1.5)
    assert not policy.spills(1, 0)
    assert policy.spills(2, 0)
    assert not policy.spills(5, 4)  # 1 more, and 1.25x
    assert not policy.spills(6, 4)  # 2 more, but 1.5x exactly
    assert policy.spills(7, 4)


# --- routing through the gateway --------------------------------------------


async def test_every_turn_of_a_conversation_goes_to_the_replica_of_its_first(engine_server, gateway_client):
    engines, config = await start_replicas(engine_server)
    client = await gateway_client(config)
    users, turns = 8, 4
    for turn in range(1, turns + 1):
        for user in range(users):
            assert await chat(client, conversation(user, turn)) == 200
    homes = turn_homes(engines, users, turns)
    assert all(len(set(turns_of)) == 1 for turns_of in homes.values()), homes
    # New conversations still spread over the replicas by load.
    assert len({turns_of[0] for turns_of in homes.values()}) == REPLICAS
    assert await metric_of(client, "cortex_gateway_routing_decisions_total", decision="affinity") == users * (
        turns - 1
    )


async def test_least_outstanding_scatters_the_same_conversations(engine_server, gateway_client):
    """The same traffic under today's policy: the test above would fail on it."""
    engines, config = await start_replicas(engine_server, routing={"policy": "least_outstanding"})
    client = await gateway_client(config)
    for turn in range(1, 5):
        for user in range(8):
            assert await chat(client, conversation(user, turn)) == 200
    homes = turn_homes(engines, 8, 4)
    assert any(len(set(turns_of)) > 1 for turns_of in homes.values()), homes


async def test_a_busy_home_spills_and_the_index_learns_the_new_home(engine_server, gateway_client):
    engines, config = await start_replicas(engine_server, 2, routing={"spill_absolute": 2})
    client = await gateway_client(config)
    assert await chat(client, conversation(0, 1)) == 200
    home = served_by(engines, "Question 0")[0]
    backends = client.gateway.router.backends("chat")
    backends[home].outstanding = 2  # two requests in flight there, none on the other
    assert await chat(client, conversation(0, 2)) == 200
    assert served_by(engines, "Question 1") == [1 - home]
    backends[home].outstanding = 0
    assert await chat(client, conversation(0, 3)) == 200
    assert served_by(engines, "Question 2") == [1 - home]  # it stays at its new home
    assert await metric_of(client, "cortex_gateway_routing_decisions_total", decision="spill") == 1


async def test_one_more_request_in_flight_does_not_move_a_conversation(engine_server, gateway_client):
    engines, config = await start_replicas(engine_server, 2)
    client = await gateway_client(config)
    assert await chat(client, conversation(0, 1)) == 200
    home = served_by(engines, "Question 0")[0]
    client.gateway.router.backends("chat")[home].outstanding = 1
    assert await chat(client, conversation(0, 2)) == 200
    assert served_by(engines, "Question 1") == [home]


async def test_a_full_home_is_waited_for_while_the_others_are_busy_too(engine_server, gateway_client):
    engines, config = await start_replicas(engine_server, 2)
    client = await gateway_client(config)
    assert await chat(client, conversation(0, 1)) == 200
    home = served_by(engines, "Question 0")[0]
    backends = client.gateway.router.backends("chat")
    # The home's slots are taken; the other has one free but is busy too (no spill).
    backends[home].outstanding, backends[1 - home].outstanding = 2, 1
    turn = asyncio.create_task(chat(client, conversation(0, 2)))
    for _look in range(5):
        await asyncio.sleep(0.05)
        assert not turn.done()  # waiting in the queue, not sent to the other replica
    assert served_by(engines, "Question 1") == []
    backends[home].outstanding = 1  # a slot frees at the home
    assert await turn == 200
    assert served_by(engines, "Question 1") == [home]


async def test_requests_waiting_for_a_home_count_as_its_load(engine_server, gateway_client):
    """Default spill: 4 above the least loaded. A full home (2 in flight) with
    the other replica idle is waited for; with 2 more waiting for it, it spills."""
    engines, config = await start_replicas(engine_server, 2)
    client = await gateway_client(config)
    assert await chat(client, conversation(0, 1)) == 200
    home = served_by(engines, "Question 0")[0]
    backends = client.gateway.router.backends("chat")
    backends[home].outstanding = 2
    turn = asyncio.create_task(chat(client, conversation(0, 2)))
    await asyncio.sleep(0.2)
    assert not turn.done()
    assert served_by(engines, "Question 1") == []
    backends[home].affine_waiting += 2  # two more requests queue for it: 2 + 2 = 4 above 0
    assert await turn == 200
    assert served_by(engines, "Question 1") == [1 - home]
    backends[home].affine_waiting -= 2
    assert backends[home].affine_waiting == 0  # the request's own count is gone with it


@pytest.mark.parametrize("bound", ["home_wait", "half the queue's max_wait"])
async def test_a_request_waits_for_its_home_no_longer_than_home_wait(engine_server, gateway_client, bound):
    routing = {"home_wait": 5 if bound == "home_wait" else 60}
    engines, config = await start_replicas(engine_server, 2, routing=routing)
    config["queue"] = {"max_wait": 60 if bound == "home_wait" else 10}
    client = await gateway_client(config)
    now = [1000.0]
    client.gateway.clock = lambda: now[0]
    assert await chat(client, conversation(0, 1)) == 200
    home = served_by(engines, "Question 0")[0]
    backends = client.gateway.router.backends("chat")
    backends[home].outstanding, backends[1 - home].outstanding = 2, 1
    turn = asyncio.create_task(chat(client, conversation(0, 2)))
    await asyncio.sleep(0.1)
    assert not turn.done()
    now[0] += 6  # past 5 s: the next look takes the free slot elsewhere
    assert await turn == 200
    assert served_by(engines, "Question 1") == [1 - home]


@pytest.mark.parametrize("trouble", ["draining", "unhealthy", "breaker open", "no free slot"])
async def test_a_home_that_cannot_take_requests_is_never_chosen(engine_server, gateway_client, trouble):
    # A full home is waited for up to home_wait (tested above); here not at all.
    routing = {"home_wait": 0} if trouble == "no free slot" else {}
    engines, config = await start_replicas(engine_server, 2, routing=routing)
    client = await gateway_client(config)
    assert await chat(client, conversation(0, 1)) == 200
    home = served_by(engines, "Question 0")[0]
    backend = client.gateway.router.backends("chat")[home]
    if trouble == "draining":
        backend.drain_until = 4e9
    elif trouble == "unhealthy":
        engines[home].health_status = 500  # the health polls find it failing
        for _poll in range(50):
            if backend.health is Health.UNHEALTHY:
                break
            await asyncio.sleep(0.1)
        assert backend.health is Health.UNHEALTHY
    elif trouble == "breaker open":
        backend.breaker.record_failure(Failure.REFUSED)
        assert not backend.breaker.allows()
    else:
        backend.outstanding = backend.max_concurrency
    for turn in range(2, 5):
        assert await chat(client, conversation(0, turn)) == 200
    assert set(served_by(engines, "Question 3")) == {1 - home}
    assert all(served_by(engines, f"Question {t}") == [1 - home] for t in (1, 2, 3))


async def test_the_session_header_and_the_user_field_pin_a_session(engine_server, gateway_client):
    engines, config = await start_replicas(engine_server)
    client = await gateway_client(config)
    for n in range(6):
        prompt = [{"role": "user", "content": f"unrelated question {n}"}]
        assert await chat(client, prompt, headers={"X-Session-Id": "agent-7"}) == 200
        assert await chat(client, [{"role": "user", "content": f"other {n}"}], user="user-3") == 200
    assert len(set(served_by(engines, "unrelated question"))) == 1
    assert len(set(served_by(engines, "other "))) == 1


async def test_embeddings_and_least_outstanding_models_ignore_affinity(engine_server, gateway_client):
    engines, config = await start_replicas(engine_server, 2, routing={"policy": "least_outstanding"})
    client = await gateway_client(config)
    for _turn in range(4):
        assert await chat(client, conversation(0, 1)) == 200
    assert sorted(Counter(served_by(engines, "Question 0"))) == [0, 1]
    with pytest.raises(KeyError):  # no decision counted for a least-outstanding model
        await metric_of(client, "cortex_gateway_routing_decisions_total")


async def test_a_reload_keeps_the_homes_of_the_replicas_that_stay(engine_server, gateway_client):
    engines, config = await start_replicas(engine_server, 3)
    client = await gateway_client(config)
    for user in range(6):
        assert await chat(client, conversation(user, 1)) == 200
    before = turn_homes(engines, 6, 1)
    removed = 2
    config["models"][0]["backends"] = [
        b for i, b in enumerate(config["models"][0]["backends"]) if i != removed
    ]
    client.gateway.apply_config(parse_config(config))
    for user in range(6):
        assert await chat(client, conversation(user, 2)) == 200
    after = turn_homes(engines, 6, 2)
    for user, (first,) in before.items():
        if first != removed:
            assert after[user] == [first, first]
        else:
            assert after[user][1] != removed


def test_bad_routing_settings_name_the_field():
    config = make_config({"chat": ["http://127.0.0.1:9"]})
    config["models"][0]["routing"] = {"policy": "random"}
    with pytest.raises(ConfigError, match=r"models\[0\]\.routing\.policy: must be one of"):
        parse_config(config)
    config["models"][0]["routing"] = {"spill_relative": 0.5}
    with pytest.raises(ConfigError, match=r"models\[0\]\.routing\.spill_relative: must be at least 1"):
        parse_config(config)
    config["models"][0]["routing"] = {}
    config["routing"] = {"block_bytes": 8192, "prefix_bytes": 4096}
    with pytest.raises(ConfigError, match=r"routing\.block_bytes: must not exceed routing\.prefix_bytes"):
        parse_config(config)
    config["routing"] = {"session_header": "X Session"}
    with pytest.raises(ConfigError, match=r"routing\.session_header: must be an HTTP header name"):
        parse_config(config)
    config["routing"] = {}
    config["models"][0]["routing"] = {"home_wait": -1}
    with pytest.raises(ConfigError, match=r"models\[0\]\.routing\.home_wait: must be 0 or more, got -1"):
        parse_config(config)


# --- cached prompt tokens ----------------------------------------------------


class CachingEngine(FakeEngine):
    """Reports cached prompt tokens as vLLM does, or as llama.cpp's timings do."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style

    async def complete(self, request: web.Request) -> web.Response:
        await request.read()
        usage = {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101}
        answer: dict = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}]}
        if self.style == "vllm":
            usage["prompt_tokens_details"] = {"cached_tokens": 80}
        else:
            answer["timings"] = {"cache_n": 80, "prompt_n": 20}
        return web.json_response({**answer, "usage": usage})


@pytest.mark.parametrize("style", ["vllm", "llamacpp"])
async def test_cached_prompt_tokens_are_counted_per_backend(engine_server, gateway_client, style):
    url = await engine_server(CachingEngine(style))
    client = await gateway_client(make_config({"chat": [url]}))
    for _request in range(3):
        assert await chat(client, conversation(0, 1)) == 200
    backend = url.removeprefix("http://")
    assert (
        await metric_of(client, "cortex_gateway_prompt_cache_tokens_total", backend=backend, result="hit")
        == 240
    )
    assert (
        await metric_of(client, "cortex_gateway_prompt_cache_tokens_total", backend=backend, result="miss")
        == 60
    )
    (row,) = backend_rows(client.gateway.backends, client.gateway.metrics.collect_registry())
    assert (row["cached_prompt_tokens"], row["prompt_tokens"], row["cache_hit_rate"]) == (240, 300, 0.8)


async def metric_of(client, name: str, **labels: str) -> float:
    """A series of the gateway's /metrics (KeyError when it is missing)."""
    try:
        return await metric(str(client.make_url("")).rstrip("/"), name, **labels)
    except AssertionError as exc:
        raise KeyError(str(exc)) from None


# --- several workers ---------------------------------------------------------


async def test_workers_send_a_conversations_turns_to_one_replica(engine_server, tmp_path: Path):
    """Each request on a connection of its own, so the kernel spreads them over
    the workers; the shared index keeps each conversation on one replica."""
    engines, config = await start_replicas(engine_server)
    config["workers"] = 3
    runtime = tmp_path / "run"
    users, turns = 6, 4
    async with gateway_process(config, tmp_path, env={"RUNTIME_DIRECTORY": str(runtime)}) as gateway:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for turn in range(1, turns + 1):
                for user in range(users):
                    body = {"model": "chat", "messages": conversation(user, turn)}
                    async with session.post(
                        gateway.base + "/v1/chat/completions", json=body, headers=AUTH
                    ) as response:
                        assert response.status == 200, await response.text()
        answered = {p.stem for p in (runtime / "metrics").glob("counter_*.db")}
        assert len(answered) > 1  # more than one worker took requests
        assert await metric(
            gateway.base, "cortex_gateway_routing_decisions_total", decision="affinity"
        ) == users * (turns - 1)
    homes = turn_homes(engines, users, turns)
    assert all(len(set(turns_of)) == 1 for turns_of in homes.values()), homes
