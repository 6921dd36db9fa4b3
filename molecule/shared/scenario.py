"""What the Molecule scenarios' verifiers share: testinfra hosts and the
gateway's client key from Molecule's environment, and a bounded request loop.
Each scenario's conftest.py imports it (this folder is not a scenario)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import openai
import pytest
import testinfra.utils.ansible_runner


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "host" in metafunc.fixturenames:
        inventory = os.environ["MOLECULE_INVENTORY_FILE"]
        hosts = testinfra.utils.ansible_runner.AnsibleRunner(inventory).get_hosts("all")
        metafunc.parametrize(
            "host",
            [testinfra.get_host(f"ansible://{h}?ansible_inventory={inventory}") for h in hosts],
            ids=hosts,
            scope="module",
        )


def credential(kind: str, name: str) -> str:
    """A key the roles generated in the inventory's .credentials folder on the first converge."""
    inventory_dir = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "inventory"
    return (inventory_dir / ".credentials" / kind / name).read_text().strip()


@pytest.fixture(scope="session")
def client_key() -> str:
    return credential("gateway-api-key", "default")


def journal(host, unit: str) -> str:
    return host.run(f"journalctl -u {unit} --no-pager -n 40").stdout


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
            except openai.APIError as exc:
                self.outcomes.append(f"{type(exc).__name__}: {exc}")

    def _ask(self) -> str:
        self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
        )
        return "ok"

    def _stream(self) -> str:
        # Long enough (about a second on CPU) to be in flight when a replica changes.
        chunks = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": "Tell me about the sea."}],
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

    @property
    def failures(self) -> list[str]:
        return [o for o in self.outcomes if o != "ok"]
