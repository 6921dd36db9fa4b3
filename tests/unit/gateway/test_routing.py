"""Routing: least outstanding requests first, round-robin among equals."""

from __future__ import annotations

from collections import Counter

from cortex_gateway.backends import Backend, Health
from cortex_gateway.routing import Router


def backend(port: int, health: Health = Health.READY) -> Backend:
    b = Backend(model="m", engine="llamacpp", url=f"http://127.0.0.1:{port}", api_key=None, max_concurrency=4)
    b.health = health
    return b


def test_equal_replicas_take_turns():
    replicas = [backend(1), backend(2), backend(3)]
    router = Router(replicas)
    picks = Counter(router.candidates("m")[0].name for _turn in range(30))
    assert picks == Counter({"127.0.0.1:1": 10, "127.0.0.1:2": 10, "127.0.0.1:3": 10})


def test_least_outstanding_wins():
    a, b = backend(1), backend(2)
    a.outstanding = 3
    router = Router([a, b])
    assert all(router.candidates("m")[0] is b for _turn in range(5))


def test_only_ready_backends_are_candidates():
    router = Router([backend(1, Health.STARTING), backend(2, Health.UNHEALTHY), backend(3)])
    assert [b.name for b in router.candidates("m")] == ["127.0.0.1:3"]


def test_starting_backend_is_not_declared_unhealthy_by_failures():
    b = backend(1, Health.STARTING)
    for _attempt in range(10):
        b.record_failure(unhealthy_after=3)
    assert b.health is Health.STARTING


def test_ready_backend_turns_unhealthy_after_the_threshold():
    b = backend(1)
    b.record_failure(unhealthy_after=3)
    b.record_failure(unhealthy_after=3)
    assert b.health is Health.READY
    b.record_failure(unhealthy_after=3)
    assert b.health is Health.UNHEALTHY
    b.record_success()
    assert b.health is Health.READY
