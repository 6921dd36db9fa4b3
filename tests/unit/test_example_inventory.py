"""inventories/example is a valid fleet: every host's models plan, the routes
merge across hosts, the L40S host's GPU memory plan fits, and so does the
flagship, gpt-oss-120b on four L40S, as the role renders it, and on two H100s
with gpt-oss-20b drafting for it."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import yaml
from ansible_collections.cortex.serving.plugins.module_utils._fleet import routing_table
from ansible_collections.cortex.serving.plugins.module_utils._gguf_info import read_gguf_info
from ansible_collections.cortex.serving.plugins.module_utils._models import host_instances, instance_endpoints
from ansible_collections.cortex.serving.plugins.module_utils._plan import MIB, plan, table

from tests.gguf_shapes import write_gguf
from tests.role_defaults import model_servers_defaults

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "inventories" / "example"
GPUS = {"l40s-a": 1, "l40s-b": 1, "h100-a": 2, "l40s-quad-a": 4, "h100-pair-a": 8, "h100-pair-b": 8}
H100 = {"memory_total_mib": 81559}
L40S = [{"index": 0, "memory_total_mib": 46068}]


def models(host: str) -> list[dict]:
    path = EXAMPLE / "host_vars" / f"{host}.yml"
    if not path.exists():  # the pair's model is in its group's vars
        path = EXAMPLE / "group_vars" / "h100_pair.yml"
    return yaml.safe_load(path.read_text())["cortex_models"]


def test_every_host_plans_and_the_routes_merge():
    endpoints = []
    for host, count in GPUS.items():
        planned = host_instances(models(host), host, count, {"address": host})
        endpoints.append((host, instance_endpoints(planned["instances"])))
    table = {m["name"]: m for m in routing_table(endpoints)}
    assert sorted(table) == [
        "bge-small-en-v1.5",
        "gpt-oss-120b",
        "llama-3.1-405b-instruct",
        "llama-3.1-8b-instruct",
    ]
    # Only the first host of the model over two hosts serves its API.
    assert [b["host"] for b in table["llama-3.1-405b-instruct"]["backends"]] == ["h100-pair-a"]
    assert [b["host"] for b in table["llama-3.1-8b-instruct"]["backends"]] == ["l40s-a", "l40s-b"]
    assert table["llama-3.1-8b-instruct"]["engine"] == "vllm"
    assert table["llama-3.1-8b-instruct"]["adapters"] == [{"name": "llama-3.1-8b-sql", "scale": 1.0}]


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
    # Need: weights, KV, a compute buffer led by the attention mask of 2,097,152
    # cells x 512 tokens in F16 (2 GiB), and the process's CUDA overhead.
    assert rows == [(gpu, 14.61, round(kv, 2), 35.44) for gpu in range(4)]
    assert all(g["free"] > 9 * 1024 * MIB for g in result["gpus"])
    # Only the input embedding stays in host memory.
    assert result["host"] == [
        {"model": "gpt-oss-120b", "replica": 0, "bytes": gpt_oss_120b["token_embd_bytes"]}
    ]


def test_gpt_oss_20b_drafts_for_120b_on_the_second_h100(gpt_oss_120b, tmp_path):
    path = tmp_path / "gpt-oss-20b-mxfp4.gguf"
    write_gguf(path, "gpt-oss-20b", "MXFP4", fill="sparse")
    draft = read_gguf_info(str(path), gguf)
    # The same vocabulary (o200k): the check passes before any host changes.
    assert draft["vocabulary"] == gpt_oss_120b["vocabulary"]
    shapes = {"gpt-oss-120b": gpt_oss_120b, "gpt-oss-120b+draft": draft}
    planned = host_instances(models("h100-a"), "h100-a", 2, model_servers_defaults(), shapes)
    (instance,) = planned["instances"]
    command = instance["command"]
    assert command[command.index("--spec-draft-device") + 1] == "CUDA1"
    assert command[command.index("--spec-draft-model") + 1] == "/draft/gpt-oss-20b-mxfp4.gguf"
    h100 = [{"index": i, "memory_total_mib": 81559} for i in range(2)]
    without = [{key: value for key, value in m.items() if key != "speculative"} for m in models("h100-a")]
    alone = plan(
        host_instances(without, "h100-a", 2, model_servers_defaults(), shapes)["instances"], shapes, h100
    )
    result = plan(planned["instances"], shapes, h100, host_memory_mib=512 * 1024)
    assert result["fits"], table(result, "h100-a")
    before, after = ({r["gpu"]: r for r in plan_["rows"]} for plan_ in (alone, result))
    # The draft (about 11 GiB of MXFP4 and Q8_0, less its input embedding) on GPU 1 only.
    assert after[0]["need"] == before[0]["need"]
    added = after[1]["weights"] - before[1]["weights"]
    assert draft["tensor_bytes"] - draft["token_embd_bytes"] <= added <= draft["tensor_bytes"]


def test_llama_405b_spans_two_hosts_of_eight_h100s_and_each_hosts_share_fits():
    entries = models("h100-pair-a")
    shapes = {m["name"]: m["plan"] for m in entries}
    for host, rank in (("h100-pair-a", "0"), ("h100-pair-b", "1")):
        defaults = {**model_servers_defaults(), "interfaces": ["lo", "eno1", "ib0"]}
        (instance,) = host_instances(entries, host, 8, defaults, shapes)["instances"]
        command = instance["command"]
        assert command[command.index("--node-rank") + 1] == rank
        assert command[command.index("--master-addr") + 1] == "10.30.0.41"
        assert instance["env"]["NCCL_SOCKET_IFNAME"] == "ib0"
        assert instance["env"]["NCCL_IB_HCA"] == "mlx5"
        result = plan([instance], shapes, [{"index": i, **H100} for i in range(8)])
        assert result["fits"], table(result)
        # A sixteenth of 405 GB of FP8 weights on each of the 16 GPUs.
        assert {r["weights"] for r in result["rows"]} == {int(405e9 / 16)}
