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
import datetime
import io
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import astuple, dataclass, field, fields
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
    latency_ms REAL NOT NULL,
    request_id TEXT
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
"""
# Each record's request id, unique: a batch written again (a retry after a
# lost acknowledgement, a stop during a write) adds no row twice. Rows of
# tables made before the column have none (NULLs never clash).
REQUEST_ID_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS usage_request_id ON usage (request_id)"
GROUPS = ("key", "model", "day")


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
    # The record's own key: what keeps a batch written twice to one row each.
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def _insert_sql(mark: str, verb: str = "INSERT", suffix: str = "") -> str:
    """The INSERT of one record, with the database driver's parameter mark."""
    columns = ", ".join(f.name for f in fields(UsageRecord))
    marks = ", ".join(mark for _field in fields(UsageRecord))
    return f"{verb} INTO usage ({columns}) VALUES ({marks}){suffix}"


class _Store:
    """A connection written from worker threads, one batch at a time."""

    def __init__(self) -> None:
        self._db = None
        # A cancelled writer's thread may still be writing when close() comes.
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class SQLiteStore(_Store):
    """The records in one SQLite file. Every method runs in a worker thread."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = str(path)

    def open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(usage)")}
        if "request_id" not in columns:  # a table made by an older gateway
            self._db.execute("ALTER TABLE usage ADD COLUMN request_id TEXT")
        self._db.execute(REQUEST_ID_INDEX)

    def write(self, records: list[UsageRecord]) -> None:
        with self._lock:
            if self._db is None:
                raise sqlite3.ProgrammingError("the usage database is closed")
            self._db.execute("BEGIN")  # one transaction per batch
            try:
                self._db.executemany(_insert_sql("?", "INSERT OR IGNORE"), [astuple(r) for r in records])
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def report(self, group_by: Iterable[str] = GROUPS, since: float | None = None) -> list[dict]:
        return report(self.path, group_by, since)

    def recent_errors(self, since: float, limit: int) -> list[dict]:
        return _sqlite_rows(self.path, recent_errors_sql("?"), (since, limit))


POSTGRES_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS usage (
        ts DOUBLE PRECISION NOT NULL, key_name TEXT NOT NULL, model TEXT NOT NULL, engine TEXT NOT NULL,
        backend TEXT NOT NULL, stream BOOLEAN NOT NULL, status INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
        ttft_ms DOUBLE PRECISION, latency_ms DOUBLE PRECISION NOT NULL, request_id TEXT)""",
    "CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts)",
    "ALTER TABLE usage ADD COLUMN IF NOT EXISTS request_id TEXT",
    REQUEST_ID_INDEX,
)


class PostgresStore(_Store):
    """The records in a PostgreSQL table that several gateways share. Methods run in a worker thread."""

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self.dsn = dsn

    @staticmethod
    def _driver():
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - psycopg is in the gateway's lock
            raise RuntimeError("usage.postgres_dsn needs the psycopg package") from exc
        return psycopg

    def open(self) -> None:
        self._db = self._connect()

    def _connect(self):
        db = self._driver().connect(self.dsn, autocommit=True)
        with db.transaction():
            for statement in POSTGRES_SCHEMA:
                db.execute(statement)
        return db

    def write(self, records: list[UsageRecord]) -> None:
        """Insert the records in one transaction. A connection that broke
        (PostgreSQL restarted, a network cut) is dropped, and the next write
        connects again: the recorder keeps the batch and tries it then."""
        psycopg = self._driver()
        with self._lock:
            if self._db is None:
                raise RuntimeError("the usage database is closed")
            if self._db.closed or self._db.broken:
                self._db = self._connect()
            try:
                with self._db.transaction(), self._db.cursor() as cursor:
                    cursor.executemany(
                        _insert_sql("%s", suffix=" ON CONFLICT (request_id) DO NOTHING"),
                        [astuple(r) for r in records],
                    )
            except psycopg.OperationalError:
                self._db.close()
                raise

    def report(self, group_by: Iterable[str] = GROUPS, since: float | None = None) -> list[dict]:
        _groups, sql = report_sql(
            group_by, "to_char(to_timestamp(ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD')", "%s"
        )
        return [_tidy(row) for row in self._rows(sql, (since or 0.0,))]

    def recent_errors(self, since: float, limit: int) -> list[dict]:
        return self._rows(recent_errors_sql("%s"), (since, limit))

    def _rows(self, sql: str, params: tuple) -> list[dict]:
        psycopg = self._driver()
        from psycopg.rows import dict_row

        with psycopg.connect(self.dsn, row_factory=dict_row) as db:
            return list(db.execute(sql, params))


def store_for(sqlite_path: str | None, postgres_dsn: str | None):
    """The configured store, or None when no records are kept."""
    if postgres_dsn:
        return PostgresStore(postgres_dsn)
    if sqlite_path:
        return SQLiteStore(sqlite_path)
    return None


def report_sql(group_by: Iterable[str], day_sql: str, placeholder: str) -> tuple[list[str], str]:
    """The report query for a SQL dialect: its day expression and parameter mark."""
    wanted = list(group_by)
    unknown = set(wanted) - set(GROUPS)
    if unknown:
        raise ValueError(f"cannot group by {', '.join(sorted(unknown))}: use {', '.join(GROUPS)}")
    groups = [g for g in GROUPS if g in set(wanted)]
    expressions = {"key": "key_name", "model": "model", "day": day_sql}
    selected = [f"{expressions[g]} AS {g}" for g in groups]
    sql = (
        f"SELECT {', '.join([*selected, 'COUNT(*) AS requests'])}, "  # noqa: S608 - names come from GROUPS
        "SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS errors, SUM(prompt_tokens) AS prompt_tokens, "
        "SUM(completion_tokens) AS completion_tokens, AVG(latency_ms) AS mean_latency_ms "
        f"FROM usage WHERE ts >= {placeholder}"
        + (f" GROUP BY {', '.join(groups)} ORDER BY {', '.join(groups)}" if groups else "")
    )
    return groups, sql


COUNTS = ("requests", "errors", "prompt_tokens", "completion_tokens")


def _tidy(row: dict) -> dict:
    """The same types from every database: whole counts, latency to 0.1 ms."""
    row = {k: (int(v) if k in COUNTS and v is not None else v) for k, v in row.items()}
    if row.get("mean_latency_ms") is not None:
        row["mean_latency_ms"] = round(float(row["mean_latency_ms"]), 1)
    return row


def report(path: str | Path, group_by: Iterable[str] = GROUPS, since: float | None = None) -> list[dict]:
    """Requests, tokens and latency per group (key, model, day), from a SQLite usage database."""
    _groups, sql = report_sql(group_by, "date(ts, 'unixepoch')", "?")
    return [_tidy(row) for row in _sqlite_rows(path, sql, (since or 0.0,))]


def recent_errors_sql(mark: str) -> str:
    """The newest answers with an error status since a time, newest first."""
    columns = "ts, key_name AS key, model, backend, status, latency_ms"
    where = f"ts >= {mark} AND status >= 400"
    return f"SELECT {columns} FROM usage WHERE {where} ORDER BY ts DESC LIMIT {mark}"  # noqa: S608


def _sqlite_rows(path: str | Path, sql: str, params: tuple) -> list[dict]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(sql, params)]
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
    """Takes records from handlers and writes them in batches in the background.

    A batch the database refuses (a full disk, PostgreSQL stopped) is kept and
    written again, with a growing pause, until the database takes it; records
    keep queueing meanwhile up to ``capacity``, and only what does not fit is
    dropped, counted in ``dropped`` and passed to ``on_drop``.
    """

    # The longest pause between two attempts on a failing database.
    MAX_RETRY_SECONDS = 30.0

    def __init__(
        self,
        store: SQLiteStore | PostgresStore,
        *,
        batch: int = 500,
        every: float = 1.0,
        capacity: int = 100_000,
        on_drop: Callable[[int], None] | None = None,
    ):
        self.store = store
        self.batch = batch
        self.every = every
        self.dropped = 0
        self.on_drop = on_drop or (lambda _count: None)
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue(maxsize=capacity)
        self._pending: list[UsageRecord] = []
        self._task: asyncio.Task[None] | None = None
        # A batch write under way in its thread: a stop that cancels the
        # writer waits for it, so the batch is neither lost nor written twice.
        self._writing: asyncio.Future[None] | None = None

    @property
    def buffered(self) -> int:
        return self._queue.qsize() + len(self._pending)

    def record(self, record: UsageRecord) -> None:
        """Never waits: a full buffer (a database away for long) drops the record and counts it."""
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self._drop(1)

    def _drop(self, count: int) -> None:
        self.dropped += count
        self.on_drop(count)

    async def start(self) -> None:
        await asyncio.to_thread(self.store.open)
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def _run(self) -> None:
        pause = self.every
        while True:
            if not self._pending:
                self._pending.append(await self._queue.get())
            await asyncio.sleep(pause)  # let a batch gather, or the database come back
            self._pending.extend(self._take(self.batch - len(self._pending)))
            if await self._write(self._pending):
                self._pending = []
                pause = self.every
            else:
                pause = min(max(pause, self.every) * 2, self.MAX_RETRY_SECONDS)

    def _take(self, limit: int) -> list[UsageRecord]:
        taken = []
        while len(taken) < limit and not self._queue.empty():
            taken.append(self._queue.get_nowait())
        return taken

    async def _write(self, records: list[UsageRecord]) -> bool:
        self._writing = asyncio.ensure_future(asyncio.to_thread(self.store.write, list(records)))
        # Shielded: a cancel (the stop) leaves the write to finish; close() waits for it.
        return await self._outcome(asyncio.shield(self._writing), len(records))

    async def _outcome(self, write: Awaitable[None], count: int) -> bool:
        try:
            await write
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any database error: keep the batch, keep serving
            log.error("could not write %d usage record(s), keeping them to try again: %s", count, exc)
            self._writing = None
            return False
        self._writing = None
        return True

    async def close(self) -> None:
        """Write everything still buffered (one last try), then close the store."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writing is not None and await self._outcome(self._writing, len(self._pending)):
            self._pending = []  # the write the stop interrupted went through
        while self._pending or not self._queue.empty():
            self._pending.extend(self._take(self.batch - len(self._pending)))
            if not await self._write(self._pending):
                self._drop(self.buffered)  # the database is still away at shutdown
                self._pending = []
                self._take(self._queue.qsize())
                break
            self._pending = []
        await asyncio.to_thread(self.store.close)
        if self.dropped:
            log.error("%d usage record(s) were dropped", self.dropped)


def now() -> float:
    return time.time()


def day_start(day: str | None) -> float | None:
    """Unix time of 00:00 UTC of a YYYY-MM-DD day."""
    if not day:
        return None
    try:
        return datetime.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=datetime.UTC).timestamp()
    except ValueError:
        raise ValueError(f"since: expected a day as YYYY-MM-DD, got {day!r}") from None
