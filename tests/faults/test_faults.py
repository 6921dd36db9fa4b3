"""Faults done to a real deployment under a bounded client load.

Each test breaks one thing while two clients loop plain requests and two
loop streams through nginx, then reports requests sent, failed, streams cut
(with an SSE error event, or by a closed connection), hung, usage records
lost, and whether /healthz answered throughout. The rows make the table in
docs/faults.md (`pytest tests/faults` prints it).

What must hold: no failed request where another replica could serve it (a
request already under way on an engine that dies is answered with an error:
a stream is cut with an error event, a plain request gets a 502 or 504; it
is never run a second time on another replica), no stream that hangs, no
usage record lost that the database took, and the gateway answering /healthz
throughout (except while it is itself restarted)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import psycopg
import yaml
from cortex_gateway.auth import hash_key

from ..unit.gateway.conftest import AUTH, CLIENT_KEY, gateway_process, make_config
from ..unit.gateway.test_workers import children, metric
from .conftest import MODEL, ROWS, Nginx
from .load import CUT_CLOSED, CUT_WITH_ERROR_EVENT, OK, PLAIN_LOOPS, Tally, run_load

# Short bounds, so that each fault shows within seconds.
TIMEOUTS = {"connect": 2, "first_byte": 10, "idle": 5}
ADMIN_KEY = "sk-admin-faults-0123456789"


def config_for(urls: list[str], usage: dict) -> dict:
    config = make_config({MODEL: urls}, usage=usage, timeouts=TIMEOUTS, workers=2)
    config["health"] = {"interval": 0.5, "unhealthy_after": 2}
    config["auth"]["admin_keys"] = [{"name": "ops", "sha256": hash_key(ADMIN_KEY)}]
    return config


async def poll_health(base: str, stop: asyncio.Event, misses: list[str]) -> None:
    """/healthz every 0.25 s until stopped; every miss is kept."""
    # A restart on the held socket delays answers by seconds; longer is a miss.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        while not stop.is_set():
            try:
                async with session.get(base + "/healthz") as answer:
                    if answer.status != 200:
                        misses.append(f"status {answer.status}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                misses.append(type(exc).__name__)
            await asyncio.sleep(0.25)


async def under_load(nginx: Nginx, fault: Callable[[], Awaitable[None]], **load) -> tuple[Tally, list[str]]:
    """Run the load through nginx, do the fault, stop the load: its tally and /healthz misses."""
    stop = asyncio.Event()
    misses: list[str] = []
    base = f"http://127.0.0.1:{nginx.port}"
    loader = asyncio.create_task(run_load(base + "/v1/chat/completions", CLIENT_KEY, MODEL, stop, **load))
    health = asyncio.create_task(poll_health(base, stop, misses))
    try:
        await asyncio.sleep(1.5)  # requests and streams in flight before the fault
        await fault()
        await asyncio.sleep(3)  # and served after it
    finally:
        stop.set()
    tally = await loader
    await health
    return tally, misses


def records(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT COUNT(*) FROM usage").fetchone()[0]
    finally:
        db.close()


def report(fault: str, tally: Tally, misses: list[str], lost: int, **extra) -> dict:
    row = {
        "fault": fault,
        "sent": tally.sent,
        "failed": tally.failed,
        "cut_event": tally.outcomes[CUT_WITH_ERROR_EVENT],
        "cut_closed": tally.outcomes[CUT_CLOSED],
        "hung": tally.outcomes["hung"],
        "lost": lost,
        "health_ok": not misses,
        "resent": tally.resent,
        "outcomes": dict(tally.outcomes),
        "samples": tally.samples,
        **extra,
    }
    ROWS.append(row)
    return row


# What a request the broken engine had already taken is answered with: the
# gateway's own error (never the same request run again on another replica).
UNDER_WAY_ANSWERS = ("gateway 502", "gateway 504")


def assert_only_requests_under_way_on_the_broken_replica_failed(row: dict, tally: Tally) -> None:
    """What another replica could serve was served: the only failures are
    requests the broken engine had already taken. A stream ends with an SSE
    error event; a non-streamed request is answered 502 or 504 with an error
    that says why, and is not sent to the other replica, where it would run
    a second time. At most the load's streams and plain requests in flight."""
    assert tally.sent >= 6, row
    answered = sum(tally.outcomes[outcome] for outcome in UNDER_WAY_ANSWERS)
    assert tally.failed == tally.outcomes[CUT_WITH_ERROR_EVENT] + answered, row
    assert tally.outcomes[CUT_WITH_ERROR_EVENT] <= 4, row  # at most the streams in flight
    assert answered <= PLAIN_LOOPS, row  # at most the plain requests in flight
    assert row["hung"] == 0, row
    assert row["lost"] == 0, row
    assert row["health_ok"], row


def assert_nothing_failed(row: dict, tally: Tally) -> None:
    """No request failed or hung, no usage record was lost, /healthz always answered."""
    assert tally.failed == 0, row
    assert row["hung"] == 0, row
    assert row["lost"] == 0, row
    assert row["health_ok"], row


async def run_fault(
    name: str,
    urls: list[str],
    nginx: Nginx,
    listener: socket.socket,
    tmp_path: Path,
    fault: Callable[..., Awaitable[None]],
    usage: dict | None = None,
    **load,
) -> tuple[dict, Tally]:
    """A fresh gateway on the port nginx proxies to, the load, the fault; then
    the gateway stops (writing what it buffered) and its records are counted."""
    database = tmp_path / "usage" / "usage.db"
    database.parent.mkdir(exist_ok=True)
    usage = usage or {"sqlite": str(database)}
    async with gateway_process(
        config_for(urls, usage), tmp_path, ready_model=MODEL, listener=listener
    ) as gateway:
        for _attempt in range(50):  # every worker sees both replicas
            async with aiohttp.ClientSession() as session, session.get(gateway.base + "/healthz") as answer:
                if (await answer.json())["ready_backends"][MODEL] == len(urls):
                    break
            await asyncio.sleep(0.2)
        tally, misses = await under_load(nginx, lambda: fault(gateway), **load)
    lost = max(0, tally.gateway_answers - records(database)) if "sqlite" in usage else 0
    return report(name, tally, misses, lost), tally


async def test_an_engine_killed_mid_stream(healthy_engines, nginx, gateway_socket, tmp_path):
    a, b = healthy_engines

    async def kill(_gateway):
        a.signal("KILL")

    row, tally = await run_fault(
        "engine killed (SIGKILL) mid-stream", [a.url, b.url], nginx, gateway_socket, tmp_path, kill
    )
    assert_only_requests_under_way_on_the_broken_replica_failed(row, tally)


async def test_an_engine_frozen_with_sigstop(healthy_engines, nginx, gateway_socket, tmp_path):
    a, b = healthy_engines

    async def freeze(_gateway):
        a.signal("STOP")
        await asyncio.sleep(TIMEOUTS["idle"] + 2)  # past the idle bound of the streams it held

    row, tally = await run_fault(
        "engine frozen (SIGSTOP)", [a.url, b.url], nginx, gateway_socket, tmp_path, freeze
    )
    assert_only_requests_under_way_on_the_broken_replica_failed(row, tally)


async def test_an_engine_that_answers_500(healthy_engines, nginx, gateway_socket, tmp_path, fault_proxy):
    a, b = healthy_engines
    proxy, url = await fault_proxy(a, "pass")

    async def break_it(_gateway):
        proxy.mode = "error500"

    row, tally = await run_fault(
        "engine answers 500", [url, b.url], nginx, gateway_socket, tmp_path, break_it
    )
    assert_nothing_failed(row, tally)


async def test_an_engine_that_trickles(healthy_engines, nginx, gateway_socket, tmp_path, fault_proxy):
    a, b = healthy_engines
    proxy, url = await fault_proxy(a, "pass")

    async def trickle(_gateway):
        proxy.mode = "trickle"
        await asyncio.sleep(TIMEOUTS["idle"] + 3)

    row, tally = await run_fault(
        "engine trickles a byte every 2 s", [url, b.url], nginx, gateway_socket, tmp_path, trickle
    )
    assert_only_requests_under_way_on_the_broken_replica_failed(row, tally)


async def test_a_gateway_worker_killed(healthy_engines, nginx, gateway_socket, tmp_path):
    a, b = healthy_engines

    async def kill_worker(gateway):
        os.kill(min(children(gateway.process.pid)), signal.SIGKILL)

    row, tally = await run_fault(
        "gateway worker killed (SIGKILL)", [a.url, b.url], nginx, gateway_socket, tmp_path, kill_worker
    )
    # What the killed worker held is lost with it: the requests it was
    # serving (at most the 4 clients'), and the usage records it had not
    # written yet (it writes every second); nothing the database took.
    assert tally.failed <= 4, row
    assert set(tally.outcomes) <= {OK, "nginx 502", CUT_CLOSED}, row
    assert row["hung"] == 0, row
    assert row["health_ok"], row


async def test_nginx_reloaded_during_streams(healthy_engines, nginx, gateway_socket, tmp_path):
    a, b = healthy_engines

    async def reload(_gateway):
        nginx.reload()

    row, tally = await run_fault(
        "nginx reloaded during streams", [a.url, b.url], nginx, gateway_socket, tmp_path, reload
    )
    assert_nothing_failed(row, tally)


async def test_the_whole_gateway_restarted_during_streams(healthy_engines, nginx, gateway_socket, tmp_path):
    """What `systemctl restart cortex-gateway` does: SIGTERM to the supervisor
    (in-flight requests get up to 30 s), then the same command started again."""
    a, b = healthy_engines
    database = tmp_path / "usage.db"
    config = config_for([a.url, b.url], {"sqlite": str(database)})
    stop = asyncio.Event()
    misses: list[str] = []
    base = f"http://127.0.0.1:{nginx.port}"
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    try:
        async with gateway_process(config, tmp_path / "first", ready_model=MODEL, listener=gateway_socket):
            loader = asyncio.create_task(run_load(base + "/v1/chat/completions", CLIENT_KEY, MODEL, stop))
            health = asyncio.create_task(poll_health(base, stop, misses))
            await asyncio.sleep(2)
        async with gateway_process(config, tmp_path / "second", ready_model=MODEL, listener=gateway_socket):
            await asyncio.sleep(3)
            stop.set()  # the load ends while this gateway still serves it
            tally = await loader
            await health
    finally:
        stop.set()
    lost = max(0, tally.gateway_answers - records(database))
    row = report("whole gateway restarted during streams", tally, misses, lost)
    # Streams in flight at the stop run to their end (the stop drains them);
    # what comes while no process runs waits in the held socket's backlog.
    assert_nothing_failed(row, tally)


async def test_sqlite_disk_full(healthy_engines, nginx, gateway_socket, tmp_path):
    """The usage database on a 2 MB tmpfs that a filler file fills up, then frees."""
    a, b = healthy_engines
    mount = tmp_path / "usage"
    mount.mkdir()
    mounted = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)]
    await asyncio.to_thread(subprocess.run, mounted, check=True, timeout=30)
    buffered: list[float] = []
    try:

        async def fill_then_free(gateway):
            filler = mount / "filler"
            fill = ["dd", "if=/dev/zero", f"of={filler}", "bs=64k"]
            await asyncio.to_thread(subprocess.run, fill, capture_output=True, check=False)
            await asyncio.sleep(4)
            buffered.append(await metric(gateway.base, "cortex_gateway_usage_records_buffered"))
            filler.unlink()

        row, tally = await run_fault(
            "usage database's disk full (SQLite)",
            [a.url, b.url],
            nginx,
            gateway_socket,
            tmp_path,
            fill_then_free,
        )
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", str(mount)], check=False, timeout=30)
    row["buffered_while_full"] = buffered[0]
    assert buffered[0] > 0, "records were not held while the disk was full"
    assert_nothing_failed(row, tally)


async def test_postgres_stopped_and_started(
    healthy_engines, nginx, gateway_socket, tmp_path, postgres_cluster
):
    a, b = healthy_engines
    postgres_dsn = postgres_cluster.dsn
    held: list[float] = []

    async def stop_then_start(gateway):
        await asyncio.to_thread(postgres_cluster.stop)
        await asyncio.sleep(4)
        held.append(await metric(gateway.base, "cortex_gateway_usage_records_buffered"))
        await asyncio.to_thread(postgres_cluster.start)

    before = pg_count(postgres_dsn)
    row, tally = await run_fault(
        "PostgreSQL stopped, started again",
        [a.url, b.url],
        nginx,
        gateway_socket,
        tmp_path,
        stop_then_start,
        usage={"postgres_dsn": postgres_dsn},
    )
    row["lost"] = max(0, tally.gateway_answers - (pg_count(postgres_dsn) - before))
    row["buffered_while_stopped"] = held[0]
    assert held[0] > 0, "records were not held while PostgreSQL was away"
    assert_nothing_failed(row, tally)


def pg_count(dsn: str) -> int:
    with psycopg.connect(dsn) as db:
        exists = db.execute("SELECT to_regclass('usage') IS NOT NULL").fetchone()[0]
        return db.execute("SELECT COUNT(*) FROM usage").fetchone()[0] if exists else 0


def raw_connection(port: int, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def http_request(path: str, body: bytes = b"", *, length: int | None = None) -> bytes:
    method = "POST" if body or length else "GET"
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {AUTH['Authorization']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    return head.encode() + body


async def test_a_client_that_reads_a_stream_very_slowly(healthy_engines, nginx, gateway_socket, tmp_path):
    a, b = healthy_engines
    read: list[int] = []

    async def slow_reader(_gateway):
        body = (
            b'{"model": "%s", "stream": true, "max_tokens": 200, '
            b'"messages": [{"role": "user", "content": "Tell me a long story."}]}' % MODEL.encode()
        )
        sock = raw_connection(nginx.port, receive_buffer=2048)
        try:
            sock.sendall(http_request("/v1/chat/completions", body))
            for _step in range(16):  # 64 bytes every half second, for 8 s
                read.append(len(sock.recv(64)))
                await asyncio.sleep(0.5)
        finally:
            sock.close()

    row, tally = await run_fault(
        "a client reads a stream very slowly", [a.url, b.url], nginx, gateway_socket, tmp_path, slow_reader
    )
    assert sum(read) > 0, "the slow client got nothing at all"
    assert_nothing_failed(row, tally)


async def test_a_client_that_sends_its_body_one_byte_a_second(
    healthy_engines, nginx, gateway_socket, tmp_path
):
    a, b = healthy_engines

    async def slow_body(_gateway):
        socks = [
            raw_connection(port) for port in (nginx.port, gateway_socket.getsockname()[1])
        ]  # through nginx, and straight
        try:
            for sock in socks:
                sock.sendall(http_request("/v1/chat/completions", length=200))
            for _second in range(8):
                for sock in socks:
                    sock.sendall(b" ")
                await asyncio.sleep(1)
        finally:
            for sock in socks:
                sock.close()

    row, tally = await run_fault(
        "a client sends its body one byte a second",
        [a.url, b.url],
        nginx,
        gateway_socket,
        tmp_path,
        slow_body,
    )
    assert_nothing_failed(row, tally)


async def test_200_idle_keep_alive_connections(healthy_engines, nginx, gateway_socket, tmp_path):
    a, b = healthy_engines
    answered: list[int] = []

    async def idle_connections(_gateway):
        socks = []
        try:
            for index in range(200):
                # Half through nginx, half straight to the gateway; each asks once, then idles.
                sock = raw_connection(nginx.port if index % 2 else gateway_socket.getsockname()[1])
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                socks.append(sock)
            for sock in socks:
                answered.append(sock.recv(12).startswith(b"HTTP/1.1 200"))
            await asyncio.sleep(4)
        finally:
            for sock in socks:
                sock.close()

    row, tally = await run_fault(
        "200 idle keep-alive connections", [a.url, b.url], nginx, gateway_socket, tmp_path, idle_connections
    )
    assert sum(answered) == 200
    assert_nothing_failed(row, tally)


def gateway_log(folder: Path) -> str:
    return (folder / "gateway.log").read_text(errors="replace")


async def test_a_reload_with_a_broken_config(healthy_engines, nginx, gateway_socket, tmp_path):
    a, b = healthy_engines

    async def broken_reload(gateway):
        good = gateway.config_path.read_text()
        gateway.config_path.write_text(good.replace("models:", "models: [", 1))
        gateway.process.send_signal(signal.SIGHUP)
        await asyncio.sleep(2)
        gateway.config_path.write_text(good)

    row, tally = await run_fault(
        "reload with a broken config file", [a.url, b.url], nginx, gateway_socket, tmp_path, broken_reload
    )
    assert "config reload failed, every worker keeps the running config" in gateway_log(tmp_path)
    assert_nothing_failed(row, tally)


async def test_a_reload_during_a_drain(healthy_engines, nginx, gateway_socket, tmp_path):
    a, b = healthy_engines
    states: list[bool] = []

    async def drain_then_reload(gateway):
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with aiohttp.ClientSession() as session:
            drain = {"backend": a.url, "seconds": 60, "wait": 10}
            async with session.post(
                gateway.admin_base + "/admin/backends/drain", json=drain, headers=admin
            ) as answer:
                assert answer.status == 200, await answer.text()
            config = yaml.safe_load(gateway.config_path.read_text())
            config["health"]["interval"] = 0.6  # a real change
            gateway.config_path.write_text(yaml.safe_dump(config))
            gateway.process.send_signal(signal.SIGHUP)
            await asyncio.sleep(2)
            async with session.get(gateway.admin_base + "/admin/backends", headers=admin) as answer:
                rows = (await answer.json())["data"]
            states.extend(row["draining"] for row in rows if row["url"] == a.url)
            undrain = {"backend": a.url, "wait": 10}
            async with session.post(
                gateway.admin_base + "/admin/backends/undrain", json=undrain, headers=admin
            ):
                pass

    row, tally = await run_fault(
        "reload during a drain", [a.url, b.url], nginx, gateway_socket, tmp_path, drain_then_reload
    )
    assert states == [True], "the drain did not outlive the reload"
    assert_nothing_failed(row, tally)
