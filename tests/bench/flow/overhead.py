"""The request path's cost of flow control: a slot taken and given back, with
flow control and without (first come, first served), side by side, on the
shared slot table of 2 workers as a gateway runs it. Two cases: a free slot
(the fast path every request takes when the model is not full) and a full
model with a queue of waiters of two classes and four keys (every release
orders the queue).

    python tests/bench/flow/overhead.py [--rounds 5] [--requests 20000]

Prints microseconds per request for each and their ratio (medians of the
rounds, alternating which runs first).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "gateway" / "src"))

from cortex_gateway.backends import Backend, Health  # noqa: E402
from cortex_gateway.breaker import CircuitBreaker  # noqa: E402
from cortex_gateway.policies import BreakerPolicy, FlowClass, FlowPolicy, QueuePolicy  # noqa: E402
from cortex_gateway.queueing import Admission, FlowBoard, Ticket  # noqa: E402
from cortex_gateway.slots import SlotTable  # noqa: E402

_TABLES = itertools.count()
CLASSES = (
    FlowClass("interactive", 0, 30.0),
    FlowClass("standard", 10, 30.0),
    FlowClass("batch", 20, 30.0),
)


def replica(table: SlotTable, slots: int) -> Backend:
    backend = Backend(
        model="chat", engine="llamacpp", url="http://127.0.0.1:9", api_key=None,
        max_concurrency=slots, breaker=CircuitBreaker(BreakerPolicy()),
    )  # fmt: skip
    backend.health = Health.READY
    backend.slot_table, backend.slot_column = table, table.column("chat", backend.url)
    return backend


async def free_slots(room: Admission, backend: Backend, requests: int) -> float:
    ticket = Ticket("key-0", CLASSES[1])
    started = time.perf_counter()
    for _request in range(requests):
        grant = await room.acquire(lambda: backend, [backend], ticket)
        room.release(grant, 100)
    return (time.perf_counter() - started) / requests * 1e6


async def queued(room: Admission, backend: Backend, requests: int) -> float:
    """Four slots busy, 32 waiters of two classes and four keys; each release
    hands its slot to the next in order, and a new waiter takes the place."""
    tickets = [Ticket(f"key-{n % 4}", CLASSES[1 + n % 2], 1.0 + n % 2) for n in range(64)]

    def pick() -> Backend | None:
        return backend if backend.outstanding < backend.max_concurrency else None

    running = [await room.acquire(pick, [backend], tickets[n]) for n in range(4)]
    waiting = [asyncio.create_task(room.acquire(pick, [backend], tickets[n % 64])) for n in range(32)]
    await asyncio.sleep(0)
    started = time.perf_counter()
    for number in range(requests):
        room.release(running.pop(0), 100)
        await asyncio.sleep(0)
        done = [task for task in waiting if task.done()]
        for task in done:
            waiting.remove(task)
            running.append(task.result())
        waiting.append(asyncio.create_task(room.acquire(pick, [backend], tickets[number % 64])))
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - started
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    for grant in running:
        room.release(grant, 0)
    return elapsed / requests * 1e6


async def one(enabled: bool, case: str, requests: int, folder: str) -> float:
    # A fresh table each time: a table's file keeps its counts.
    table = SlotTable(f"{folder}/slots-{next(_TABLES)}", 2, 0)
    try:
        backend = replica(table, 4)
        flow = FlowPolicy(enabled=enabled, classes=CLASSES)
        room = Admission("chat", QueuePolicy(per_slot=16, max_wait=30), flow, FlowBoard(table), recheck=60)
        run = free_slots if case == "free slot" else queued
        return await run(room, backend, requests)
    finally:
        table.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cortex-bench-flow-") as folder:
        for case in ("free slot", "queued"):
            times: dict[bool, list[float]] = {False: [], True: []}
            for number in range(args.rounds):
                for enabled in (False, True) if number % 2 == 0 else (True, False):
                    times[enabled].append(asyncio.run(one(enabled, case, args.requests, folder)))
            fifo, flow = statistics.median(times[False]), statistics.median(times[True])
            print(
                f"{case:10}: first come first served {fifo:7.2f} us/request, flow control {flow:7.2f}: {flow / fifo:.2f}x"
            )


if __name__ == "__main__":
    main()
