"""Usage records: one per model request, written off the request path in batches.

Handlers only put a record on a bounded in-memory queue; a background task
writes batches to SQLite (WAL mode, so readers never block the writer) in a
worker thread. On shutdown the queue is drained into the database after the
last request finished, so nothing answered is lost. Reports group by key,
model and day, and export CSV.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import astuple, dataclass, fields
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    ts REAL NOT NULL,
    key_name TEXT NOT NULL,
    model TEXT NOT NULL,
    engine TEXT NOT NULL,
    backend TEXT NOT NULL,
    stream INTEGER NOT NULL,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    ttft_ms REAL,
    latency_ms REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
"""
GROUPS = ("key", "model", "day")
_GROUP_SQL = {"key": "key_name", "model": "model", "day": "date(ts, 'unixepoch')"}


@dataclass(frozen=True, slots=True)
class UsageRecord:
    ts: float
    key_name: str
    model: str
    engine: str
    backend: str
    stream: bool
    status: int
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    latency_ms: float


class SQLiteStore:
    """The records in one SQLite file. Every method runs in a worker thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db: sqlite3.Connection | None = None
        # A cancelled writer's thread may still be writing when close() comes.
        self._lock = threading.Lock()

    def open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def write(self, records: list[UsageRecord]) -> None:
        columns = ", ".join(f.name for f in fields(UsageRecord))
        marks = ", ".join("?" for _field in fields(UsageRecord))
        with self._lock:
            if self._db is None:
                raise sqlite3.ProgrammingError("the usage database is closed")
            self._db.execute("BEGIN")  # one transaction per batch
            try:
                self._db.executemany(
                    f"INSERT INTO usage ({columns}) VALUES ({marks})",  # noqa: S608 - our own column names
                    [astuple(r) for r in records],
                )
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def report(path: str | Path, group_by: Iterable[str] = GROUPS, since: float | None = None) -> list[dict]:
    """Requests, tokens and latency per group (key, model, day), from a usage database."""
    groups = [g for g in GROUPS if g in set(group_by)]
    unknown = set(group_by) - set(GROUPS)
    if unknown:
        raise ValueError(f"cannot group by {', '.join(sorted(unknown))}: use {', '.join(GROUPS)}")
    selected = [f"{_GROUP_SQL[g]} AS {g}" for g in groups]
    sql = (
        f"SELECT {', '.join([*selected, 'COUNT(*) AS requests'])}, "  # noqa: S608 - names come from GROUPS
        "SUM(status >= 400) AS errors, SUM(prompt_tokens) AS prompt_tokens, "
        "SUM(completion_tokens) AS completion_tokens, ROUND(AVG(latency_ms), 1) AS mean_latency_ms "
        "FROM usage WHERE ts >= ?"
        + (f" GROUP BY {', '.join(groups)} ORDER BY {', '.join(groups)}" if groups else "")
    )
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(sql, (since or 0.0,))]
    finally:
        db.close()


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


class UsageRecorder:
    """Takes records from handlers and writes them in batches in the background."""

    def __init__(self, store: SQLiteStore, *, batch: int = 500, every: float = 1.0, capacity: int = 100_000):
        self.store = store
        self.batch = batch
        self.every = every
        self.dropped = 0
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue(maxsize=capacity)
        self._pending: list[UsageRecord] = []
        self._task: asyncio.Task[None] | None = None

    def record(self, record: UsageRecord) -> None:
        """Never waits: a full queue (a stuck disk) drops the record and counts it."""
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1

    async def start(self) -> None:
        await asyncio.to_thread(self.store.open)
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def _run(self) -> None:
        while True:
            self._pending.append(await self._queue.get())
            await asyncio.sleep(self.every)  # let a batch gather
            self._pending.extend(self._take(self.batch - len(self._pending)))
            batch, self._pending = self._pending, []
            await self._write(batch)

    def _take(self, limit: int) -> list[UsageRecord]:
        taken = []
        while len(taken) < limit and not self._queue.empty():
            taken.append(self._queue.get_nowait())
        return taken

    async def _write(self, records: list[UsageRecord]) -> None:
        try:
            await asyncio.to_thread(self.store.write, records)
        except sqlite3.Error as exc:
            self.dropped += len(records)
            log.error("could not write %d usage record(s): %s", len(records), exc)

    async def close(self) -> None:
        """Write everything still queued, then close the store."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pending:
            batch, self._pending = self._pending, []
            await self._write(batch)
        while not self._queue.empty():
            await self._write(self._take(self.batch))
        await asyncio.to_thread(self.store.close)
        if self.dropped:
            log.error("%d usage record(s) were dropped", self.dropped)


def now() -> float:
    return time.time()
