"""A stop that comes while the supervisor starts its workers.

Found in a fresh run of the default scenario: systemd stopped the gateway
9 ms after "starting 2 workers" (a converge moved its listener), the workers
never ended, and systemd killed them at TimeoutStopSec, 40 s later. A
SIGTERM that lands between a worker's fork and the supervisor noting the
child was never passed on to that worker, and the workers after it were
started anyway."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import yaml

from .conftest import free_port, make_config

# The supervisor with os.fork wrapped: right after the first worker's fork,
# in the parent, before the supervisor has noted the child, it is sent
# SIGTERM (what systemd's stop did, at the worst moment, every time).
LAUNCHER = textwrap.dedent(
    """
    import os, signal, sys
    real_fork = os.fork
    forks = []
    def fork():
        pid = real_fork()
        if pid and not forks:
            forks.append(pid)
            os.kill(os.getpid(), signal.SIGTERM)
        return pid
    os.fork = fork
    from cortex_gateway.__main__ import main
    sys.argv = ["cortex-gateway", "serve", "--config", sys.argv[1]]
    sys.exit(main())
    """
)


def test_a_stop_while_the_workers_start_ends_every_worker(tmp_path):
    config = make_config({"chat": ["http://127.0.0.1:9"]}, workers=2)
    config["listen"]["port"] = free_port()
    config["admin_listen"] = {"host": "127.0.0.1", "port": free_port()}
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    process = subprocess.Popen(
        [sys.executable, str(launcher), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={"PYTHONPATH": ":".join(sys.path), "PATH": "/usr/bin:/bin"},
    )
    try:
        # Far longer than a stop takes (the workers have nothing in flight);
        # far shorter than the hang it was (until the parent is killed).
        output, _stderr = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _stderr = process.communicate()
        raise AssertionError("the gateway did not stop:\n" + output.decode()[-3000:]) from None
    assert process.returncode == 0, output.decode()[-3000:]
