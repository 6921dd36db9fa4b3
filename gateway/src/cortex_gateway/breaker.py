"""A circuit breaker per backend: closed, open, half-open.

It opens at once when the backend refuses connections or cuts a stream it
was sending, and on a failure rate over a sliding window once the window
holds a minimum sample. It never opens the model's last ready backend on rate
or a cut stream alone (a struggling backend beats none), and an engine's
Retry-After keeps it open at least that long. After the cooldown one trial
request goes through (half-open): success closes it, failure opens it again.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

from .policies import BreakerPolicy


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Failure(enum.Enum):
    REFUSED = "refused"  # connection refused or reset before an answer
    TIMEOUT = "timeout"
    STATUS = "status"  # 503 from the engine: it did not take the request
    STREAM_CUT = "stream_cut"  # a stream the engine stalled, trickled or broke off midway


@dataclass(slots=True)
class CircuitBreaker:
    policy: BreakerPolicy = field(default_factory=BreakerPolicy)
    state: BreakerState = BreakerState.CLOSED
    open_until: float = 0.0
    trial_in_flight: bool = False
    outcomes: deque[bool] = field(default_factory=deque)

    def allows(self, now: float | None = None) -> bool:
        """May a request go to this backend now? Takes the half-open trial slot."""
        now = time.monotonic() if now is None else now
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if now < self.open_until:
                return False
            self.state = BreakerState.HALF_OPEN
            self.trial_in_flight = False
        if self.trial_in_flight:
            return False
        self.trial_in_flight = True
        return True

    def _remember(self, ok: bool) -> None:
        self.outcomes.append(ok)
        while len(self.outcomes) > self.policy.window:
            self.outcomes.popleft()

    def record_success(self) -> None:
        if self.state is not BreakerState.CLOSED:
            self.outcomes.clear()
        self.state = BreakerState.CLOSED
        self.trial_in_flight = False
        self._remember(True)

    def record_failure(
        self,
        kind: Failure,
        *,
        retry_after: float | None = None,
        last_ready: bool = False,
        now: float | None = None,
    ) -> None:
        now = time.monotonic() if now is None else now
        self._remember(False)
        self.trial_in_flight = False
        failures = self.outcomes.count(False)
        over_rate = (
            len(self.outcomes) >= self.policy.min_samples
            and failures / len(self.outcomes) >= self.policy.failure_rate
        )
        if (
            self.state is BreakerState.HALF_OPEN
            or kind is Failure.REFUSED
            or retry_after is not None
            # A cut stream cost a client its answer: the next ones go elsewhere
            # while there is an elsewhere.
            or ((over_rate or kind is Failure.STREAM_CUT) and not last_ready)
        ):
            self.state = BreakerState.OPEN
            self.open_until = now + max(self.policy.cooldown, retry_after or 0.0)

    def release_trial(self) -> None:
        """A half-open trial ended without a verdict (the client went away)."""
        self.trial_in_flight = False
