"""Usage records in PostgreSQL, shared by two gateways: a throwaway real
PostgreSQL cluster (Debian's postgresql, installed by scripts/bootstrap) on
loopback, two gateways writing to it, and reports that add both up."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cortex_gateway.app import Gateway
from cortex_gateway.config import ConfigError, parse_config
from cortex_gateway.usage import PostgresStore, UsageRecord

from ..unit.gateway.conftest import AUTH, FakeEngine, free_port, make_config
from ..unit.gateway.test_resilience import wait_ready


class PostgresCluster:
    """A throwaway real PostgreSQL cluster on loopback, owned by the postgres user."""

    def __init__(self) -> None:
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        assert binaries, "PostgreSQL is not installed: scripts/bootstrap installs Debian's postgresql"
        self.bin_dir = binaries[-1]
        # Outside pytest's private temp folder, which the postgres user cannot enter.
        self.data = Path(tempfile.mkdtemp(prefix="cortex-pg-"))
        self.port = free_port()
        # initdb refuses to run as root: the cluster belongs to the postgres user.
        self.user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.user:
            shutil.chown(self.data, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, check: bool = True) -> None:
        subprocess.run(
            [*self.user, f"{self.bin_dir}/{tool}", *args], check=check, capture_output=True, timeout=120
        )

    def start(self, check: bool = True) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1"
        start = ("-D", str(self.data), "-o", options, "-w", "-l", str(self.data / "log"), "start")
        self._run("pg_ctl", *start, check=check)

    def stop(self, check: bool = True) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", check=check)

    def remove(self) -> None:
        self.stop(check=False)
        shutil.rmtree(self.data, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_cluster():
    cluster = PostgresCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="module")
def postgres_dsn(postgres_cluster):
    return postgres_cluster.dsn


async def test_two_gateways_share_one_postgres_usage_table(engine_server, postgres_dsn):
    url = await engine_server(FakeEngine(chunks=2))
    clients = []
    for _gateway in range(2):
        gateway = Gateway(parse_config(make_config({"chat": [url]}, usage={"postgres_dsn": postgres_dsn})))
        client = TestClient(TestServer(gateway.build_app(), host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
    for client in clients:
        await wait_ready(client, "chat", 1)
    for count, client in zip((2, 3), clients, strict=True):
        for _attempt in range(count):
            assert (await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)).status == 200
    stream = await clients[0].post(
        "/v1/chat/completions", json={"model": "chat", "stream": True}, headers=AUTH
    )
    await stream.read()
    for client in clients:
        await client.close()  # each gateway flushes its records as it stops

    rows = PostgresStore(postgres_dsn).report(["key", "model"])
    assert [(r["key"], r["model"], r["requests"], r["errors"]) for r in rows] == [("tests", "chat", 6, 0)]
    assert rows[0]["prompt_tokens"] == 5 * 3 + 5
    assert rows[0]["completion_tokens"] == 5 * 1 + 2
    by_day = PostgresStore(postgres_dsn).report(["day"])
    assert len(by_day) == 1
    assert len(by_day[0]["day"]) == 10


def test_a_dsn_is_checked_and_never_echoed():
    with pytest.raises(ConfigError) as info:
        parse_config(
            make_config({"chat": ["http://127.0.0.1:9"]}, usage={"postgres_dsn": "mysql://u:secret@h/db"})
        )
    assert "secret" not in str(info.value)
    with pytest.raises(ConfigError, match="give sqlite or postgres_dsn, not both"):
        parse_config(
            make_config(
                {"chat": ["http://127.0.0.1:9"]},
                usage={"postgres_dsn": "postgresql://h/db", "sqlite": "/x.db"},
            )
        )


def usage_record(key: str) -> UsageRecord:
    return UsageRecord(
        ts=time.time(), key_name=key, model="chat", engine="llamacpp", backend="b", stream=False,
        status=200, prompt_tokens=3, completion_tokens=1, ttft_ms=None, latency_ms=5.0,
    )  # fmt: skip


def test_the_store_writes_again_after_postgresql_restarts(postgres_cluster):
    """Its connection breaks with the restart: the write that meets it fails
    (the recorder keeps that batch), and the next one connects again."""
    store = PostgresStore(postgres_cluster.dsn)
    store.open()
    try:
        store.write([usage_record("before")])
        postgres_cluster.stop()
        with pytest.raises(psycopg.OperationalError):
            store.write([usage_record("while-away")])
        postgres_cluster.start()
        with contextlib.suppress(psycopg.OperationalError):
            store.write([usage_record("first-after")])  # may meet the broken connection once
        store.write([usage_record("after")])
    finally:
        store.close()
        postgres_cluster.start(check=False)
    keys = {row["key"] for row in PostgresStore(postgres_cluster.dsn).report(["key"])}
    assert {"before", "after"} <= keys
    assert "while-away" not in keys


def test_a_batch_written_again_after_a_lost_acknowledgement_is_kept_once(postgres_cluster):
    """Defect 6: a batch whose commit PostgreSQL made but whose acknowledgement
    was lost is written again whole by the recorder; each record's request id
    keeps it to one row."""
    store = PostgresStore(postgres_cluster.dsn)
    store.open()
    batch = [usage_record("ack-lost-1"), usage_record("ack-lost-2")]
    try:
        store.write(batch)
        store.write(batch)  # the recorder's retry of the same batch
    finally:
        store.close()
    rows = {row["key"]: row["requests"] for row in PostgresStore(postgres_cluster.dsn).report(["key"])}
    assert rows["ack-lost-1"] == 1
    assert rows["ack-lost-2"] == 1
