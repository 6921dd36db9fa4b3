"""Admission: a request holds one of a backend's slots while it runs upstream.

Slots are the engine's own concurrency (llama.cpp --parallel, vLLM
max-num-seqs). When every usable backend of a model is full, a request waits
in the model's bounded queue (so many places per slot) for at most its class's
``max_wait`` seconds; a full queue or a wait that runs out is a 429 with
Retry-After, never an unbounded pile-up in the gateway or the engine.

Flow control orders the queue (flow.enabled; otherwise first come, first
served):

- by **class** first: a free slot goes to the most important class waiting,
  in this worker or, through the shared board, in any other; a class's
  ``reserved_slots`` stay free for it and the classes above it;
- within a class, by each key's **virtual token counter** (the tokens served
  to the key on this model, over its weight; Sheng et al., "Fairness in
  Serving Large Language Models", OSDI 2024): the key served least goes
  first. A request is charged an estimate when it takes its slot and the
  difference when its tokens are known; a key that starts waiting is lifted
  to the least counter among the keys already waiting, so that idle time is
  not saved up as credit;
- a full queue makes room for a more important request, or for a key under
  its share of the queue, by refusing the newest request of the key most
  over its share: the keys over their share are the ones refused.

Every order decision is synchronous (no await between a look at the slots
and taking one), so one worker's waiters never race each other; other
workers free slots that this one sees at its next look (``recheck``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .policies import FlowClass, FlowPolicy, QueuePolicy

if TYPE_CHECKING:
    from .backends import Backend
    from .slots import SlotTable


RECHECK_SECONDS = 0.5
# With slots shared between workers (slots.py).
SHARED_RECHECK_SECONDS = 0.05
# Counters are kept in thousandths of a token (per unit of weight).
_SCALE = 1000
# What a request is charged when it takes its slot, before its tokens are
# known, until the model's own average is learnt.
FIRST_ESTIMATE = 256.0
_ESTIMATE_SMOOTHING = 0.1

# Why a request was refused (the refusals metric's `reason`).
QUEUE_FULL, MAX_WAIT, PUSHED_OUT = "queue_full", "max_wait", "pushed_out"


class QueueFull(Exception):
    def __init__(self, retry_after: int, reason: str = QUEUE_FULL) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Ticket:
    """Who asks: the key's name, its class and its weight."""

    key: str
    flow_class: FlowClass
    weight: float = 1.0


@dataclass(slots=True)
class Grant:
    """A slot taken: the backend, the seconds waited, what the key was charged."""

    backend: Backend
    waited: float
    ticket: Ticket
    charged: float


class FlowBoard:
    """Counts every worker of the gateway sees: requests waiting and slots in
    use per model and class, and each key's counter per model. They live in
    the shared slot table (one row per worker: each worker writes its own);
    alone, or when the table is full, in this worker's memory."""

    def __init__(self, table: SlotTable | None = None) -> None:
        self.table = table
        self._columns: dict[tuple[str, ...], int | None] = {}
        self._local: dict[tuple[str, ...], int] = {}

    def _column(self, name: tuple[str, ...]) -> int | None:
        if self.table is None:
            return None
        if name not in self._columns:
            # A column of the slot table is keyed by (model, address): the
            # address here is a name no engine URL can have.
            self._columns[name] = self.table.column(name[1], "\0flow\0" + "\0".join((name[0], *name[2:])))
        return self._columns[name]

    def add(self, name: tuple[str, ...], delta: int) -> None:
        column = self._column(name)
        if column is None:
            self._local[name] = self._local.get(name, 0) + delta
        else:
            self.table.add(column, delta)  # type: ignore[union-attr]

    def total(self, name: tuple[str, ...]) -> int:
        column = self._column(name)
        return self._local.get(name, 0) if column is None else self.table.in_flight(column)  # type: ignore[union-attr]

    def others(self, name: tuple[str, ...]) -> int:
        """The count of every other worker."""
        column = self._column(name)
        return 0 if column is None else self.table.in_flight(column) - self.table.own(column)  # type: ignore[union-attr]


@dataclass(eq=False, slots=True)
class _Waiter:
    ticket: Ticket
    seq: int
    pick: Callable[[], Backend | None]
    granted: asyncio.Future[Backend] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Admission:
    """The waiting room of one model."""

    def __init__(
        self,
        model: str,
        policy: QueuePolicy,
        flow: FlowPolicy | None = None,
        board: FlowBoard | None = None,
        recheck: float = RECHECK_SECONDS,
        clock: Callable[[], float] | None = None,
        live: Callable[[], list[Backend]] | None = None,
    ) -> None:
        self.model = model
        self.policy = policy
        self.flow = flow if flow is not None else FlowPolicy(enabled=False)
        self.board = board if board is not None else FlowBoard()
        # How often a waiter looks again without being woken: often when
        # other workers free slots too (they cannot wake this one's waiters).
        self.recheck = recheck
        self._clock = clock
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()
        self._backends: list[Backend] = []
        # The model's backends now (a reload replaces them); else those the
        # last request saw.
        self._live = live
        # The model's average tokens per request (what a new one is charged).
        self.estimate = FIRST_ESTIMATE
        # When the queue was last looked at (a release, an arrival, a recheck).
        self._looked = 0.0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def waiting_by_class(self) -> dict[str, int]:
        counts = {c.name: 0 for c in self.flow.classes} if self.flow.enabled else {}
        for waiter in self._waiters:
            name = waiter.ticket.flow_class.name
            counts[name] = counts.get(name, 0) + 1
        return counts

    def capacity(self, backends: list[Backend]) -> int:
        return self.policy.per_slot * sum(b.max_concurrency for b in backends)

    def now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # --- the counters ---------------------------------------------------------

    def counter(self, key: str) -> int:
        return self.board.total(("vtc", self.model, key))

    def _charge(self, ticket: Ticket, tokens: float) -> float:
        amount = tokens * _SCALE / ticket.weight
        self.board.add(("vtc", self.model, ticket.key), round(amount))
        return amount

    # --- taking a slot ----------------------------------------------------------

    async def acquire(
        self, pick: Callable[[], Backend | None], backends: list[Backend], ticket: Ticket | None = None
    ) -> Grant:
        """Wait for a backend with a free slot; the grant holds it (slot taken)."""
        ticket = ticket or Ticket("anonymous", self._default_class())
        self._backends = backends
        if not any(self._ahead_of(w, ticket) for w in self._waiters):
            backend = self._try(ticket, pick)
            if backend is not None:
                return Grant(backend, 0.0, ticket, self._charge(ticket, self.estimate))
        self._make_room(ticket, backends)
        started = self.now()
        deadline = started + self._max_wait(ticket)
        waiter = _Waiter(ticket, next(self._seq), pick)
        self._enqueue(waiter)
        self._dispatch()  # behind the waiters ahead of it, maybe no further
        taken = False
        try:
            while not waiter.granted.done():
                remaining = deadline - self.now()
                if remaining <= 0:
                    raise QueueFull(retry_after=max(1, math.ceil(self._max_wait(ticket))), reason=MAX_WAIT)
                # Woken by a grant; look again now and then anyway, since
                # health and breakers (and other workers) change without a
                # release here.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter.granted), min(self.recheck, remaining))
                if not waiter.granted.done() and time.monotonic() - self._looked >= self.recheck / 2:
                    # One look serves every waiter: hundreds of waiters do not
                    # each sort the queue every recheck.
                    self._dispatch()
            backend = waiter.granted.result()  # raises QueueFull if pushed out
            taken = True
            return Grant(backend, self.now() - started, ticket, self._charge(ticket, self.estimate))
        finally:
            self._dequeue(waiter)
            granted = waiter.granted
            if not taken and granted.done() and not granted.cancelled() and granted.exception() is None:
                # Granted as the wait ran out, or as the client went: the
                # slot goes back, to the next in line.
                self._give_back(ticket, granted.result())
                self._dispatch()

    def release(self, grant: Grant, tokens: int | None = None) -> None:
        """Give the slot back; ``tokens``: what the request was served (the key
        is charged the difference from its estimate; None: keeps the estimate)."""
        self._give_back(grant.ticket, grant.backend)
        if tokens is not None:
            self._charge(grant.ticket, tokens - grant.charged * grant.ticket.weight / _SCALE)
            self.estimate += _ESTIMATE_SMOOTHING * (tokens - self.estimate)
        self._dispatch()

    # --- the order ------------------------------------------------------------

    def _default_class(self) -> FlowClass:
        return (
            self.flow.named(self.flow.default_class)
            if self.flow.classes
            else FlowClass("standard", 10, self.policy.max_wait)
        )

    def _max_wait(self, ticket: Ticket) -> float:
        return ticket.flow_class.max_wait if self.flow.enabled else self.policy.max_wait

    def _in_order(self) -> list[_Waiter]:
        """The waiters in the order they are served."""
        if not self.flow.enabled:
            return sorted(self._waiters, key=lambda w: w.seq)
        counters = {key: self.counter(key) for key in {w.ticket.key for w in self._waiters}}
        return sorted(
            self._waiters, key=lambda w: (w.ticket.flow_class.priority, counters[w.ticket.key], w.seq)
        )

    def _ahead_of(self, waiter: _Waiter, ticket: Ticket) -> bool:
        """Is a waiting request served before a new one with ``ticket``?"""
        if not self.flow.enabled:
            return True
        return waiter.ticket.flow_class.priority <= ticket.flow_class.priority

    def _allowed(self, ticket: Ticket) -> bool:
        """May a request of this class take a free slot now? Not while the
        free slots are wanted by more important requests waiting in other
        workers, or kept for more important classes (reserved_slots)."""
        if not self.flow.enabled:
            return True
        waiting = reserved = 0
        for above in self.flow.above(ticket.flow_class):
            waiting += self.board.others(("wait", self.model, above.name))
            if above.reserved_slots:
                reserved += max(0, above.reserved_slots - self.board.total(("busy", self.model, above.name)))
        if not waiting and not reserved:
            return True
        usable = [b for b in (self._live() if self._live is not None else self._backends) if b.routable]
        # Reservations never take a model's last slot: a less important class
        # is kept waiting, never starved for good.
        reserved = min(reserved, max(0, sum(b.max_concurrency for b in usable) - 1))
        free = sum(max(0, b.max_concurrency - b.outstanding) for b in usable)
        return free > waiting + reserved

    def _try(self, ticket: Ticket, pick: Callable[[], Backend | None]) -> Backend | None:
        if not self._allowed(ticket):
            return None
        backend = pick()
        if backend is None or not backend.take_slot():
            return None
        self._took(ticket)
        return backend

    def _took(self, ticket: Ticket) -> None:
        """A slot taken: counted against its class's reservation."""
        if self.flow.enabled and ticket.flow_class.reserved_slots:
            self.board.add(("busy", self.model, ticket.flow_class.name), 1)

    def _give_back(self, ticket: Ticket, backend: Backend) -> None:
        backend.give_slot()
        if self.flow.enabled and ticket.flow_class.reserved_slots:
            self.board.add(("busy", self.model, ticket.flow_class.name), -1)

    def _dispatch(self) -> None:
        """Give free slots to waiters, in order, until none can take one."""
        self._looked = time.monotonic()
        # Every waiter's own pick says whether a slot suits it: the backends a
        # request saw when it came may be gone after a reload (a rolling
        # change), and the new ones never seen by a waiter's look.
        while self._waiters:
            # Each pass reads each class's allowance (and key's counter) once.
            allowed: dict[str, bool] = {}
            for waiter in self._in_order():
                name = waiter.ticket.flow_class.name
                if name not in allowed:
                    allowed[name] = self._allowed(waiter.ticket)
                if not allowed[name]:
                    continue
                backend = waiter.pick()
                if backend is None or not backend.take_slot():
                    continue
                self._took(waiter.ticket)
                self._dequeue(waiter)
                waiter.granted.set_result(backend)
                break
            else:
                return

    def _enqueue(self, waiter: _Waiter) -> None:
        ticket = waiter.ticket
        if self.flow.enabled:
            self._lift(ticket)
            self.board.add(("wait", self.model, ticket.flow_class.name), 1)
            self.board.add(("keywait", self.model, ticket.key), 1)
        self._waiters.append(waiter)

    def _dequeue(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            if self.flow.enabled:
                self.board.add(("wait", self.model, waiter.ticket.flow_class.name), -1)
                self.board.add(("keywait", self.model, waiter.ticket.key), -1)

    def _lift(self, ticket: Ticket) -> None:
        """A key that starts waiting in its class starts at the least counter
        of the keys waiting there: no credit for the time it sent nothing.
        Only a key waiting nowhere starts again: one served quickly enough
        that its requests leave this worker's queue often still has its
        share (in another worker's queue, or about to arrive here)."""
        if self.board.total(("keywait", self.model, ticket.key)) > 0:
            return
        peers = {w.ticket.key for w in self._waiters if w.ticket.flow_class == ticket.flow_class}
        if ticket.key in peers or not peers:
            return
        floor = min(self.counter(key) for key in peers)
        own = self.counter(ticket.key)
        if own < floor:
            self.board.add(("vtc", self.model, ticket.key), floor - own)

    def _make_room(self, ticket: Ticket, backends: list[Backend]) -> None:
        """Room in a full queue: refuse the newest request of the least
        important class and, in it, of the key most over its share, when that
        is not ``ticket``'s own class and key; else ``ticket`` is refused."""
        if len(self._waiters) < self.capacity(backends):
            return
        retry_after = max(1, math.ceil(self._max_wait(ticket) / 4))
        if not self.flow.enabled or not self._waiters:
            raise QueueFull(retry_after=retry_after)
        held: dict[str, int] = {}
        for waiter in self._waiters:
            held[waiter.ticket.key] = held.get(waiter.ticket.key, 0) + 1

        def share(waiter: _Waiter) -> tuple[int, float, int]:
            return (
                waiter.ticket.flow_class.priority,
                held[waiter.ticket.key] / waiter.ticket.weight,
                waiter.seq,
            )

        victim = max(self._waiters, key=share)
        own_class = ticket.flow_class.priority
        victim_class = victim.ticket.flow_class.priority
        over_share = (
            held[victim.ticket.key] / victim.ticket.weight > (held.get(ticket.key, 0) + 1) / ticket.weight
        )
        if victim_class > own_class or (victim_class == own_class and over_share):
            self._dequeue(victim)
            victim.granted.set_exception(QueueFull(retry_after=retry_after, reason=PUSHED_OUT))
            return
        raise QueueFull(retry_after=retry_after)
