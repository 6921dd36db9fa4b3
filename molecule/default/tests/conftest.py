"""The default scenario's verifier: the helpers every scenario shares (molecule/shared)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))

# The tests import their helpers from scenario; pytest finds its hook and
# fixtures only here.
from scenario import client_key, pytest_generate_tests

__all__ = ["client_key", "pytest_generate_tests"]
