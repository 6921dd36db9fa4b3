"""The Molecule scenarios' request loop records every way a request can fail,
not only the openai client's own errors: a stream cut another way must be a
recorded failure, not a loop thread that dies unseen."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "molecule" / "shared"))

from loads import RequestLoop


class Chunk(SimpleNamespace):
    pass


def finishing_stream():
    yield Chunk(choices=[SimpleNamespace(finish_reason=None)])
    yield Chunk(choices=[SimpleNamespace(finish_reason="stop")])


def cut_stream():
    yield Chunk(choices=[SimpleNamespace(finish_reason=None)])
    raise ConnectionResetError("peer closed connection without sending complete message body")


class FakeClient:
    """Answers with the given outcomes in turn (a callable raises, a value is returned)."""

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, **_request):
        outcome = self.outcomes.pop(0) if self.outcomes else RuntimeError("no more outcomes")
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome() if callable(outcome) else outcome


def run_to_the_end(loop: RequestLoop) -> RequestLoop:
    """Until the loop's own request bound ends it, then stopped as a test stops it."""
    loop.__enter__()
    for thread in loop._threads:
        thread.join(timeout=30)
    loop.__exit__(None, None, None)
    return loop


def test_every_kind_of_failure_is_an_outcome_and_the_loop_goes_on():
    client = FakeClient([finishing_stream, cut_stream, ConnectionRefusedError("refused"), finishing_stream])
    loop = run_to_the_end(RequestLoop(client, "m", max_requests=4, stream=True))
    assert loop.outcomes[0] == "ok"
    assert loop.outcomes[1].startswith("ConnectionResetError: peer closed")
    assert loop.outcomes[2] == "ConnectionRefusedError: refused"
    assert loop.outcomes[3] == "ok"
    assert len(loop.failures) == 2


def test_a_stream_without_a_finish_reason_is_a_failure():
    client = FakeClient([lambda: iter([Chunk(choices=[SimpleNamespace(finish_reason=None)])])])
    loop = run_to_the_end(RequestLoop(client, "m", max_requests=1, stream=True))
    assert loop.failures == ["stream ended without a finish_reason"]


class FakeClock:
    """Time that moves only when the loop pauses."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def pause(self, seconds):
        self.now += seconds


def test_wait_for_returns_once_the_loop_has_made_the_count():
    loop = RequestLoop(FakeClient([SimpleNamespace()] * 50), "m", max_requests=50)
    clock = FakeClock()
    with loop:
        loop.wait_for(5, max_seconds=60, clock=clock, pause=clock.pause)
        assert len(loop.outcomes) >= 5
    assert clock.now < 60


def test_wait_for_gives_up_after_its_bound_when_the_loop_is_stuck():
    answer = threading.Event()

    def stuck(**_request):
        answer.wait(timeout=30)  # a request that does not end while the loop is watched
        return SimpleNamespace()

    client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=stuck)))
    loop = RequestLoop(client, "m", max_requests=1)
    clock = FakeClock()
    with loop:
        loop.wait_for(5, max_seconds=3, clock=clock, pause=clock.pause)
        made = len(loop.outcomes)
        answer.set()
    assert made == 0
    assert 3 <= clock.now < 3.5
