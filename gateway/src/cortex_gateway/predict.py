"""Predicted time to first token per replica, learnt from the engines' answers.

For a request and a replica, the prediction is the wait for one of the
replica's slots plus the prefill of the prompt tokens it does not already
hold, behind the prefill still pending on that replica:

    wait     = requests ahead of this one for a slot x service time / slots
    prefill  = (tokens pending + uncached prompt tokens) x seconds per token
    predicted = wait + base + prefill

for a conversation without a home; one with a home (the index's replica
for its prefix) is weighed without the pending tokens, its prefill slowed
instead by the requests running beside it (x (1 + those requests)): a move
costs its later turns their cache, which one request's wait does not show.
The tokens pending are the uncached prompt tokens of the requests sent to the
replica that have not had their first token yet (an engine computes the
prompts of its running requests together, so a replica busy with a long
prompt is slow to start another, however few requests it has); every worker
adds and takes off its own in the shared table.

Every term is learnt per replica from what its engine answered (exponential
moving averages): a stream's time from the upstream call to its first chunk,
with the prompt and cached token counts of its usage and the tokens that were
pending when it was sent, gives the seconds per prefill token and the base;
a request's time on its slot gives the service time. The prompt's size is
the body's bytes over the model's learnt bytes per token; the tokens a
replica holds are the matched blocks of the prefix index over the same ratio,
for the replica that last took the prefix (the index knows no other).

Each worker learns from its own requests and writes its estimates into its
own row of the shared table; a prediction uses the mean of the rows that have
learnt something, so every worker predicts with what all of them saw.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .backends import Backend
    from .slots import SlotTable

# Fixed point of the shared estimates: micro-units.
_MICRO = 1_000_000
_SMOOTHING = 0.2
# Until a replica has answered: CPU-like figures, the same for every replica,
# so the first choices go by cached prefix and load alone.
DEFAULT_SECONDS_PER_TOKEN = 0.005
DEFAULT_BASE = 0.05
DEFAULT_SERVICE = 2.0
DEFAULT_BYTES_PER_TOKEN = 4.0
_FIELDS = ("per_token", "base", "service")


@dataclass(slots=True)
class Estimate:
    per_token: float = DEFAULT_SECONDS_PER_TOKEN
    base: float = DEFAULT_BASE
    service: float = DEFAULT_SERVICE


@dataclass(frozen=True, slots=True)
class Prediction:
    backend: Backend
    seconds: float
    wait: float
    cached_tokens: int


class Predictor:
    """The estimates of every replica, this worker's own and the shared ones."""

    def __init__(self, table: SlotTable | None = None) -> None:
        self.table = table
        self._own: dict[tuple[str, str], Estimate] = {}
        self._bytes_per_token: dict[str, float] = {}
        self._columns: dict[tuple[str, ...], int | None] = {}
        self._pending: dict[tuple[str, str], int] = {}

    # --- learning ---------------------------------------------------------------

    def observe_first_token(
        self, backend: Backend, seconds: float, prompt_tokens: int, cached_tokens: int, pending: int
    ) -> None:
        """A stream's first chunk came ``seconds`` after the upstream call,
        for a prompt of ``prompt_tokens`` of which the engine had ``cached_tokens``,
        with ``pending`` prompt tokens of other requests still to compute on the replica then."""
        if seconds <= 0 or prompt_tokens <= 0:
            return
        own = self._estimate(backend)
        uncached = max(prompt_tokens - cached_tokens, 0)
        if uncached >= 16:
            per_token = max(seconds - own.base, 0.0) / (uncached + max(pending, 0))
            own.per_token += _SMOOTHING * (per_token - own.per_token)
        else:
            # Nearly all cached: what is left is the base.
            own.base += _SMOOTHING * (seconds - own.base)
        self._publish(backend, own)

    def observe_service(self, backend: Backend, seconds: float) -> None:
        if seconds <= 0:
            return
        own = self._estimate(backend)
        own.service += _SMOOTHING * (seconds - own.service)
        self._publish(backend, own)

    def observe_prompt(self, model: str, body_bytes: int, prompt_tokens: int) -> None:
        if body_bytes <= 0 or prompt_tokens <= 0:
            return
        ratio = body_bytes / prompt_tokens
        current = self._bytes_per_token.get(model, DEFAULT_BYTES_PER_TOKEN)
        self._bytes_per_token[model] = current + _SMOOTHING * (ratio - current)

    def tokens(self, model: str, size_bytes: int) -> int:
        """About how many tokens ``size_bytes`` of the model's requests are."""
        return int(size_bytes / self._bytes_per_token.get(model, DEFAULT_BYTES_PER_TOKEN))

    # --- predicting -------------------------------------------------------------

    def estimate(self, backend: Backend) -> Estimate:
        """What every worker learnt of ``backend``: the mean of their rows."""
        if self.table is None:
            return self._own.get((backend.model, backend.url)) or Estimate()
        values = {}
        for name in _FIELDS:
            column = self._column(backend, name)
            rows = [v for v in self.table.values(column) if v > 0] if column is not None else []
            values[name] = sum(rows) / len(rows) / _MICRO if rows else None
        own = self._own.get((backend.model, backend.url)) or Estimate()
        return Estimate(
            **{name: value if value is not None else getattr(own, name) for name, value in values.items()}
        )

    def predict(
        self, backend: Backend, prompt_tokens: int, cached_tokens: int, ahead: int = 0, pending: bool = True
    ) -> Prediction:
        """The time to first token of a request on ``backend``; ``ahead``:
        requests already waiting for that replica in particular; ``pending``:
        behind the prompt tokens pending there (else slowed by the requests
        running beside it, which share the engine's time)."""
        estimate = self.estimate(backend)
        slots = max(backend.max_concurrency, 1)
        queued = max(backend.outstanding + ahead - slots + 1, 0)
        wait = queued * estimate.service / slots
        uncached = max(prompt_tokens - cached_tokens, 0)
        if pending:
            prefill = (self.pending(backend) + uncached) * estimate.per_token
        else:
            prefill = uncached * estimate.per_token * (1 + min(backend.outstanding, slots - 1))
        return Prediction(backend, wait + estimate.base + prefill, wait, cached_tokens)

    def rank(
        self,
        backends: Iterable[Backend],
        prompt_tokens: int,
        home: Backend | None,
        home_tokens: int,
        home_ahead: int,
    ) -> list[Prediction]:
        """Every replica's prediction, fastest first (ties: the order given).

        A conversation without a home goes where the least prefill is pending.
        One with a home is weighed by the slots' queues and the requests
        running beside it, not by the prompts pending for a moment: leaving
        its home costs every later turn the cache, which this request's own
        time to first token does not show (measured: weighing the pending
        tokens for it too moved conversations off their homes, and the
        later turns' TTFT p50 went from 0.04x least-outstanding's to 0.77x)."""
        predictions = [
            self.predict(
                b,
                prompt_tokens,
                min(home_tokens, prompt_tokens) if b is home else 0,
                home_ahead if b is home else 0,
                pending=home is None,
            )
            for b in backends
        ]
        return sorted(predictions, key=lambda p: p.seconds)

    # --- prefill pending on each replica ---------------------------------------------

    def pending(self, backend: Backend) -> int:
        """Uncached prompt tokens sent to ``backend`` by every worker, not yet answered."""
        column = self._column(backend, "pending") if self.table is not None else None
        if column is None:
            return self._pending.get((backend.model, backend.url), 0)
        return max(self.table.in_flight(column), 0)  # type: ignore[union-attr]

    def hold(self, backend: Backend, tokens: int) -> None:
        """``tokens`` of a request sent to ``backend`` wait for their prefill."""
        self._add_pending(backend, tokens)

    def drop(self, backend: Backend, tokens: int) -> None:
        """Their first token came, or the request ended: no longer pending."""
        self._add_pending(backend, -tokens)

    def _add_pending(self, backend: Backend, delta: int) -> None:
        column = self._column(backend, "pending") if self.table is not None else None
        if column is None:
            key = (backend.model, backend.url)
            self._pending[key] = self._pending.get(key, 0) + delta
        else:
            self.table.add(column, delta)  # type: ignore[union-attr]

    # --- the shared rows ----------------------------------------------------------

    def _estimate(self, backend: Backend) -> Estimate:
        key = (backend.model, backend.url)
        own = self._own.get(key)
        if own is None:
            own = self._own[key] = self.estimate(backend)  # start from what the others learnt
        return own

    def _column(self, backend: Backend, name: str) -> int | None:
        key = (backend.model, backend.url, name)
        if key not in self._columns:
            self._columns[key] = self.table.column(backend.model, f"\0predict\0{name}\0{backend.url}")  # type: ignore[union-attr]
        return self._columns[key]

    def _publish(self, backend: Backend, own: Estimate) -> None:
        if self.table is None:
            return
        for name in _FIELDS:
            column = self._column(backend, name)
            if column is not None:
                self.table.set_own(column, max(1, round(getattr(own, name) * _MICRO)))
