"""Testinfra hosts: `host` (from Molecule) is each of them; `fresh` and `existing` are one each."""

from __future__ import annotations

import os

import pytest
import testinfra


def _host(name: str):
    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={inventory}")


@pytest.fixture(scope="module")
def fresh():
    return _host("gpu-fresh")


@pytest.fixture(scope="module")
def existing():
    return _host("gpu-existing")
