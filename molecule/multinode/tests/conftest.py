"""The multinode scenario's verifier: the helpers every scenario shares (molecule/shared)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))

from scenario import client_key, pytest_generate_tests

__all__ = ["client_key", "pytest_generate_tests"]
