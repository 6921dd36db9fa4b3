"""Engine slots counted across every worker process of one gateway.

An engine runs so many requests at once (llama.cpp ``--parallel``, vLLM
``--max-num-seqs``); the gateway sends it no more. With several workers each
worker's own count is a fraction of the truth, so the count lives in a file
that every worker maps (MAP_SHARED): one row per worker, one column per
backend (a model on an engine address). A worker writes only its own row; it
takes a slot under an fcntl lock on the file, after adding up the column, so
two workers never both take an engine's last slot. The supervisor empties a
dead worker's row before it starts the worker again: the requests that row
counted died with it (their connections closed).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os

from .sharedmap import map_file

log = logging.getLogger(__name__)

# Backends the table has room for; past that a backend is counted by each
# worker alone (logged), never refused.
# The flow board (queueing.py) keeps its shared counts here too: waiting
# requests and reserved slots in use per model and class, a counter per key
# and model.
COLUMNS = 4096
_KEY_WORDS = 2  # 16 bytes of a blake2b digest per column
_WORD = 8


def backend_key(model: str, url: str) -> tuple[int, int]:
    """A backend's column key: a model on an engine address (a pool's router
    serves several models at one address, each with slots of its own)."""
    digest = hashlib.blake2b(f"{model}\0{url}".encode(), digest_size=16).digest()
    high = int.from_bytes(digest[:8], "little", signed=True)
    low = int.from_bytes(digest[8:], "little", signed=True)
    return (high or 1, low)  # (0, 0) marks a free column


class SlotTable:
    """The shared in-flight counts: ``take`` a slot of a backend when the sum
    of every worker's count is under its limit, ``give`` it back after."""

    def __init__(self, path: str, workers: int, worker: int) -> None:
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} is not one of {workers}")
        self.workers = workers
        self.worker = worker
        size = (COLUMNS * _KEY_WORDS + workers * COLUMNS) * _WORD
        self._fd, self.path, self._map = map_file(path, size, "cortex-gateway-slots-")
        self._words = memoryview(self._map).cast("q")
        self._counts = COLUMNS * _KEY_WORDS
        self._full_logged = False

    def close(self) -> None:
        self._words.release()
        self._map.close()
        os.close(self._fd)

    def column(self, model: str, url: str) -> int | None:
        """The backend's column, claimed on first sight (None: the table is full)."""
        high, low = backend_key(model, url)
        start = (high ^ low) % COLUMNS
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            for step in range(COLUMNS):
                column = (start + step) % COLUMNS
                at = column * _KEY_WORDS
                found = (self._words[at], self._words[at + 1])
                if found == (high, low):
                    return column
                if found == (0, 0):
                    self._words[at], self._words[at + 1] = high, low
                    return column
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
        if not self._full_logged:
            log.error("the shared slot table is full (%d backends): more are counted per worker", COLUMNS)
            self._full_logged = True
        return None

    def _cell(self, worker: int, column: int) -> int:
        return self._counts + worker * COLUMNS + column

    def in_flight(self, column: int) -> int:
        """Requests on the backend from every worker."""
        return sum(self._words[self._cell(w, column)] for w in range(self.workers))

    def take(self, column: int, limit: int) -> bool:
        """Take one of the backend's ``limit`` slots, if one is free in every worker's sight."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            if self.in_flight(column) >= limit:
                return False
            self._words[self._cell(self.worker, column)] += 1
            return True
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def own(self, column: int) -> int:
        """This worker's count."""
        return self._words[self._cell(self.worker, column)]

    def values(self, column: int) -> list[int]:
        """Every worker's value, by worker."""
        return [self._words[self._cell(w, column)] for w in range(self.workers)]

    def set_own(self, column: int, value: int) -> None:
        """This worker's value (an estimate, not a count)."""
        self._words[self._cell(self.worker, column)] = value

    def add(self, column: int, delta: int) -> None:
        """Change this worker's count (a counter, not a slot: no limit). Only
        this worker writes its row: no lock needed."""
        self._words[self._cell(self.worker, column)] += delta

    def give(self, column: int) -> None:
        """Give a slot back. Only this worker writes its row: no lock needed."""
        cell = self._cell(self.worker, column)
        self._words[cell] = max(self._words[cell] - 1, 0)

    def clear_worker(self, worker: int) -> None:
        """Forget what a dead worker held (the supervisor, before starting it again)."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            for column in range(COLUMNS):
                self._words[self._cell(worker, column)] = 0
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
