"""Choosing a backend for a model: least outstanding requests with round-robin
ties, and, for models with prefix affinity, the replica that holds the
request's prefix first unless it is too busy (affinity.py)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from .affinity import PrefixIndex, replica_ids
from .backends import Backend
from .breaker import BreakerState
from .policies import RoutingPolicy


class Router:
    def __init__(self, backends: Iterable[Backend]) -> None:
        self._by_model: dict[str, list[Backend]] = {}
        for backend in backends:
            self._by_model.setdefault(backend.model, []).append(backend)
        self._turns = {model: itertools.count() for model in self._by_model}
        # Each replica's id in the prefix index: from its URL, so the same in
        # every worker and for the replicas a reload keeps.
        self._ids: dict[str, dict[int, Backend]] = {}
        for model, replicas in self._by_model.items():
            ids = replica_ids(b.url for b in replicas)
            self._ids[model] = {ids[b.url]: b for b in replicas}
        self._id_of = {id(b): number for table in self._ids.values() for number, b in table.items()}

    def knows(self, model: str) -> bool:
        return model in self._by_model

    def backends(self, model: str) -> list[Backend]:
        return list(self._by_model.get(model, ()))

    def ready(self, model: str) -> list[Backend]:
        """Ready backends that are not draining, in config order; unlike
        candidates(), takes no turn."""
        return [b for b in self._by_model.get(model, ()) if b.routable]

    def candidates(self, model: str) -> list[Backend]:
        """Ready backends in the order to try them.

        The list is rotated by a per-model turn counter before a stable sort
        by outstanding requests, so equally loaded replicas take turns.
        """
        ready = self.ready(model)
        if not ready:
            return []
        turn = next(self._turns[model]) % len(ready)
        rotated = ready[turn:] + ready[:turn]
        return sorted(rotated, key=lambda b: b.outstanding)

    # --- prefix affinity -----------------------------------------------------

    def home(self, model: str, chain: list[int], index: PrefixIndex) -> Backend | None:
        """The replica of ``model`` that last took the longest known prefix of ``chain``."""
        return self.home_and_match(model, chain, index)[0]

    def home_and_match(self, model: str, chain: list[int], index: PrefixIndex) -> tuple[Backend | None, int]:
        """The home, and how many digests of ``chain`` it holds."""
        ids = self._ids.get(model)
        if not ids or not chain:
            return None, 0
        number, matched = index.lookup(chain, ids)
        backend = ids.get(number)
        return backend, matched if backend is not None else 0

    def learn(self, chain: list[int], backend: Backend, index: PrefixIndex) -> None:
        number = self._id_of.get(id(backend))
        if number is not None and chain:
            index.learn(chain, number)

    @staticmethod
    def prefer(
        ready: list[Backend], usable: list[Backend], home: Backend, policy: RoutingPolicy
    ) -> list[Backend]:
        """The replicas to try, in order, for a request whose prefix ``home`` holds.

        ``ready`` are the replicas that may take requests, ``usable`` those of
        them with a free slot, least loaded first. The home goes first unless it
        is not ready, its breaker is not closed, or its load (in flight plus
        waiting for it) is enough above the least loaded usable replica's to
        spill; a home without a free slot that need not spill is waited for (an
        empty list), since a prompt computed again elsewhere costs more than a
        short wait for a slot where it is cached.
        """
        if not any(b is home for b in ready) or home.breaker.state is not BreakerState.CLOSED:
            return usable
        # Its load: requests in flight there and those waiting for it (the
        # caller counts itself among them, since it is looking for a slot).
        load = home.outstanding + max(home.affine_waiting - 1, 0)
        if usable and policy.spills(load, usable[0].outstanding):
            return usable
        if home.outstanding >= home.max_concurrency:
            return []
        return [home, *(b for b in usable if b is not home)]
