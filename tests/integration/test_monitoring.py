"""playbooks/monitoring.yml writes Prometheus targets and jobs that promtool accepts,
and the Grafana dashboard asks only for series that the fleet really exports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from cortex_gateway.app import Gateway
from cortex_gateway.config import parse_config
from prometheus_client.parser import text_string_to_metric_families

from ..unit.gateway.conftest import make_config
from .conftest import ROOT

DASHBOARD = ROOT / "roles" / "monitoring" / "files" / "cortex-serving-dashboard.json"
sys.path.insert(0, str(ROOT / "roles" / "health_check" / "files"))
import cortex_healthcheck  # noqa: E402

ANY_ADDRESS = "0.0.0.0"  # noqa: S104 - an inventory value, never bound
ENDPOINTS = [
    {"name": "chat", "engine": "vllm", "replica": 0, "url": "http://10.0.0.11:18100", "port": 18100},
    {"name": "embed", "engine": "llamacpp", "replica": 0, "url": "http://10.0.0.11:18200", "port": 18200},
]


def run_monitoring(tmp_path: Path) -> subprocess.CompletedProcess:
    inventory = {
        "all": {
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
            "children": {
                "gpu_hosts": {
                    "hosts": {
                        "gpu-a": {
                            "ansible_host": "10.0.0.11",
                            "model_servers_endpoints": ENDPOINTS,
                            "model_servers_api_key": "engine-key-a",
                        },
                    }
                },
                "gateways": {
                    "hosts": {"gw-a": {"ansible_host": "10.0.0.51", "gateway_listen_host": ANY_ADDRESS}}
                },
            },
        }
    }
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0"}
    return subprocess.run(
        [str(Path(sys.executable).with_name("ansible-playbook")), "-i", str(path),
         "-e", f"monitoring_dir={tmp_path / 'out'}", "-e", f"ansible_python_interpreter={sys.executable}",
         str(ROOT / "playbooks" / "monitoring.yml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def test_targets_and_jobs_pass_promtool_and_a_second_run_changes_nothing(tmp_path):
    first = run_monitoring(tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Run promtool check config" in first.stdout  # promtool was found and ran
    out = tmp_path / "out"
    gateway = json.loads((out / "file_sd" / "cortex-gateway.json").read_text())
    assert gateway == [{"targets": ["10.0.0.51:8000"], "labels": {"host": "gw-a"}}]
    engines = json.loads((out / "file_sd" / "cortex-engines-gpu-a.json").read_text())
    assert [(g["targets"], g["labels"]["model"]) for g in engines] == [
        (["10.0.0.11:18100"], "chat"),
        (["10.0.0.11:18200"], "embed"),
    ]
    nodes = json.loads((out / "file_sd" / "cortex-node.json").read_text())
    assert [g["targets"][0] for g in nodes] == ["10.0.0.11:9100", "10.0.0.51:9100"]
    assert (out / "keys" / "gpu-a").read_text() == "engine-key-a"
    jobs = yaml.safe_load((out / "scrape-configs.yml").read_text())
    assert [j["job_name"] for j in jobs] == ["cortex-gateway", "cortex-node", "cortex-engines-gpu-a"]
    check = tmp_path / "prometheus.yml"
    check.write_text(yaml.safe_dump({"scrape_configs": jobs}))
    promtool = subprocess.run(
        ["promtool", "check", "config", str(check)], capture_output=True, text=True, check=False
    )
    assert promtool.returncode == 0, promtool.stdout + promtool.stderr

    second = run_monitoring(tmp_path)
    assert re.search(r"localhost\s+: ok=\d+\s+changed=0 ", second.stdout), second.stdout


def exported_names() -> set[str]:
    """Sample names the gateway and the health-check textfile really export."""
    gateway = Gateway(parse_config(make_config({"chat": ["http://127.0.0.1:9"]})))
    gateway.metrics.requests.labels("chat", "llamacpp", "b", "200").inc()
    for histogram in (gateway.metrics.latency, gateway.metrics.ttft, gateway.metrics.overhead):
        histogram.labels("chat", "llamacpp").observe(0.1)
    gateway.metrics.count_usage("chat", "llamacpp", {"prompt_tokens": 1, "completion_tokens": 1})
    gateway.metrics.queue_depth.labels("chat").set(0)
    text = gateway.metrics.exposition().decode()
    engine = {"name": "chat", "engine": "llamacpp", "container": "c"}
    result = {
        "engine": engine,
        "up": 1,
        "latency": 0.1,
        "probe_ok": True,
        "starting": False,
        "docker_restarts": 0,
    }
    gpus = [{"index": "0", "name": "H100", "used": 1, "total": 2}]
    text += cortex_healthcheck.render_metrics(
        [result], {"c": {"probe_ok": True}}, {"url": "u", "up": 1, "latency": 0.1}, 1, gpus, 0
    )
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_dashboard_loads_and_asks_only_for_exported_series():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    names = exported_names()
    titles = " ".join(p["title"] for p in panels)
    for wanted in ("Requests", "Time to first token", "tokens/s", "Queue depth", "breakers", "GPU memory"):
        assert wanted.lower() in titles.lower(), wanted
    for panel in panels:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable in re.findall(r"\$(\w+)", expr):
                assert variable in variables or variable.startswith("__"), (panel["title"], variable)
            for metric in re.findall(r"\b(cortex_[a-z_]+)\b", expr):
                assert metric in names, f"{panel['title']}: {metric} is not exported"
