"""Choosing a backend for a model: least outstanding requests, round-robin ties."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from .backends import Backend


class Router:
    def __init__(self, backends: Iterable[Backend]) -> None:
        self._by_model: dict[str, list[Backend]] = {}
        for backend in backends:
            self._by_model.setdefault(backend.model, []).append(backend)
        self._turns = {model: itertools.count() for model in self._by_model}

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
