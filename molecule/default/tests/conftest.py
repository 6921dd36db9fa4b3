"""The default scenario's verifier: shared helpers (molecule/shared) and its gateway URL."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared"))

from scenario import RequestLoop, client_key, credential, journal, pytest_generate_tests

GATEWAY_URL = "http://127.0.0.1:18088/v1"

__all__ = ["GATEWAY_URL", "RequestLoop", "client_key", "credential", "journal", "pytest_generate_tests"]
