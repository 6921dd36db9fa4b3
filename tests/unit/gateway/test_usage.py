"""Usage records: written in batches off the request path, flushed at shutdown,
reported by key, model and day through the admin endpoint and the CLI."""

from __future__ import annotations

import asyncio
import datetime
import signal
import sqlite3
import threading
import time

import aiohttp
from cortex_gateway.__main__ import main
from cortex_gateway.app import Gateway
from cortex_gateway.auth import hash_key
from cortex_gateway.config import parse_config
from cortex_gateway.usage import SQLiteStore, UsageRecord, UsageRecorder, report

from .conftest import AUTH, FakeEngine, gateway_process, make_config
from .test_metrics import scrape, value
from .test_resilience import wait_ready

ADMIN_KEY = "sk-admin-0123456789abcdef0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def usage_config(url: str, path) -> dict:
    config = make_config({"chat": [url]}, usage={"sqlite": str(path)})
    config["auth"]["admin_keys"] = [{"name": "ops", "sha256": hash_key(ADMIN_KEY)}]
    return config


async def test_records_are_flushed_at_shutdown_and_reported(engine_server, aiohttp_client, tmp_path):
    url = await engine_server(FakeEngine(chunks=3))
    path = tmp_path / "usage.db"
    gateway = Gateway(parse_config(usage_config(url, path)))
    client = await aiohttp_client(gateway.build_app())
    await wait_ready(client, "chat", 1)
    for _attempt in range(3):
        assert (await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)).status == 200
    stream = await client.post("/v1/chat/completions", json={"model": "chat", "stream": True}, headers=AUTH)
    await stream.read()
    await client.close()  # SIGTERM's path: requests done, then the records are written

    rows = report(path, ["key", "model"])
    assert rows == [
        {
            "key": "tests",
            "model": "chat",
            "requests": 4,
            "errors": 0,
            "prompt_tokens": 3 * 3 + 5,
            "completion_tokens": 3 * 1 + 3,
            "mean_latency_ms": rows[0]["mean_latency_ms"],
        }
    ]
    day = report(path, ["day"])[0]["day"]
    assert day == datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")


async def test_the_admin_endpoint_needs_an_admin_key(engine_server, gateway_client, tmp_path):
    url = await engine_server(FakeEngine())
    client = await gateway_client(usage_config(url, tmp_path / "usage.db"))
    await wait_ready(client, "chat", 1)
    await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)
    client.gateway.usage.every = 0.0
    assert (await client.admin.get("/admin/usage")).status == 401
    forbidden = await client.admin.get("/admin/usage", headers=AUTH)
    assert forbidden.status == 403
    assert (await forbidden.json())["error"]["type"] == "permission_error"
    for _attempt in range(50):  # the writer runs in the background
        data = (await (await client.admin.get("/admin/usage?group_by=model", headers=ADMIN)).json())["data"]
        if data:
            break
        await asyncio.sleep(0.1)
    assert data[0]["model"] == "chat"
    assert data[0]["requests"] >= 1
    csv_text = await (await client.admin.get("/admin/usage?group_by=model&format=csv", headers=ADMIN)).text()
    assert csv_text.splitlines()[0].startswith("model,requests,errors")
    bad = await client.admin.get("/admin/usage?group_by=colour", headers=ADMIN)
    assert bad.status == 400


async def test_the_cli_reports_the_same(engine_server, aiohttp_client, tmp_path, capsys):
    url = await engine_server(FakeEngine())
    path = tmp_path / "usage.db"
    gateway = Gateway(parse_config(usage_config(url, path)))
    client = await aiohttp_client(gateway.build_app())
    await wait_ready(client, "chat", 1)
    await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)
    await client.close()
    assert main(["usage", "--db", str(path), "--group-by", "key,model", "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "key,model,requests,errors,prompt_tokens,completion_tokens,mean_latency_ms"
    assert lines[1].startswith("tests,chat,1,0,3,1,")
    assert main(["usage", "--db", str(path), "--since", "not-a-day"]) == 2


async def test_sigterm_drains_requests_in_flight_then_writes_every_record(engine_server, tmp_path):
    """A real `cortex-gateway serve` process stopped while answering: the slow
    request still gets its answer, and every request has its record."""
    url = await engine_server(FakeEngine(delay=1.5))
    path = tmp_path / "usage.db"
    config = usage_config(url, path)
    config["workers"] = 2  # the supervisor passes SIGTERM on; each worker drains and flushes
    async with gateway_process(config, tmp_path) as gateway:
        async with aiohttp.ClientSession() as session:

            async def ask() -> int:
                body = {"model": "chat"}
                async with session.post(
                    gateway.base + "/v1/completions", json=body, headers=AUTH
                ) as response:
                    await response.read()
                    return response.status

            in_flight = [asyncio.create_task(ask()) for _request in range(3)]
            await asyncio.sleep(0.5)  # all three are waiting on the engine
            gateway.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(asyncio.gather(*in_flight), 20) == [200, 200, 200]
        assert await asyncio.wait_for(gateway.process.wait(), 40) == 0
    rows = report(path, ["model"])
    assert rows[0]["requests"] == 3


class FlakyStore:
    """A usage store that fails its first writes, as a full disk or a
    stopped PostgreSQL does, and keeps what it was given afterwards."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.written: list = []

    def open(self) -> None:
        pass

    def write(self, records) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        self.written.extend(records)

    def close(self) -> None:
        pass


def record(number: int) -> UsageRecord:
    return UsageRecord(float(number), "k", "m", "llamacpp", "b", False, 200, 1, 1, None, 1.0)


async def test_records_wait_out_a_failing_database_and_are_written_once_it_is_back():
    store = FlakyStore(failures=3)
    dropped: list[int] = []
    recorder = UsageRecorder(store, every=0.01, on_drop=dropped.append)
    await recorder.start()
    for number in range(20):
        recorder.record(record(number))
    for _wait in range(500):
        if len(store.written) == 20:
            break
        await asyncio.sleep(0.01)
    await recorder.close()
    assert [r.ts for r in store.written] == [float(n) for n in range(20)]  # all, once, in order
    assert dropped == []
    assert recorder.dropped == 0


async def test_records_beyond_the_buffer_are_dropped_and_counted():
    store = FlakyStore(failures=10**9)  # never comes back
    dropped: list[int] = []
    recorder = UsageRecorder(store, batch=5, every=0.01, capacity=10, on_drop=dropped.append)
    await recorder.start()
    for number in range(40):
        recorder.record(record(number))
        await asyncio.sleep(0)
    await recorder.close()
    assert store.written == []
    # Everything it could not keep is counted, through the callback too.
    assert recorder.dropped == 40
    assert sum(dropped) == 40


async def test_the_gateway_exports_dropped_usage_records(engine_server, gateway_client, tmp_path):
    url = await engine_server(FakeEngine())
    client = await gateway_client(usage_config(url, tmp_path / "usage.db"))
    await wait_ready(client, "chat", 1)
    samples = await scrape(client)
    # The series exists (at 0) before anything was dropped: an alert can watch it.
    assert ("cortex_gateway_usage_records_dropped_total", ()) in samples
    client.gateway.usage.on_drop(3)
    assert value(await scrape(client), "cortex_gateway_usage_records_dropped_total") == 3


class SlowSQLiteStore(SQLiteStore):
    """A real SQLite store whose batch write takes longer than a stop waits:
    ``writing`` is set once a write is under way."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.writing = threading.Event()

    def write(self, records: list[UsageRecord]) -> None:
        self.writing.set()
        time.sleep(0.5)
        super().write(records)


async def test_a_stop_during_a_batch_write_writes_each_record_once(tmp_path):
    """Defect 6: the stop cancelled the writer while its thread was committing
    a batch; the batch was not cleared and the close wrote it again."""
    store = SlowSQLiteStore(tmp_path / "usage.db")
    recorder = UsageRecorder(store, every=0.01)
    await recorder.start()
    recorder.record(record(1))
    assert await asyncio.to_thread(store.writing.wait, 5)
    await recorder.close()  # while the write is under way
    assert report(tmp_path / "usage.db", [])[0]["requests"] == 1


def test_a_table_from_an_older_gateway_gains_the_request_id_and_keeps_its_rows(tmp_path):
    path = tmp_path / "usage.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE usage (ts REAL NOT NULL, key_name TEXT NOT NULL, model TEXT NOT NULL,"
        " engine TEXT NOT NULL, backend TEXT NOT NULL, stream INTEGER NOT NULL, status INTEGER NOT NULL,"
        " prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, ttft_ms REAL,"
        " latency_ms REAL NOT NULL);"
        " INSERT INTO usage VALUES (1.0, 'old', 'm', 'llamacpp', 'b', 0, 200, 1, 1, NULL, 1.0);"
    )
    old.commit()
    old.close()
    store = SQLiteStore(path)
    store.open()
    again = record(3)
    try:
        store.write([record(2), again])
        store.write([again])  # one record, written twice
    finally:
        store.close()
    assert [row["requests"] for row in report(path, [])] == [3]
