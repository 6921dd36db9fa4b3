"""Backends (one engine server each) and their health.

Health polling is asynchronous and concurrent: one slow or dead server never
delays the verdict on the others.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from .breaker import CircuitBreaker
from .config import BackendConfig, ModelConfig
from .policies import BreakerPolicy
from .slots import SlotTable

log = logging.getLogger(__name__)


class Health(enum.StrEnum):
    STARTING = "starting"  # not yet answered 200: loading, or not up yet
    READY = "ready"
    UNHEALTHY = "unhealthy"
    # Taken out of rotation on purpose (drains.py): no new requests, the ones
    # in flight finish. Health polling goes on underneath.
    DRAINING = "draining"


# Each engine's liveness endpoint. llama-server answers 503 while it loads the
# model and 200 once it serves; vLLM's /health answers 200 once it serves.
HEALTH_PATHS = {"llamacpp": "/health", "vllm": "/health"}
# The 1-token requests of a health probe, and how long one may take.
PROBES = {
    "completion": ("/v1/completions", {"prompt": "ping", "max_tokens": 1}),
    "embedding": ("/v1/embeddings", {"input": "ping"}),
}
PROBE_SECONDS = 20.0


@dataclass(eq=False, slots=True)
class Backend:
    model: str
    engine: str
    url: str
    api_key: str | None
    max_concurrency: int
    health: Health = Health.STARTING
    # Requests this worker has on the engine now (``outstanding`` counts every worker's).
    own_in_flight: int = 0
    # Requests of this worker that prefer this replica (prefix affinity) and
    # are waiting for a slot, or about to look for one.
    affine_waiting: int = 0
    consecutive_failures: int = 0
    last_change: float = field(default_factory=time.monotonic)
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    drain_until: float | None = None  # wall-clock end of a drain
    # The pool this backend is (llama-server's router), where the model is
    # loaded on demand, and the model's state there as last seen (pools.py):
    # loaded, loading, unloaded, sleeping, or unknown before the first look.
    pool: str | None = None
    load_state: str = "loaded"
    # How many of the pool's models its router keeps loaded at once.
    max_resident: int = 0
    # A 1-token request the health monitor sends after /health answers 200:
    # "completion" or "embedding" (None: /health alone; see ModelConfig).
    health_probe: str | None = None
    # Where every worker of the gateway counts this backend's slots (slots.py),
    # and its column there; None: this worker counts alone.
    slot_table: SlotTable | None = None
    slot_column: int | None = None

    @property
    def outstanding(self) -> int:
        """Requests on the engine now: from every worker when they share a slot table."""
        if self.slot_table is not None and self.slot_column is not None:
            return self.slot_table.in_flight(self.slot_column)
        return self.own_in_flight

    @outstanding.setter
    def outstanding(self, value: int) -> None:
        self.own_in_flight = value

    def take_slot(self) -> bool:
        """Take one of the engine's slots for a request (the caller saw one free);
        False when another worker took the last one meanwhile."""
        shared = self.slot_table is not None and self.slot_column is not None
        if shared and not self.slot_table.take(self.slot_column, self.max_concurrency):  # type: ignore[union-attr]
            return False
        self.own_in_flight += 1
        return True

    def give_slot(self) -> None:
        self.own_in_flight -= 1
        if self.slot_table is not None and self.slot_column is not None:
            self.slot_table.give(self.slot_column)

    @property
    def draining(self) -> bool:
        return self.drain_until is not None and time.time() < self.drain_until

    @property
    def state(self) -> Health:
        """What routing sees: draining over the health the polls found."""
        return Health.DRAINING if self.draining else self.health

    @property
    def routable(self) -> bool:
        return self.health is Health.READY and not self.draining

    @property
    def name(self) -> str:
        """host:port, the label the backend goes by in logs and metrics."""
        return urlsplit(self.url).netloc

    @classmethod
    def from_config(
        cls, model: ModelConfig, backend: BackendConfig, policy: BreakerPolicy | None = None
    ) -> Backend:
        return cls(
            model=model.name,
            engine=model.engine,
            url=backend.url,
            api_key=backend.api_key,
            max_concurrency=backend.max_concurrency,
            breaker=CircuitBreaker(policy or BreakerPolicy()),
            pool=backend.pool,
            load_state="unknown" if backend.pool else "loaded",
            max_resident=backend.max_resident,
            health_probe=model.health_probe,
        )

    def set_health(self, health: Health) -> None:
        if health is not self.health:
            log.info("backend %s (%s) is now %s", self.name, self.model, health)
            self.health = health
            self.last_change = time.monotonic()

    def record_success(self) -> None:
        self.consecutive_failures = 0
        self.set_health(Health.READY)

    def record_failure(self, unhealthy_after: int) -> None:
        self.consecutive_failures += 1
        if self.health is Health.READY and self.consecutive_failures < unhealthy_after:
            return
        # A server that has never answered stays "starting": a model that
        # takes minutes to load is not dead, only not there yet.
        if self.health is not Health.STARTING:
            self.set_health(Health.UNHEALTHY)


class HealthMonitor:
    """Polls every backend's health endpoint at a fixed interval."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        backends: Iterable[Backend],
        *,
        interval: float,
        unhealthy_after: int,
        timeout: float = 3.0,
        after_round: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._session = session
        # Run after each round (the pools' model states are read then).
        self._after_round = after_round
        self._backends = list(backends)
        self._interval = interval
        self._unhealthy_after = unhealthy_after
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def answers(self, backend: Backend) -> bool:
        """One health check now: does the engine answer it (200)? A failure
        counts as a poll's would; a 200 is not taken for readiness here."""
        status = await self._health_status(backend)
        if status != 200:
            backend.record_failure(self._unhealthy_after)
        return status == 200

    async def _health_status(self, backend: Backend) -> int:
        """The health endpoint's status, 0 when it could not be reached."""
        url = backend.url + HEALTH_PATHS[backend.engine]
        try:
            async with self._session.get(url, timeout=self._timeout) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError):
            return 0

    async def check(self, backend: Backend) -> None:
        status = await self._health_status(backend)
        if status == 0:
            backend.record_failure(self._unhealthy_after)
            return
        if status == 200 and backend.health_probe is not None:
            status = await self._probe(backend)
        if status == 200:
            backend.record_success()
        elif status == 503 and backend.health is not Health.READY:
            backend.set_health(Health.STARTING)  # still loading the model
        else:
            backend.record_failure(self._unhealthy_after)

    async def _probe(self, backend: Backend) -> int:
        """A 1-token request through the whole engine: the status, 0 when it
        failed or took longer than PROBE_SECONDS (a group with a lost host
        hangs, while its first process still answers /health)."""
        path, body = PROBES[backend.health_probe or "completion"]
        headers = {"Authorization": f"Bearer {backend.api_key}"} if backend.api_key else {}
        try:
            async with self._session.post(
                backend.url + path,
                json={"model": backend.model, **body},
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=PROBE_SECONDS),
            ) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError):
            return 0

    def replace_backends(self, backends: Iterable[Backend]) -> None:
        """Poll these from the next round on (after a config reload)."""
        self._backends = list(backends)

    async def check_all(self, backends: Iterable[Backend] | None = None) -> None:
        await asyncio.gather(*(self.check(b) for b in (self._backends if backends is None else backends)))

    async def run(self) -> None:
        while True:
            await self.check_all()
            if self._after_round is not None:
                await self._after_round()
            await asyncio.sleep(self._interval)
