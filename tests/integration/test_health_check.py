"""The health-check script against real containers under the real Docker daemon.

Two engine stand-ins (a small Python server in the local host image, since
what is under test is the restart policy, not an engine): one is made
unhealthy and must be restarted exactly as the policy says, the other fails
from the start but is inside its start period and must be left alone.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, docker

SCRIPT = ROOT / "roles" / "health_check" / "files" / "cortex_healthcheck.py"
IMAGE = "cortex/host:debian12"
SERVER = r"""
import http.server, os, signal, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self):
        sick = os.path.exists("/ctl/sick")
        self.send_response(500 if sick else 200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
    do_GET = do_POST = answer
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def started_at(container: str) -> str:
    return docker("inspect", "--format", "{{.State.StartedAt}}", container).stdout.strip()


@pytest.fixture
def engines(tmp_path: Path):
    (tmp_path / "server.py").write_text(SERVER)
    made = []
    for name, sick in (("cortex-hc-test-sick", False), ("cortex-hc-test-loading", True)):
        ctl = tmp_path / name
        ctl.mkdir()
        if sick:
            (ctl / "sick").touch()
        port = free_port()
        docker("rm", "-f", name, check=False)
        docker("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8080", "--stop-signal", "TERM",
               "-v", f"{tmp_path / 'server.py'}:/server.py:ro", "-v", f"{ctl}:/ctl:ro",
               "--entrypoint", "python3", IMAGE, "/server.py")  # fmt: skip
        made.append({"container": name, "url": f"http://127.0.0.1:{port}", "ctl": ctl})
    for engine in made:  # listening
        for _attempt in range(50):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", int(engine["url"].rsplit(":", 1)[1]))) == 0:
                    break
            time.sleep(0.1)
    yield made
    for engine in made:
        docker("rm", "-f", engine["container"], check=False)


def run_check(config_path: Path, now: float | None = None) -> subprocess.CompletedProcess:
    clock = [] if now is None else ["--now", repr(now)]
    return subprocess.run([sys.executable, str(SCRIPT), "--config", str(config_path), *clock],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def test_an_unhealthy_container_is_restarted_as_configured_and_a_loading_one_left_alone(engines, tmp_path):
    sick, loading = engines
    config = {
        "engines": [
            {
                "name": "sick",
                "engine": "llamacpp",
                "container": sick["container"],
                "url": sick["url"],
                "start_period": 0,
                "kind": "completion",
            },
            {
                "name": "loading",
                "engine": "llamacpp",
                "container": loading["container"],
                "url": loading["url"],
                "start_period": 600,
                "kind": "completion",
            },
        ],
        "policy": {"restart_after": 2, "backoff_seconds": 5, "max_restarts_per_hour": 2},
        "timeout": 2,
        "probe_timeout": 5,
        "probe_every": 2,
        "textfile_dir": str(tmp_path / "textfiles"),
        "state_file": str(tmp_path / "state.json"),
    }
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    first_start = {e["container"]: started_at(e["container"]) for e in engines}

    # The runs' own clock, stepped by the test (no sleeping through backoffs).
    # Ahead of the system clock by more than the test takes, so that it stays
    # past every container's start (restarts included), and less than the
    # loading engine's start period, which must still hold at the end.
    clock = {"now": time.time() + 120}

    def step() -> tuple[bool, subprocess.CompletedProcess]:
        before = started_at(sick["container"])
        result = run_check(config_path, now=clock["now"])
        clock["now"] += 1
        return started_at(sick["container"]) != before, result

    restarted, result = step()
    assert (restarted, result.returncode) == (False, 0), result.stdout
    assert "<6>loading (cortex-hc-test-loading): " in result.stdout  # noted, not an error
    (sick["ctl"] / "sick").touch()

    # restart_after 2: the second failed run restarts it.
    assert [step()[0] for _run in range(2)] == [False, True]
    restarted, result = step()  # still sick after the restart: one failure
    assert not restarted
    assert result.returncode == 1
    assert "<3>sick (cortex-hc-test-sick): http://127.0.0.1:" in result.stdout
    restarted, result = step()  # two failures, but inside the 5 s backoff
    assert not restarted, result.stdout + (tmp_path / "state.json").read_text()
    assert "backing off" in result.stdout
    clock["now"] += 5.5
    restarted, result = step()
    assert restarted
    assert "<4>sick: restarted cortex-hc-test-sick: failed 2 runs in a row" in result.stdout
    clock["now"] += 10.5  # past the next backoff (10 s): now the hourly cap holds it
    outcomes = [step() for _run in range(2)]
    assert [restarted for restarted, _result in outcomes] == [False, False]
    assert "restarted 2 times in the last hour already (the cap)" in outcomes[-1][1].stdout

    # The loading container failed every run and was never touched.
    assert started_at(loading["container"]) == first_start[loading["container"]]
    metrics = (tmp_path / "textfiles" / "cortex_health.prom").read_text()
    assert (
        'cortex_model_restarts_total{model="sick",engine="llamacpp",container="cortex-hc-test-sick"} 2'
        in metrics
    )
    assert 'cortex_model_up{model="sick",engine="llamacpp",container="cortex-hc-test-sick"} 0' in metrics
    labels = '{model="loading",engine="llamacpp",container="cortex-hc-test-loading"}'
    assert f"cortex_model_starting{labels} 1" in metrics
    assert f"cortex_model_restarts_total{labels} 0" in metrics
    assert f"cortex_model_consecutive_failures{labels} 0" in metrics

    # Healthy again: the next runs say so, and the failures reset; one of
    # two runs in a row (probe_every 2) also sends a real 1-token request.
    (sick["ctl"] / "sick").unlink()
    for _run in range(2):
        restarted, result = step()
        assert (restarted, result.returncode) == (False, 0), result.stdout
    metrics = (tmp_path / "textfiles" / "cortex_health.prom").read_text()
    assert 'cortex_model_up{model="sick",engine="llamacpp",container="cortex-hc-test-sick"} 1' in metrics
    assert (
        'cortex_model_probe_ok{model="sick",engine="llamacpp",container="cortex-hc-test-sick"} 1' in metrics
    )
