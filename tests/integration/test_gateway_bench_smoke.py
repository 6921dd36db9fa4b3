"""The gateway benchmark (tests/bench/gateway/compare.py) as a smoke: it runs
end to end with small counts against real nginx, prints its table and the
ratios (cost per request against nginx alone, rate against the backend), and
every request it sent was answered. Timings are printed, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COUNTS = {"--latency-requests": 40, "--throughput-requests": 400, "--stream-requests": 20}


def test_the_gateway_benchmark_runs_and_every_request_is_answered(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        sys.executable,
        str(ROOT / "tests" / "bench" / "gateway" / "compare.py"),
        "--gateway-workers",
        "1",
    ]
    for flag, count in COUNTS.items():
        argv += [flag, str(count)]
    run = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    with capsys.disabled():
        print("\n" + run.stdout)
    results = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"backend alone", "nginx alone", "cortex-gateway", "cortex-gateway, asyncio loop"}
    for name, result in results.items():
        for phase, flag in (
            ("c1", "--latency-requests"),
            ("c64", "--throughput-requests"),
            ("stream", "--stream-requests"),
        ):
            assert (result[phase]["requests"], result[phase]["errors"]) == (COUNTS[flag], 0), (name, phase)
    assert "CPU per request" in run.stdout
    assert "of the backend alone's rate" in run.stdout
