"""inventories/example is a valid fleet: every host's models plan, the routes
merge across hosts, and the L40S host's GPU memory plan fits."""

from __future__ import annotations

from pathlib import Path

import yaml
from ansible_collections.cortex.serving.plugins.module_utils._fleet import routing_table
from ansible_collections.cortex.serving.plugins.module_utils._models import host_instances, instance_endpoints
from ansible_collections.cortex.serving.plugins.module_utils._plan import plan

EXAMPLE = Path(__file__).resolve().parents[2] / "inventories" / "example"
GPUS = {"l40s-a": 1, "l40s-b": 1, "h100-a": 2}
L40S = [{"index": 0, "memory_total_mib": 46068}]


def models(host: str) -> list[dict]:
    return yaml.safe_load((EXAMPLE / "host_vars" / f"{host}.yml").read_text())["cortex_models"]


def test_every_host_plans_and_the_routes_merge():
    endpoints = []
    for host, count in GPUS.items():
        planned = host_instances(models(host), host, count, {"address": host})
        endpoints.append((host, instance_endpoints(planned["instances"])))
    table = {m["name"]: m for m in routing_table(endpoints)}
    assert sorted(table) == ["bge-small-en-v1.5", "gpt-oss-120b", "llama-3.1-8b-instruct"]
    assert [b["host"] for b in table["llama-3.1-8b-instruct"]["backends"]] == ["l40s-a", "l40s-b"]
    assert table["llama-3.1-8b-instruct"]["engine"] == "vllm"


def test_the_l40s_plan_fits():
    entries = models("l40s-a")
    planned = host_instances(entries, "l40s-a", 1)
    shapes = {m["name"]: m["plan"] for m in entries if "plan" in m}
    result = plan(planned["instances"], shapes, L40S)
    assert result["fits"], result
    assert result["unknown"] == ["bge-small-en-v1.5"]
