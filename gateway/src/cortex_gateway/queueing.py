"""Admission: a request holds one of a backend's slots while it runs upstream.

Slots are the engine's own concurrency (llama.cpp --parallel, vLLM
max-num-seqs). When every usable backend of a model is full, a request waits
in the model's bounded queue (so many places per slot) for at most
``max_wait`` seconds; a full queue or a wait that runs out is a 429 with
Retry-After, never an unbounded pile-up in the gateway or the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from .policies import QueuePolicy

if TYPE_CHECKING:
    from .backends import Backend


RECHECK_SECONDS = 0.5
# With slots shared between workers (slots.py).
SHARED_RECHECK_SECONDS = 0.05


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__("queue full")
        self.retry_after = retry_after


class Admission:
    """The waiting room of one model."""

    def __init__(self, policy: QueuePolicy, recheck: float = RECHECK_SECONDS) -> None:
        self.policy = policy
        # How often a waiter looks again without being woken: often when
        # other workers free slots too (they cannot wake this one's waiters).
        self.recheck = recheck
        self.waiting = 0
        self._changed = asyncio.Condition()

    def capacity(self, backends: list[Backend]) -> int:
        return self.policy.per_slot * sum(b.max_concurrency for b in backends)

    async def acquire(
        self, pick: Callable[[], Backend | None], backends: list[Backend]
    ) -> tuple[Backend, float]:
        """Wait for a backend with a free slot; returns it (slot taken) and the wait in seconds."""
        backend = pick()
        if backend is not None and backend.take_slot():
            return backend, 0.0
        if self.waiting >= self.capacity(backends):
            raise QueueFull(retry_after=max(1, math.ceil(self.policy.max_wait / 4)))
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.waiting += 1
        try:
            async with asyncio.timeout(self.policy.max_wait), self._changed:
                while True:
                    backend = pick()
                    if backend is not None and backend.take_slot():
                        break
                    # Woken by a released slot; look again now and then anyway,
                    # since health and breakers (and other workers) change
                    # without a release here.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.recheck):
                            await self._changed.wait()
        except TimeoutError:
            raise QueueFull(retry_after=max(1, math.ceil(self.policy.max_wait))) from None
        finally:
            self.waiting -= 1
        return backend, loop.time() - started

    async def release(self, backend: Backend) -> None:
        backend.give_slot()
        async with self._changed:
            # Every waiter looks: with prefix affinity a freed slot suits only
            # the requests that may take that replica (the queue is bounded).
            self._changed.notify_all()
