"""Per-key limits: which models a key may use, requests and tokens per minute,
and streams open at once. Counts are kept in this process, over a sliding
minute of one-second buckets, so a burst at a minute's edge cannot double a limit.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    models: frozenset[str] | None = None  # None: every model
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_streams: int | None = None


class Refusal(Exception):
    def __init__(self, status: int, message: str, code: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


@dataclass(slots=True)
class _Minute:
    """Amounts in the last 60 s, in one-second buckets."""

    buckets: deque[tuple[int, int]] = field(default_factory=deque)

    def total(self, now: float) -> int:
        horizon = int(now) - 59
        while self.buckets and self.buckets[0][0] < horizon:
            self.buckets.popleft()
        return sum(amount for _second, amount in self.buckets)

    def add(self, now: float, amount: int) -> None:
        second = int(now)
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1] = (second, self.buckets[-1][1] + amount)
        else:
            self.buckets.append((second, amount))

    def retry_after(self, now: float) -> int:
        """Seconds until the oldest bucket leaves the minute."""
        if not self.buckets:
            return 1
        return max(1, math.ceil(self.buckets[0][0] + 60 - now))


@dataclass(slots=True)
class _KeyState:
    requests: _Minute = field(default_factory=_Minute)
    tokens: _Minute = field(default_factory=_Minute)
    streams: int = 0


class Limiter:
    def __init__(self, policies: dict[str, KeyPolicy]) -> None:
        self.policies = policies
        self._state: dict[str, _KeyState] = {}

    def admit(self, key_name: str, model: str, stream: bool, now: float | None = None) -> None:
        """Count a request in, or raise Refusal (403 or 429) naming the limit."""
        policy = self.policies.get(key_name)
        if policy is None:
            return
        now = time.time() if now is None else now
        if policy.models is not None and model not in policy.models:
            raise Refusal(403, f"the key '{key_name}' may not use the model '{model}'", "model_not_allowed")
        state = self._state.setdefault(key_name, _KeyState())
        for limit, minute, unit in (
            (policy.requests_per_minute, state.requests, "requests"),
            (policy.tokens_per_minute, state.tokens, "tokens"),
        ):
            if limit is not None and minute.total(now) >= limit:
                raise Refusal(
                    429,
                    f"the key '{key_name}' is over its {limit} {unit} per minute",
                    f"{unit}_per_minute_exceeded",
                    minute.retry_after(now),
                )
        if stream and policy.concurrent_streams is not None and state.streams >= policy.concurrent_streams:
            raise Refusal(
                429,
                f"the key '{key_name}' has {policy.concurrent_streams} streams open already",
                "concurrent_streams_exceeded",
                1,
            )
        state.requests.add(now, 1)
        if stream:
            state.streams += 1

    def done(self, key_name: str, stream: bool, tokens: int, now: float | None = None) -> None:
        """A request admitted with admit() has ended, having used this many tokens."""
        state = self._state.get(key_name)
        if state is None:
            return
        if stream:
            state.streams -= 1
        if tokens:
            state.tokens.add(time.time() if now is None else now, tokens)
