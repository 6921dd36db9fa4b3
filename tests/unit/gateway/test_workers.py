"""Several worker processes on one port: what they share, and the supervisor's care of them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from cortex_gateway.auth import hash_key
from cortex_gateway.limits import CounterTable, KeyPolicy, Limiter, Refusal
from cortex_gateway.slots import SlotTable
from prometheus_client.parser import text_string_to_metric_families

from .conftest import (
    AUTH,
    CLIENT_KEY,
    FakeEngine,
    free_port,
    gateway_process,
    listeners,
    make_config,
    socket_activated,
    stop_process,
)

WORKERS = 3


def children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


async def ask(base: str, path: str = "/v1/completions", method: str = "POST") -> tuple[int, dict]:
    """One request on a connection of its own, so the kernel picks a worker for each."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        body = {"model": "chat"} if method == "POST" else None
        async with session.request(method, base + path, json=body, headers=AUTH) as response:
            return response.status, await response.json(content_type=None)


async def metric(base: str, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(base + "/metrics") as response:
        text = await response.text()
    found = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]
    assert found, f"no series {name}{labels}"  # a missing series is not a 0
    return sum(found)


def two_workers_share(tmp_path: Path) -> tuple[Limiter, Limiter]:
    path = str(tmp_path / "limits")
    policies = {"k": KeyPolicy(requests_per_minute=3, concurrent_streams=1)}
    return Limiter(policies, CounterTable(path)), Limiter(dict(policies), CounterTable(path))


def test_limiters_on_one_table_count_together(tmp_path):
    first, second = two_workers_share(tmp_path)
    first.admit("k", "m", False, now=100.0)
    second.admit("k", "m", False, now=101.0)
    first.admit("k", "m", True, now=102.0)
    with pytest.raises(Refusal, match="over its 3 requests per minute"):
        second.admit("k", "m", False, now=103.0)
    assert second.streams_open("k") == 1
    first.done("k", True, 0)
    assert second.streams_open("k") == 0
    # A minute later the buckets are reused in place, not summed with the old ones.
    second.admit("k", "m", False, now=160.5)
    assert first.streams_open("k") == 0


def test_the_table_tells_keys_apart_and_fills_up(tmp_path):
    table = CounterTable(str(tmp_path / "small"), slots=2)
    policies = {name: KeyPolicy(requests_per_minute=1) for name in ("a", "b", "c")}
    limiter = Limiter(policies, table)
    limiter.admit("a", "m", False, now=0.0)
    limiter.admit("b", "m", False, now=0.0)  # a's count is not b's
    with pytest.raises(RuntimeError, match="room for 2 keys"):
        limiter.admit("c", "m", False, now=0.0)


async def test_workers_share_the_port_limits_and_metrics(engine_server, tmp_path):
    """A real gateway with three workers: every worker answers, /metrics on any
    of them counts every request, and a key's limit holds for the whole gateway."""
    config = make_config({"chat": [await engine_server(FakeEngine())]}, workers=WORKERS)
    config["auth"]["api_keys"] = [
        {"name": "tests", "sha256": hash_key(CLIENT_KEY), "limits": {"requests_per_minute": 12}}
    ]
    runtime = tmp_path / "run"
    async with gateway_process(config, tmp_path, env={"RUNTIME_DIRECTORY": str(runtime)}) as gateway:
        workers = children(gateway.process.pid)
        assert len(workers) == WORKERS
        statuses = [(await ask(gateway.base))[0] for _request in range(30)]
        # The limit is the gateway's: 12 in the minute, wherever each connection landed.
        assert statuses.count(200) == 12
        assert statuses.count(429) == 18
        # Each worker that answered has its own file of samples; 30 connections
        # over 3 workers all landing on one would be a 1 in 3^29 chance.
        answered = {int(p.stem.rsplit("_", 1)[1]) for p in (runtime / "metrics").glob("counter_*.db")}
        assert answered == workers
        for _scrape in range(5):  # whichever worker answers /metrics reports the whole gateway
            assert await metric(gateway.base, "cortex_gateway_requests_total", status="200") == 12
            assert await metric(gateway.base, "cortex_gateway_requests_total", status="429") == 18
            assert await metric(gateway.base, "cortex_gateway_backend_up", model="chat") == 1


async def test_the_supervisor_restarts_a_dead_worker_and_passes_on_sighup(engine_server, tmp_path):
    chat, embed = await engine_server(FakeEngine()), await engine_server(FakeEngine())
    config = make_config({"chat": [chat]}, workers=2)
    async with gateway_process(config, tmp_path) as gateway:
        before = children(gateway.process.pid)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        # The supervisor starts a new worker, which listens beside the other.
        for _attempt in range(100):
            now = children(gateway.process.pid)
            if len(now) == 2 and victim not in now and listeners(config["listen"]["port"]) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(now) == 2
        assert victim not in now
        assert [(await ask(gateway.base))[0] for _request in range(10)] == [200] * 10

        config["models"] += make_config({"embed": [embed]})["models"]
        gateway.config_path.write_text(yaml.safe_dump(config))
        gateway.process.send_signal(signal.SIGHUP)
        seen: list[set[str]] = []
        for _attempt in range(50):
            seen = [{m["id"] for m in (await ask(gateway.base, "/v1/models", "GET"))[1]["data"]}
                    for _request in range(10)]  # fmt: skip
            if all(models == {"chat", "embed"} for models in seen):
                break
            await asyncio.sleep(0.1)
        assert all(models == {"chat", "embed"} for models in seen)
        assert children(gateway.process.pid) == now  # reloaded in place, not restarted


async def test_workers_end_with_the_supervisor_and_ignore_the_terminals_ctrl_c(engine_server, tmp_path):
    config = make_config({"chat": [await engine_server(FakeEngine())]}, workers=2)
    async with gateway_process(config, tmp_path) as gateway:
        workers = children(gateway.process.pid)
        assert all(
            os.getpgid(w) == w for w in workers
        )  # their own groups: a group kill reaches the supervisor
        gateway.process.kill()  # SIGKILL: nothing is passed on
        await gateway.process.wait()
        for _attempt in range(50):
            alive = [w for w in workers if _state(w) != "Z"]
            if not alive:
                break
            await asyncio.sleep(0.1)
        assert alive == []
        assert listeners(config["listen"]["port"]) == 0


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


async def wait_for_workers(gateway, count: int, gone: set[int] = frozenset()) -> set[int]:
    for _attempt in range(100):
        now = children(gateway.process.pid)
        if len(now) == count and not now & gone and listeners(gateway.config["listen"]["port"]) == count:
            return now
        await asyncio.sleep(0.1)
    raise AssertionError(f"the supervisor has {children(gateway.process.pid)}, not {count} new workers")


async def test_a_worker_started_again_serves_the_config_the_last_reload_accepted(engine_server, tmp_path):
    """A key revoked and a model added by a reload stay so when a worker dies and
    is started again; and a later broken config file is not what it serves."""
    chat, embed = await engine_server(FakeEngine()), await engine_server(FakeEngine())
    config = make_config({"chat": [chat]}, workers=2)
    async with gateway_process(config, tmp_path) as gateway:
        assert (await ask(gateway.base))[0] == 200
        config["models"] += make_config({"embed": [embed]})["models"]
        config["auth"]["api_keys"] = [
            {"name": "other", "sha256": hash_key("another-key")},
            {"name": "lister", "sha256": hash_key("lister-key"), "models": ["embed"]},
        ]
        gateway.config_path.write_text(yaml.safe_dump(config))
        gateway.process.send_signal(signal.SIGHUP)
        for _attempt in range(50):
            statuses = [(await ask(gateway.base))[0] for _request in range(10)]
            if statuses == [401] * 10:
                break
            await asyncio.sleep(0.1)
        assert statuses == [401] * 10
        # A broken file afterwards is refused by the reload, and must not be
        # what a restarted worker reads either.
        gateway.config_path.write_text("models: [not a mapping\n")
        gateway.process.send_signal(signal.SIGHUP)
        for victim in sorted(children(gateway.process.pid)):
            os.kill(victim, signal.SIGKILL)
            await wait_for_workers(gateway, 2, {victim})
        # Each connection lands on either worker: both started after the reload.
        assert [(await ask(gateway.base))[0] for _request in range(20)] == [401] * 20
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for _request in range(10):
                async with session.get(
                    gateway.base + "/v1/models", headers={"Authorization": "Bearer lister-key"}
                ) as response:
                    assert {m["id"] for m in (await response.json())["data"]} == {"chat", "embed"}


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


async def test_a_restart_on_a_passed_socket_refuses_no_connection(engine_server, tmp_path):
    """Socket activation, as systemd does it: the gateway's workers accept on
    the socket they were given. A request sent while no gateway process runs
    at all waits in the socket's backlog and is answered by the next one."""
    config = make_config({"chat": [await engine_server(FakeEngine())]}, workers=2)
    with listening_socket() as sock:
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with gateway_process(config, tmp_path, listener=sock) as first:
            assert len(children(first.process.pid)) == 2
            # Bounded: a gateway that does not accept on the socket leaves the connection waiting.
            assert [(await asyncio.wait_for(ask(base), 15))[0] for _request in range(6)] == [200] * 6
            assert "serving on the socket systemd passed" in (tmp_path / "gateway.log").read_text()
        assert first.process.returncode == 0  # stopped: nothing of the gateway runs now
        waiting = asyncio.create_task(ask(base))  # connects at once: the kernel holds it
        await asyncio.sleep(0.5)
        assert not waiting.done()
        async with gateway_process(dict(config), tmp_path, listener=sock):
            assert (await asyncio.wait_for(waiting, 30))[0] == 200


async def test_a_passed_socket_on_another_port_than_the_config_is_refused(engine_server, tmp_path):
    config = make_config({"chat": [await engine_server(FakeEngine())]})
    config["listen"]["port"] = 1  # not the socket's
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    with listening_socket() as sock:
        command = socket_activated(
            [sys.executable, "-m", "cortex_gateway", "serve", "--config", str(path)], sock.fileno()
        )
        process = await asyncio.create_subprocess_exec(
            *command, stderr=asyncio.subprocess.PIPE, pass_fds=(sock.fileno(),),
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )  # fmt: skip
        port = sock.getsockname()[1]
        _out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert f"the socket systemd passed listens on port {port}, but listen.port is 1" in err.decode()


def test_workers_run_on_uvloop_unless_told_otherwise(monkeypatch):
    import uvloop
    from cortex_gateway.config import ConfigError
    from cortex_gateway.workers import EVENT_LOOP_VARIABLE, new_event_loop

    monkeypatch.delenv(EVENT_LOOP_VARIABLE, raising=False)
    loop = new_event_loop()
    assert isinstance(loop, uvloop.Loop)
    loop.close()
    monkeypatch.setenv(EVENT_LOOP_VARIABLE, "asyncio")
    loop = new_event_loop()
    assert not isinstance(loop, uvloop.Loop)
    loop.close()
    monkeypatch.setenv(EVENT_LOOP_VARIABLE, "trio")
    with pytest.raises(ConfigError, match="CORTEX_GATEWAY_EVENT_LOOP: must be uvloop or asyncio, got 'trio'"):
        new_event_loop()


async def test_a_reload_sent_while_the_workers_start_reaches_every_worker(engine_server, tmp_path):
    """Defect 7: a new worker ignored SIGHUP until its first health checks
    ended, so a reload sent meanwhile was lost in it until the next reload."""
    slow = FakeEngine(health_delay=1.5)  # each worker's first health round takes this long
    chat, embed = await engine_server(slow), await engine_server(FakeEngine())
    config = make_config({"chat": [chat]}, workers=2)
    config["listen"]["port"] = free_port()
    config["admin_listen"] = {"host": "127.0.0.1", "port": free_port()}
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "gateway.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cortex_gateway", "serve", "--config", str(path), stdout=log, stderr=log,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    base = f"http://127.0.0.1:{config['listen']['port']}"
    try:
        # Both workers forked, and neither listening yet (their first health round runs).
        for _attempt in range(100):
            if len(children(process.pid)) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(children(process.pid)) == 2
        assert listeners(config["listen"]["port"]) == 0
        config["models"] += make_config({"embed": [embed]})["models"]
        path.write_text(yaml.safe_dump(config))
        process.send_signal(signal.SIGHUP)
        for _attempt in range(100):
            if listeners(config["listen"]["port"]) == 2:
                break
            await asyncio.sleep(0.1)
        assert listeners(config["listen"]["port"]) == 2
        seen: list[set[str]] = []
        for _attempt in range(50):
            seen = [{m["id"] for m in (await ask(base, "/v1/models", "GET"))[1]["data"]}
                    for _request in range(16)]  # fmt: skip
            if all(models == {"chat", "embed"} for models in seen):
                break
            await asyncio.sleep(0.1)
        assert all(models == {"chat", "embed"} for models in seen), seen
    finally:
        await stop_process(process)
        log.close()


async def test_an_engines_slots_are_counted_across_every_worker(engine_server, tmp_path):
    """Defect 5: in-flight counts and queues were per worker, so with two
    workers an engine with one slot got two requests at once."""
    engine = FakeEngine(delay=0.4)
    config = make_config({"chat": [await engine_server(engine)]}, workers=2)
    config["models"][0]["backends"][0]["max_concurrency"] = 1
    # Room in the queue for all six on one worker: the kernel may give one
    # worker every connection (a loaded machine does), and the test is about
    # the slot, not the queue's size (4 places per slot by default).
    config["queue"] = {"per_slot": 6}
    async with gateway_process(config, tmp_path) as gateway:
        # Each request on a connection of its own: the kernel spreads them over both workers.
        answers = await asyncio.gather(*(ask(gateway.base) for _request in range(6)))
    assert [status for status, _body in answers] == [200] * 6
    assert len(engine.received) == 6
    assert engine.most_running == 1


def test_a_slot_is_taken_once_across_workers_and_a_dead_workers_slots_come_back(tmp_path):
    path = str(tmp_path / "slots")
    first, second = SlotTable(path, 2, 0), SlotTable(path, 2, 1)
    column = first.column("chat", "http://10.0.0.1:8080")
    assert second.column("chat", "http://10.0.0.1:8080") == column
    # Another model on the same address (a pool's router) has slots of its own.
    assert first.column("other", "http://10.0.0.1:8080") != column
    assert first.take(column, 2)
    assert second.take(column, 2)
    assert not first.take(column, 2)
    assert first.in_flight(column) == second.in_flight(column) == 2
    second.clear_worker(1)  # the supervisor, for a dead worker
    assert first.in_flight(column) == 1
    assert second.take(column, 2)
    first.give(column)
    assert second.in_flight(column) == 1


async def test_a_running_gateway_says_where_its_admin_api_is_and_what_a_restart_would_change(
    engine_server, tmp_path
):
    """What the roles read (defect 2): drains go to the admin address the
    running gateway listens on, and a converge compares the restart key of
    the new config file with the running one's to reload or restart."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    config = make_config({"chat": [await engine_server(FakeEngine())]}, workers=2)
    async with gateway_process(config, tmp_path, env={"RUNTIME_DIRECTORY": str(runtime)}) as gateway:
        admin = (runtime / "admin-url").read_text().strip()
        assert admin == gateway.admin_base
        running_key = (runtime / "restart-key").read_text().strip()

        def key_of(changed: dict) -> str:
            path = tmp_path / "new.yml"
            path.write_text(yaml.safe_dump(changed))
            return subprocess.run(
                [sys.executable, "-m", "cortex_gateway", "restart-key", "--config", str(path)],
                capture_output=True, text=True, check=True, timeout=60,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
            ).stdout.strip()  # fmt: skip

        assert key_of(gateway.config) == running_key
        # A reload applies these: the same key.
        assert key_of({**gateway.config, "timeouts": {"first_byte": 30}, "models": []}) == running_key
        # Only a restart applies these.
        assert key_of({**gateway.config, "admin_listen": {"host": "127.0.0.1", "port": 1}}) != running_key
        assert key_of({**gateway.config, "limits": {"max_body_bytes": 1024}}) != running_key
        assert key_of({**gateway.config, "workers": 3}) != running_key
