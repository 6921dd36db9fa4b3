"""Drains: backends taken out of rotation for a while, on purpose.

An operator, or the model_servers role before it replaces a replica, drains a
backend: it gets no new requests, the ones in flight finish, and its health
polling goes on underneath, so an undrained backend is routed to again as
soon as it answers. Every drain has a deadline: a playbook that dies halfway
never leaves a replica out of rotation for good.

With several workers the drains live in one small JSON file in the gateway's
runtime folder ({backend url: deadline, wall-clock seconds}). The worker that
takes the admin request changes it under an flock (two workers changing it at
once lose nothing) and asks the supervisor to have every worker read it again.
Alone, the gateway keeps them in memory.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)

# A drain lasts at most a day; the default is long enough for the longest
# generation to finish and a replica to be replaced.
MAX_SECONDS = 86400
DEFAULT_SECONDS = 600


class DrainBook:
    """Backend URL -> the wall-clock time its drain ends."""

    def __init__(self, path: str | None = None) -> None:
        self.path = Path(path) if path else None
        self._until: dict[str, float] = {}

    @property
    def shared(self) -> bool:
        return self.path is not None

    def current(self, now: float | None = None) -> dict[str, float]:
        """The drains in force (as last read or set by this process)."""
        now = time.time() if now is None else now
        return {url: until for url, until in self._until.items() if until > now}

    def load(self) -> dict[str, float]:
        """Read the shared file again (blocking: call it off the event loop)."""
        if self.path is not None:
            with self._locked() as handle:
                self._until = _parse(handle.read())
        return self.current()

    def set(self, url: str, until: float | None) -> dict[str, float]:
        """Drain ``url`` until then (None: end its drain); returns the drains in force.

        Blocking when shared: call it off the event loop.
        """
        if self.path is None:
            self._change(url, until)
            return dict(self._until)
        with self._locked() as handle:
            self._until = _parse(handle.read())
            self._change(url, until)
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(self._until))
        return dict(self._until)

    def _change(self, url: str, until: float | None) -> None:
        if until is None:
            self._until.pop(url, None)
        else:
            self._until[url] = until
        self._until = self.current()  # ended drains go, so the map stays as small as the fleet

    def _locked(self) -> TextIO:
        """The file, open and locked; closing it releases the lock."""
        assert self.path is not None
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - closed by the caller's with
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        handle.seek(0)
        return handle


def _parse(text: str) -> dict[str, float]:
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        log.error("drains file is not JSON; treating it as empty")
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(url): float(until) for url, until in data.items() if isinstance(until, int | float)}


def create_shared(path: Path) -> str:
    """An empty drains file for the workers (a previous run's drains do not carry over)."""
    path.write_text("{}", encoding="utf-8")
    os.chmod(path, 0o600)
    return str(path)
