"""inventories/example is a valid fleet: every host's models plan, the routes
merge across hosts, the L40S host's GPU memory plan fits, and so does the
flagship, gpt-oss-120b on four L40S, as the role renders it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ansible_collections.cortex.serving.plugins.module_utils._fleet import routing_table
from ansible_collections.cortex.serving.plugins.module_utils._models import host_instances, instance_endpoints
from ansible_collections.cortex.serving.plugins.module_utils._plan import MIB, plan, table

from tests.role_defaults import model_servers_defaults

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "inventories" / "example"
GPUS = {"l40s-a": 1, "l40s-b": 1, "h100-a": 2, "l40s-quad-a": 4}
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


def test_the_flagship_fits_four_l40s_as_the_role_renders_it(gpt_oss_120b):
    shapes = {"gpt-oss-120b": {**gpt_oss_120b, "context_length": 131072}}
    planned = host_instances(models("l40s-quad-a"), "l40s-quad-a", 4, model_servers_defaults(), shapes)
    (instance,) = planned["instances"]
    command = instance["command"]

    def arg(flag):
        return command[command.index(flag) + 1]

    # 32 slots of 65536 tokens in one pool, every layer on the GPUs, tensor split.
    assert (arg("--parallel"), arg("--ctx-size"), arg("--n-gpu-layers")) == ("32", "2097152", "999")
    assert (arg("--split-mode"), arg("--tensor-split"), arg("--flash-attn")) == ("tensor", "1,1,1,1", "on")
    assert "--kv-unified" in command

    l40s = [{"index": i, "memory_total_mib": 46068} for i in range(4)]
    result = plan(planned["instances"], shapes, l40s, host_memory_mib=256 * 1024)
    assert result["fits"], table(result, "l40s-quad-a")
    rows = [
        (
            r["gpu"],
            round(r["weights"] / 2**30, 2),
            round(r["kv_cache"] / 2**30, 2),
            round(r["need"] / 2**30, 2),
        )
        for r in result["rows"]
    ]
    # Per GPU (GiB): a quarter of the 58.4 GiB on the GPUs (all but the input
    # embedding), a quarter of the KV pool: 18 full-context layers of 2,097,152
    # cells and 18 sliding layers of 32 x 128 + 512 cells (padded to 4608),
    # at 8 KV heads x (64 + 64) x 2 bytes a cell.
    kv = (18 * 2097152 + 18 * 4608) * 8 * 128 * 2 / 4 / 2**30
    assert kv == pytest.approx(18.04, abs=0.01)
    assert rows == [(gpu, 14.61, round(kv, 2), 33.62) for gpu in range(4)]
    assert all(g["free"] > 10 * 1024 * MIB for g in result["gpus"])
    # Only the input embedding stays in host memory.
    assert result["host"] == [
        {"model": "gpt-oss-120b", "replica": 0, "bytes": gpt_oss_120b["token_embd_bytes"]}
    ]
