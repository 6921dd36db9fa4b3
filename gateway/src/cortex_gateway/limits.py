"""Per-key limits: which models a key may use, requests and tokens per minute,
and streams open at once.

Counts live in a shared counter table (a memory-mapped file, see CounterTable)
so that every worker process of one gateway sees the same numbers: a key's
limit is the limit of the gateway, however the kernel spreads connections over
the workers. Minutes slide over one-second buckets, so a burst at a minute's
edge cannot double a limit.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import time

from .policies import KeyPolicy
from .sharedmap import map_file

log = logging.getLogger(__name__)


class Refusal(Exception):
    def __init__(self, status: int, message: str, code: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


# One slot per key: [key id, open streams, 60 x (second, requests), 60 x (second, tokens)],
# all signed 64-bit words. A bucket belongs to the minute while its second is
# within the last 60; an older one is reused in place (ring by second % 60).
_SECONDS = 60
_REQUESTS = 2
_TOKENS = _REQUESTS + 2 * _SECONDS
_SLOT_WORDS = _TOKENS + 2 * _SECONDS
_WORD = 8


class TableFull(RuntimeError):
    pass


class CounterTable:
    """Fixed-size open-addressing table of per-key counters in a shared mapping.

    Each worker opens the same file and maps it MAP_SHARED; every operation
    holds an fcntl record lock on the file for a few microseconds. fcntl locks
    belong to a process and go away with it, so a worker killed inside the
    lock cannot wedge the others. Only keys that have a limit take a slot;
    pages of slots never used are never touched, so a large table costs
    address space, not memory.
    """

    def __init__(self, path: str | None = None, slots: int = 4096) -> None:
        self.slots = slots
        # A process of its own (no path) gets a private file, gone when closed.
        self._fd, self.path, self._map = map_file(path, slots * _SLOT_WORDS * _WORD, "cortex-gateway-limits-")
        self._words = memoryview(self._map).cast("q")

    def close(self) -> None:
        self._words.release()
        self._map.close()
        os.close(self._fd)

    def __enter__(self) -> memoryview:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        return self._words

    def __exit__(self, *_exc: object) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def slot(self, words: memoryview, key_name: str) -> int:
        """The first word of the key's slot, claimed if new (call inside the lock)."""
        digest = hashlib.blake2b(key_name.encode(), digest_size=8).digest()
        key_id = int.from_bytes(digest, "little", signed=True)
        key_id = key_id or 1  # 0 marks a free slot
        index = key_id % self.slots
        for probe in range(self.slots):
            base = ((index + probe) % self.slots) * _SLOT_WORDS
            if words[base] == key_id:
                return base
            if words[base] == 0:
                words[base] = key_id
                return base
        raise TableFull(f"the limits table has room for {self.slots} keys with limits")


def _minute_total(words: memoryview, start: int, second: int) -> tuple[int, int]:
    """Sum of the buckets in the last minute, and the oldest second that has any."""
    total, oldest = 0, second
    for i in range(_SECONDS):
        at, amount = words[start + 2 * i], words[start + 2 * i + 1]
        if amount and second - _SECONDS < at <= second:
            total += amount
            oldest = min(oldest, at)
    return total, oldest


def _minute_add(words: memoryview, start: int, second: int, amount: int) -> None:
    at = start + 2 * (second % _SECONDS)
    if words[at] != second:
        words[at] = second
        words[at + 1] = 0
    words[at + 1] += amount


def _counted(policy: KeyPolicy) -> bool:
    return (policy.requests_per_minute, policy.tokens_per_minute, policy.concurrent_streams) != (None,) * 3


class Limiter:
    def __init__(self, policies: dict[str, KeyPolicy], table: CounterTable | None = None) -> None:
        self.policies = policies
        self.table = table if table is not None else CounterTable()

    def admit(self, key_name: str, model: str, stream: bool, now: float | None = None) -> None:
        """Count a request in, or raise Refusal (403 or 429) naming the limit."""
        policy = self.policies.get(key_name)
        if policy is None:
            return
        if policy.models is not None and model not in policy.models:
            raise Refusal(403, f"the key '{key_name}' may not use the model '{model}'", "model_not_allowed")
        if not _counted(policy):
            return
        now = time.time() if now is None else now
        second = int(now)
        with self.table as words:
            base = self.table.slot(words, key_name)
            for limit, start, unit in (
                (policy.requests_per_minute, base + _REQUESTS, "requests"),
                (policy.tokens_per_minute, base + _TOKENS, "tokens"),
            ):
                if limit is None:
                    continue
                used, oldest = _minute_total(words, start, second)
                if used >= limit:
                    raise Refusal(
                        429,
                        f"the key '{key_name}' is over its {limit} {unit} per minute",
                        f"{unit}_per_minute_exceeded",
                        # Seconds until the oldest bucket leaves the minute.
                        max(1, math.ceil(oldest + _SECONDS - now)),
                    )
            streams = policy.concurrent_streams
            if stream and streams is not None and words[base + 1] >= streams:
                raise Refusal(
                    429,
                    f"the key '{key_name}' has {streams} streams open already",
                    "concurrent_streams_exceeded",
                    1,
                )
            _minute_add(words, base + _REQUESTS, second, 1)
            if stream:
                words[base + 1] += 1

    def done(self, key_name: str, stream: bool, tokens: int, now: float | None = None) -> None:
        """A request admitted with admit() has ended, having used this many tokens."""
        policy = self.policies.get(key_name)
        if policy is None or not _counted(policy) or not (stream or tokens):
            return
        now = time.time() if now is None else now
        with self.table as words:
            base = self.table.slot(words, key_name)
            if stream and words[base + 1] > 0:
                words[base + 1] -= 1
            if tokens:
                _minute_add(words, base + _TOKENS, int(now), tokens)

    def streams_open(self, key_name: str) -> int:
        with self.table as words:
            return words[self.table.slot(words, key_name) + 1]
