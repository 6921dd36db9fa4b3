"""Testinfra hosts of the scenario: `host` is each of them, `fresh` and `existing` one each."""

from __future__ import annotations

import os

import pytest
import testinfra


def _host(name: str):
    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={inventory}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "host" in metafunc.fixturenames:
        names = ["gpu-fresh", "gpu-existing"]
        metafunc.parametrize("host", [_host(n) for n in names], ids=names, scope="module")


@pytest.fixture(scope="module")
def fresh():
    return _host("gpu-fresh")


@pytest.fixture(scope="module")
def existing():
    return _host("gpu-existing")
