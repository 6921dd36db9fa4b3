"""The multinode scenario's verifier: the helpers every scenario shares
(molecule/shared), and the order its tests run in."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))

from scenario import client_key, pytest_generate_tests

__all__ = ["client_key", "pytest_generate_tests"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "restarts_docker: restarts a host's Docker daemon, which stops a model's rank for good"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A Docker restart stops the spanning model's rank on that host (ranks
    have no restart policy: only a converge starts a group), so such a test
    runs after every test that needs the group whole."""
    items.sort(key=lambda item: item.get_closest_marker("restarts_docker") is not None)
