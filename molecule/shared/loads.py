"""A bounded client load through the gateway, recording every outcome.

Used by the Molecule scenarios' verifiers (through scenario.py) and by the
unit test that proves it records every way a request can fail.
"""

from __future__ import annotations

import threading
import time


class RequestLoop:
    """Chat requests looped through the gateway on threads until stopped,
    bounded in count and in time; every outcome is kept. With ``stream``, each
    request is a stream that must run to its finish_reason."""

    def __init__(
        self,
        client,
        model: str,
        threads: int = 1,
        max_requests: int = 3000,
        max_seconds: float = 900,
        stream: bool = False,
    ):
        self.client = client
        self.model = model
        self.stream = stream
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.outcomes: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _thread in range(threads)]

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while (
            not self._stop.is_set() and len(self.outcomes) < self.max_requests and time.monotonic() < deadline
        ):
            try:
                self.outcomes.append(self._stream() if self.stream else self._ask())
            except Exception as exc:  # noqa: BLE001 - every way a request can fail is an outcome
                self.outcomes.append(f"{type(exc).__name__}: {exc}")

    def _conversation(self, text: str) -> list[dict]:
        """A new conversation for each request (numbered): new conversations go
        to the least loaded replica, so the loop reaches every replica (one
        repeated conversation would stay on its replica, by prefix affinity)."""
        return [{"role": "user", "content": f"{text} (conversation {len(self.outcomes)})"}]

    def _ask(self) -> str:
        self.client.chat.completions.create(
            model=self.model, messages=self._conversation("Say hi."), max_tokens=4
        )
        return "ok"

    def _stream(self) -> str:
        # Long enough (about a second on CPU) to be in flight when a replica changes.
        chunks = self.client.chat.completions.create(
            model=self.model,
            messages=self._conversation("Tell me about the sea."),
            max_tokens=64,
            stream=True,
        )
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return "ok" if finish else "stream ended without a finish_reason"

    def __enter__(self) -> RequestLoop:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def wait_for(self, count: int, max_seconds: float, clock=time.monotonic, pause=time.sleep) -> None:
        """Return once the loop has ``count`` outcomes, or after ``max_seconds``
        (the assertions then name the shortfall), or when its threads have ended."""
        deadline = clock() + max_seconds
        while (
            len(self.outcomes) < count
            and clock() < deadline
            and any(thread.is_alive() for thread in self._threads)
        ):
            pause(0.2)

    @property
    def failures(self) -> list[str]:
        return [o for o in self.outcomes if o != "ok"]
