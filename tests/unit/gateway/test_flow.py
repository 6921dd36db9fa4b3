"""Flow control: the queue's order by class and by each key's weighted share,
reserved slots, per-class waits and who is refused when the queue is full.

The scheduler is driven directly, with a backend whose slots the test holds
and an injected clock; the request path's part (the class on the wire to a
vLLM engine, the refusals metric) through a gateway in front of a fake engine.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from cortex_gateway.backends import Backend, Health
from cortex_gateway.breaker import CircuitBreaker
from cortex_gateway.config import ConfigError, parse_config
from cortex_gateway.policies import BreakerPolicy, FlowClass, FlowPolicy, QueuePolicy
from cortex_gateway.queueing import (
    FIRST_ESTIMATE,
    MAX_WAIT,
    PUSHED_OUT,
    QUEUE_FULL,
    Admission,
    FlowBoard,
    QueueFull,
    Ticket,
)
from cortex_gateway.slots import SlotTable

from .conftest import AUTH, FakeEngine, make_config

INTERACTIVE = FlowClass("interactive", 0, max_wait=30.0)
STANDARD = FlowClass("standard", 10, max_wait=30.0)
BATCH = FlowClass("batch", 20, max_wait=5.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def backend(slots: int) -> Backend:
    found = Backend(
        model="chat",
        engine="llamacpp",
        url="http://127.0.0.1:9",
        api_key=None,
        max_concurrency=slots,
        breaker=CircuitBreaker(BreakerPolicy()),
    )
    found.health = Health.READY
    return found


def admission(
    *classes: FlowClass, enabled: bool = True, per_slot: int = 8, clock=None, board=None
) -> Admission:
    flow = FlowPolicy(enabled=enabled, classes=classes or (INTERACTIVE, STANDARD, BATCH))
    return Admission(
        "chat", QueuePolicy(per_slot=per_slot, max_wait=30.0), flow, board or FlowBoard(), 0.01, clock
    )


def picker(replica: Backend):
    return lambda: replica if replica.outstanding < replica.max_concurrency else None


async def settle() -> None:
    for _round in range(5):
        await asyncio.sleep(0)


async def queue_up(room: Admission, replica: Backend, tickets: list[Ticket]) -> list[asyncio.Task]:
    """Tasks waiting in ``room``, enqueued in the order given."""
    tasks = []
    for ticket in tickets:
        tasks.append(asyncio.create_task(room.acquire(picker(replica), [replica], ticket)))
        await settle()
    return tasks


async def serve_in_order(room: Admission, tasks: list[asyncio.Task], first, tokens: int = 100) -> list[str]:
    """Release the running grant, see who gets the slot next, and so on."""
    order = []
    running = first
    pending = set(tasks)
    while pending:
        room.release(running, tokens)
        await settle()
        done = [t for t in pending if t.done()]
        assert len(done) == 1, f"one slot freed, {len(done)} requests took it"
        running = done[0].result()
        order.append(running.ticket.key)
        pending -= set(done)
    room.release(running, tokens)
    return order


async def test_a_more_important_class_is_served_first_whatever_its_arrival():
    replica = backend(1)
    room = admission()
    first = await room.acquire(picker(replica), [replica], Ticket("bulk", BATCH))
    tasks = await queue_up(
        room,
        replica,
        [Ticket("bulk", BATCH), Ticket("bulk", BATCH), Ticket("web", INTERACTIVE), Ticket("app", STANDARD)],
    )
    assert room.waiting_by_class() == {"interactive": 1, "standard": 1, "batch": 2}
    assert await serve_in_order(room, tasks, first) == ["web", "app", "bulk", "bulk"]


async def test_with_flow_control_off_the_queue_is_first_come_first_served():
    replica = backend(1)
    room = admission(enabled=False)
    first = await room.acquire(picker(replica), [replica], Ticket("bulk", BATCH))
    tasks = await queue_up(
        room, replica, [Ticket("bulk", BATCH), Ticket("web", INTERACTIVE), Ticket("bulk", BATCH)]
    )
    assert await serve_in_order(room, tasks, first) == ["bulk", "web", "bulk"]


async def test_a_newcomer_does_not_pass_the_waiters_of_its_own_class():
    replica = backend(1)
    room = admission()
    first = await room.acquire(picker(replica), [replica], Ticket("a", STANDARD))
    tasks = await queue_up(room, replica, [Ticket("b", STANDARD)])
    room.release(first, 100)
    await settle()
    assert tasks[0].done()
    # The slot is the waiter's: a newcomer of the same class waits behind.
    late = asyncio.create_task(room.acquire(picker(replica), [replica], Ticket("c", STANDARD)))
    await settle()
    assert not late.done()
    room.release(tasks[0].result(), 100)
    await settle()
    assert late.done()
    room.release(late.result(), 100)


@pytest.mark.parametrize(("weights", "expected"), [((1.0, 1.0), 1.0), ((2.0, 1.0), 2.0)])
async def test_keys_of_one_class_share_the_slots_by_their_weights(weights, expected):
    """Two keys with more requests than the slot serves: each is served
    tokens in proportion to its weight (unequal request sizes included)."""
    replica = backend(1)
    room = admission()
    heavy, light = Ticket("heavy", BATCH, weights[0]), Ticket("light", BATCH, weights[1])
    sizes = {"heavy": 120, "light": 80}
    served = {"heavy": 0, "light": 0}
    running = await room.acquire(picker(replica), [replica], heavy)
    waiting = await queue_up(room, replica, [heavy, light] * 3)
    for _round in range(120):
        key = running.ticket.key
        served[key] += sizes[key]
        room.release(running, sizes[key])
        await settle()
        done = [t for t in waiting if t.done()]
        assert len(done) == 1
        running = done[0].result()
        waiting.remove(done[0])
        # Each key keeps sending: a new request for every one served.
        waiting += await queue_up(room, replica, [heavy if key == "heavy" else light])
    ratio = served["heavy"] / served["light"]
    assert abs(ratio - expected) / expected < 0.1, served
    room.release(running, 0)
    for task in waiting:
        task.cancel()


async def test_a_key_that_was_idle_gets_its_share_not_a_burst():
    """A key that sent nothing while others were served starts at the least
    counter of those waiting: it alternates with them, it does not take every
    slot until it has caught up."""
    replica = backend(1)
    room = admission(per_slot=40)
    running = await room.acquire(picker(replica), [replica], Ticket("old", BATCH))
    waiting = await queue_up(room, replica, [Ticket("old", BATCH)] * 20)
    for _round in range(10):  # "old" alone, served ten times
        room.release(running, 100)
        await settle()
        done = [t for t in waiting if t.done()]
        running = done[0].result()
        waiting.remove(done[0])
    waiting += await queue_up(room, replica, [Ticket("new", BATCH)] * 6)
    order = []
    for _round in range(6):
        room.release(running, 100)
        await settle()
        done = [t for t in waiting if t.done()]
        running = done[0].result()
        waiting.remove(done[0])
        order.append(running.ticket.key)
    assert order.count("new") <= 4, order
    assert order.count("old") >= 2, order
    room.release(running, 0)
    for task in waiting:
        task.cancel()


async def test_a_key_waiting_in_another_worker_keeps_its_credit(tmp_path):
    """A key served quickly leaves one worker's queue often; while it waits in
    another worker's, it is still backlogged and is not lifted to its peers'
    counter (that lift cost a 2:1 key a fifth of its share in the benchmark)."""
    path = str(tmp_path / "slots")
    mine, theirs = SlotTable(path, 2, 0), SlotTable(path, 2, 1)
    replica = backend(1)
    room = admission(board=FlowBoard(mine))
    running = await room.acquire(picker(replica), [replica], Ticket("light", BATCH))
    (light,) = await queue_up(room, replica, [Ticket("light", BATCH)])
    room.board.add(("vtc", "chat", "light"), 50_000)  # served more than "heavy"
    FlowBoard(theirs).add(("keywait", "chat", "heavy"), 1)  # "heavy" waits in worker 1
    (heavy,) = await queue_up(room, replica, [Ticket("heavy", BATCH, 2.0)])
    assert room.counter("heavy") < room.counter("light")  # not lifted
    room.release(running, 10)
    await settle()
    assert heavy.done()
    assert not light.done()
    room.release(heavy.result(), 10)
    await settle()
    room.release(light.result(), 10)
    mine.close()
    theirs.close()


async def test_reserved_slots_stay_free_for_their_class():
    interactive = FlowClass("interactive", 0, max_wait=30.0, reserved_slots=1)
    replica = backend(2)
    room = admission(interactive, STANDARD, BATCH)
    first = await room.acquire(picker(replica), [replica], Ticket("bulk", BATCH))
    # One slot is free, but it is interactive's: the batch request waits.
    kept_out = await queue_up(room, replica, [Ticket("bulk", BATCH)])
    assert not kept_out[0].done()
    assert replica.outstanding == 1
    web = await room.acquire(picker(replica), [replica], Ticket("web", interactive))
    assert web.waited == 0.0
    assert replica.outstanding == 2
    # With interactive's slot in use, the batch request takes the next one freed.
    room.release(first, 100)
    await settle()
    assert kept_out[0].done()
    room.release(kept_out[0].result(), 100)
    room.release(web, 100)


async def test_reserved_slots_never_take_the_last_slot():
    """Reserving as many slots as the model has would starve the classes
    below for good: they keep one."""
    greedy = FlowClass("interactive", 0, max_wait=30.0, reserved_slots=2)
    replica = backend(2)
    room = admission(greedy, STANDARD, BATCH)
    first = await room.acquire(picker(replica), [replica], Ticket("bulk", BATCH))
    assert first.waited == 0.0
    kept_out = await queue_up(room, replica, [Ticket("bulk", BATCH)])
    assert not kept_out[0].done()  # the second slot is interactive's
    room.release(first, 1)
    await settle()
    assert kept_out[0].done()
    room.release(kept_out[0].result(), 1)


async def test_each_class_waits_its_own_longest_wait():
    clock = FakeClock()
    replica = backend(1)
    room = admission(clock=clock)
    first = await room.acquire(picker(replica), [replica], Ticket("web", INTERACTIVE))
    batch, web = await queue_up(room, replica, [Ticket("bulk", BATCH), Ticket("web", INTERACTIVE)])
    clock.now += BATCH.max_wait + 0.1
    await asyncio.sleep(0.05)  # the waiters look at the clock again
    with pytest.raises(QueueFull) as refused:
        await batch
    assert refused.value.reason == MAX_WAIT
    assert refused.value.retry_after >= 1
    assert not web.done()  # interactive waits up to 30 s
    room.release(first, 10)
    await settle()
    room.release(web.result(), 10)


async def test_a_full_queue_refuses_the_less_important_request_in_it():
    replica = backend(1)
    room = admission(per_slot=2)
    first = await room.acquire(picker(replica), [replica], Ticket("bulk", BATCH))
    batch = await queue_up(room, replica, [Ticket("bulk", BATCH), Ticket("bulk", BATCH)])
    # Full (2 places): an interactive request takes the newest batch one's place.
    web = await queue_up(room, replica, [Ticket("web", INTERACTIVE)])
    with pytest.raises(QueueFull) as refused:
        await batch[1]
    assert refused.value.reason == PUSHED_OUT
    assert not batch[0].done()
    assert not web[0].done()
    # Another batch request finds it full of requests no less important than its own.
    with pytest.raises(QueueFull) as full:
        await room.acquire(picker(replica), [replica], Ticket("bulk", BATCH))
    assert full.value.reason == QUEUE_FULL
    order = await serve_in_order(room, [batch[0], web[0]], first)
    assert order == ["web", "bulk"]


async def test_a_full_queue_refuses_the_key_over_its_share_not_the_newcomer():
    replica = backend(1)
    room = admission(per_slot=3)
    first = await room.acquire(picker(replica), [replica], Ticket("flood", BATCH))
    flood = await queue_up(room, replica, [Ticket("flood", BATCH)] * 3)
    other = await queue_up(room, replica, [Ticket("other", BATCH)])
    with pytest.raises(QueueFull) as refused:
        await flood[2]
    assert refused.value.reason == PUSHED_OUT
    assert not other[0].done()
    # The flooding key itself is refused now: it holds more than its share.
    with pytest.raises(QueueFull):
        await room.acquire(picker(replica), [replica], Ticket("flood", BATCH))
    # Lifted to the flooding key's counter: it is not served after all of
    # them (requests of the size the model's estimate expects).
    order = await serve_in_order(room, [*flood[:2], other[0]], first, tokens=int(FIRST_ESTIMATE))
    assert order.index("other") < 2, order


async def test_a_more_important_request_waiting_in_another_worker_holds_the_last_slot(tmp_path):
    path = str(tmp_path / "slots")
    mine, theirs = SlotTable(path, 2, 0), SlotTable(path, 2, 1)
    replica = backend(1)
    room = admission(board=FlowBoard(mine))
    # Worker 1 has an interactive request waiting for this model.
    FlowBoard(theirs).add(("wait", "chat", "interactive"), 1)
    waiting = await queue_up(room, replica, [Ticket("bulk", BATCH)])
    await asyncio.sleep(0.05)
    assert not waiting[0].done(), "a batch request took the slot an interactive one waits for"
    assert replica.outstanding == 0
    FlowBoard(theirs).add(("wait", "chat", "interactive"), -1)
    await asyncio.sleep(0.05)
    assert waiting[0].done()
    room.release(waiting[0].result(), 1)
    mine.close()
    theirs.close()


async def test_a_waiter_takes_a_replica_added_after_it_came():
    """A rolling change: the replica a request waited for is drained and a new
    one added by a reload; with no new request to look at the new list, the
    waiter's own recheck finds the new replica's free slot."""
    old, new = backend(1), backend(1)
    replicas = [old]
    room = admission()
    room.recheck = 0.01
    first = await room.acquire(picker(old), [old], Ticket("a", STANDARD))

    def pick():
        return next((r for r in replicas if r.outstanding < r.max_concurrency), None)

    waiting = asyncio.create_task(room.acquire(pick, list(replicas), Ticket("b", STANDARD)))
    await settle()
    replicas[:] = [new]  # the reload: the old replica is gone, still busy
    old.health = Health.UNHEALTHY
    await asyncio.sleep(0.1)
    assert waiting.done()
    assert waiting.result().backend is new
    room.release(waiting.result(), 1)
    room.release(first, 1)


async def test_a_client_gone_while_granted_gives_the_slot_on():
    replica = backend(1)
    room = admission()
    first = await room.acquire(picker(replica), [replica], Ticket("a", STANDARD))
    gone, next_one = await queue_up(room, replica, [Ticket("b", STANDARD), Ticket("c", STANDARD)])
    gone.cancel()
    await settle()
    room.release(first, 1)
    await settle()
    assert next_one.done()
    assert replica.outstanding == 1


# --- configuration -----------------------------------------------------------


def keyed(**entry) -> dict:
    return {"auth": {"require_api_key": False, "api_keys": [{"name": "k", "sha256": "0" * 64, **entry}]}}


def test_a_key_gets_its_class_and_weight_and_numbers_are_classes_too():
    config = parse_config(
        {
            "auth": {
                "require_api_key": False,
                "api_keys": [
                    {"name": "bulk", "sha256": "0" * 64, "priority": "batch", "weight": 2},
                    {"name": "odd", "sha256": "1" * 64, "priority": 5},
                    {"name": "zero", "sha256": "2" * 64, "priority": 0},
                    {"name": "plain", "sha256": "3" * 64},
                ],
            },
            "flow": {"classes": [{"name": "interactive", "reserved_slots": 1, "max_wait": 10}]},
        }
    )
    assert config.key_flow("bulk") == (config.flow.named("batch"), 2.0)
    assert config.key_flow("odd")[0].priority == 5
    assert config.key_flow("zero")[0].name == "interactive"
    assert config.key_flow("plain") == (config.flow.named("standard"), 1.0)
    assert config.key_flow(None)[0].name == "standard"
    assert config.flow.named("interactive") == FlowClass("interactive", 0, 10.0, 1)
    assert [c.name for c in config.flow.classes] == ["interactive", "5", "standard", "batch"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (keyed(priority="gold"), "auth.api_keys[0].priority: 'gold' is not a class"),
        (keyed(priority=True), "auth.api_keys[0].priority: expected a class name or an integer"),
        (keyed(weight=0), "auth.api_keys[0].weight: must be greater than 0"),
        ({"flow": {"classes": [{"name": "gold"}]}}, "flow.classes[0].priority: a class of your own needs"),
        (
            {"flow": {"classes": [{"name": "gold", "priority": 10}]}},
            "'gold' and 'standard' have the same priority",
        ),
        ({"flow": {"classes": [{"name": "batch", "reserved_slots": -1}]}}, "flow.classes[0].reserved_slots"),
        ({"flow": {"default_class": "gold"}}, "flow.default_class: 'gold' is not a class"),
        ({"flow": {"order": "fifo"}}, "flow.order: unknown option"),
    ],
)
def test_a_bad_flow_setting_is_named(raw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config({"auth": {"require_api_key": False}, **raw})


def test_only_vllm_schedules_by_priority():
    raw = make_config({"chat": ["http://127.0.0.1:9"]})
    raw["models"][0]["priority_scheduling"] = True
    with pytest.raises(ConfigError, match=r"models\[0\].priority_scheduling: only vLLM engines"):
        parse_config(raw)


# --- the request path ---------------------------------------------------------


async def test_a_vllm_engine_gets_the_key_class_priority_not_the_client_own(engine_server, gateway_client):
    engine = FakeEngine()
    url = await engine_server(engine)
    raw = make_config({"chat": [url]})
    raw["models"][0]["engine"] = "vllm"
    raw["models"][0]["priority_scheduling"] = True
    raw["auth"]["api_keys"][0]["priority"] = "batch"
    client = await gateway_client(raw)
    await wait_ready(client)
    # A client asking to jump the engine's queue gets its key's priority.
    answer = await client.post("/v1/completions", json={"model": "chat", "priority": -100}, headers=AUTH)
    assert answer.status == 200
    paths = [(path, json.loads(body)) for path, body, _key in engine.received if path == "/v1/completions"]
    assert paths[-1][1]["priority"] == 20


async def test_without_priority_scheduling_the_body_goes_as_it_came(engine_server, gateway_client):
    engine = FakeEngine()
    url = await engine_server(engine)
    client = await gateway_client(make_config({"chat": [url]}))
    await wait_ready(client)
    body = b'{"model": "chat", "priority": 3}'
    answer = await client.post(
        "/v1/completions", data=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert answer.status == 200
    assert [b for p, b, _k in engine.received if p == "/v1/completions"][-1] == body


async def test_a_refusal_is_counted_by_key_and_reason(engine_server, gateway_client):
    url = await engine_server(FakeEngine(delay=0.5))
    raw = make_config({"chat": [url]}, queue={"per_slot": 1, "max_wait": 0.2})
    raw["models"][0]["backends"][0]["max_concurrency"] = 1
    client = await gateway_client(raw)
    await wait_ready(client)

    async def ask():
        return await client.post("/v1/completions", json={"model": "chat"}, headers=AUTH)

    running = asyncio.create_task(ask())
    await asyncio.sleep(0.1)
    refused = await ask()  # waits 0.2 s of the 0.5 s the engine takes
    assert refused.status == 429
    assert "Retry-After" in refused.headers
    assert (await refused.json())["error"]["code"] == "queue_full"
    assert (await running).status == 200
    text = (await (await client.get("/metrics")).read()).decode()
    line = 'cortex_gateway_refusals_total{key="tests",reason="max_wait"} 1.0'
    assert line in text, [x for x in text.splitlines() if "refusals" in x]
    assert 'cortex_gateway_class_queue_depth{class="standard",model="chat"}' in text


async def wait_ready(client) -> None:
    for _round in range(100):
        if all(b.routable for b in client.gateway.backends):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the backend never became ready")
