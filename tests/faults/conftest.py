"""The deployment the fault suite breaks: two real llama-server containers
serving SmolLM2 (the engine image this project builds), a real multi-worker
gateway process with its usage records in SQLite (or PostgreSQL), and real
nginx with the gateway role's own site template in front. Each test starts
its own gateway, on the port nginx proxies to, with the backends it needs."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import jinja2
import pytest
from aiohttp.test_utils import TestServer
from ansible_collections.cortex.serving.plugins.module_utils._engine_command import (
    API_KEY_FILE,
    llamacpp_command,
)

# The integration tests' image, model and PostgreSQL fixtures serve this suite too.
from ..integration.conftest import docker, llamacpp_image, smollm2_gguf  # noqa: F401  # pylint: disable=unused-import
from ..integration.test_usage_postgres import postgres_cluster  # noqa: F401  # pylint: disable=unused-import
from ..unit.gateway.conftest import ENGINE_KEY, free_port
from .toxics import FaultProxy

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2"
# The report: one row per fault, printed at the end and written for the docs.
ROWS: list[dict] = []


@dataclass
class Engine:
    """One real llama-server container on a loopback port."""

    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as answer:  # noqa: S310 - loopback
                return answer.status == 200
        except OSError:
            return False

    def wait_healthy(self, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.healthy():
                return
            time.sleep(0.3)
        raise AssertionError(
            f"{self.name} is not healthy: {docker('logs', self.name, check=False).stderr[-2000:]}"
        )

    def signal(self, name: str) -> None:
        docker("kill", "--signal", name, self.name)

    def restore(self) -> None:
        """Running and healthy again, whatever the last fault did to it."""
        state = json.loads(docker("inspect", self.name).stdout)[0]["State"]
        if state["Status"] == "paused" or (state["Running"] and not self.healthy()):
            with contextlib.suppress(subprocess.CalledProcessError):
                docker("kill", "--signal", "CONT", self.name)
        if not state["Running"]:
            docker("start", self.name)
        self.wait_healthy()


@pytest.fixture(scope="session")
def engines(llamacpp_image, smollm2_gguf, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("engines")
    key_file = folder / "api-key"
    key_file.write_text(ENGINE_KEY)
    key_file.chmod(0o644)
    model = {
        "name": MODEL,
        "model_file": smollm2_gguf.name,
        "llamacpp": {"parallel": 4, "ctx_per_slot": 512, "threads": 1, "metrics": True, "seed": 7},
    }
    started = []
    try:
        for letter in "ab":
            engine = Engine(f"cortex-fault-{letter}-{secrets.token_hex(3)}", free_port())
            docker(
                "run", "-d", "--name", engine.name, "--user", "10001:10001", "--read-only",
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "-p", f"127.0.0.1:{engine.port}:8080",
                "-v", f"{smollm2_gguf.parent}:/models:ro", "-v", f"{key_file}:{API_KEY_FILE}:ro",
                llamacpp_image, *llamacpp_command(model),
            )  # fmt: skip
            started.append(engine)
        for engine in started:
            engine.wait_healthy()
        yield started
    finally:
        for engine in started:
            docker("rm", "-f", engine.name, check=False)


@pytest.fixture
def healthy_engines(engines):
    for engine in engines:
        engine.restore()
    return engines


@pytest.fixture(scope="session")
def gateway_socket():
    """The gateway's listener, held as systemd's socket unit holds it: every
    gateway process of the suite is given it, and it outlives them."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4096)
        yield sock


@pytest.fixture(scope="session")
def gateway_port(gateway_socket) -> int:
    return gateway_socket.getsockname()[1]


@dataclass
class Nginx:
    prefix: Path
    port: int

    def command(self, *args: str) -> list[str]:
        return ["nginx", "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"), *args]

    def reload(self) -> None:
        subprocess.run(self.command("-s", "reload"), check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def nginx(gateway_port, tmp_path_factory):
    """Real nginx with the gateway role's site template, rendered as the role
    renders it for this gateway (no TLS, admin API not exposed)."""
    assert shutil.which("nginx"), "nginx is missing: scripts/bootstrap installs Debian's nginx-light"
    prefix = tmp_path_factory.mktemp("nginx")
    port = free_port()
    templates = jinja2.Environment(  # noqa: S701 - an nginx config, not HTML
        loader=jinja2.FileSystemLoader(ROOT / "roles" / "gateway" / "templates"), keep_trailing_newline=True
    )
    templates.filters["bool"] = bool  # the one Ansible filter the site template uses
    site = templates.get_template("nginx-site.conf.j2").render(
        ansible_managed="fault suite",
        gateway_listen_host="127.0.0.1",
        gateway_listen_port=gateway_port,
        gateway_nginx_admin_expose=False,
        gateway_nginx_listen_port=f"127.0.0.1:{port}",
        gateway_nginx_tls="none",
        gateway_nginx_server_name="_",
        gateway_max_body_bytes="8m",
        _gateway_proxy_timeout=120,
    )
    (prefix / "site.conf").write_text(site)
    (prefix / "logs").mkdir()
    (prefix / "nginx.conf").write_text(
        "worker_processes 2;\n"
        f"pid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/logs/error.log warn;\n"
        "events { worker_connections 2048; }\n"
        "http {\n"
        f"  access_log {prefix}/logs/access.log;\n"
        f"  client_body_temp_path {prefix}/body;\n  proxy_temp_path {prefix}/proxy;\n"
        f"  fastcgi_temp_path {prefix}/fastcgi;\n  uwsgi_temp_path {prefix}/uwsgi;\n"
        f"  scgi_temp_path {prefix}/scgi;\n"
        f"  include {prefix}/site.conf;\n"
        "}\n"
    )
    server = Nginx(prefix, port)
    subprocess.run(server.command("-t"), check=True, capture_output=True, timeout=30)
    subprocess.run(server.command(), check=True, capture_output=True, timeout=30)
    try:
        yield server
    finally:
        subprocess.run(server.command("-s", "quit"), check=False, capture_output=True, timeout=30)


@pytest.fixture
async def fault_proxy():
    """Start a FaultProxy in front of an engine; closed at the end of the test."""
    servers: list[TestServer] = []

    async def start(engine: Engine, mode: str) -> tuple[FaultProxy, str]:
        proxy = FaultProxy(engine.url, mode)
        server = TestServer(proxy.app(), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return proxy, str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not ROWS:
        return
    table = fault_table(ROWS)
    terminalreporter.write_sep("=", "fault injection: what each fault cost")
    terminalreporter.write_line(table)
    out = Path(os.environ.get("CORTEX_REPORTS", "/tmp")) / "faults.md"  # noqa: S108 - a report, not a secret
    out.write_text(table + "\n")


def fault_table(rows: list[dict]) -> str:
    header = (
        "| fault | requests sent | failed | streams cut (SSE error event / closed) | hung "
        "| usage records lost | /health always answered |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['fault']} | {row['sent']} | {row['failed']} | {row['cut_event']} / {row['cut_closed']} "
            f"| {row['hung']} | {row['lost']} | {'yes' if row['health_ok'] else 'NO'} |"
        )
    return "\n".join(lines)
