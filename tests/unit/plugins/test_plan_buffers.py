"""model_plan's GPU memory against llama.cpp's own account, for every command
line of tests/bench/gpu/run.sh buffers: llama-fit-params --fit-print with
nothing allocated, on an H100, for gpt-oss-120b and Llama-3-8B of the real
shapes (tests/gguf_shapes.py), from 1 to 32 slots, 8k to 1M cells, f16, q8_0
and q4_0 caches, and experts kept in host memory (docs/bench/buffers-*.json).

Weights and KV cache are planned to the MiB. The compute buffer is planned
within 5% or 48 MiB, and never more than 48 MiB under llama.cpp's: what is
under is memory the process will not have."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import gguf
import pytest
from ansible_collections.cortex.serving.plugins.module_utils._gguf_info import read_gguf_info
from ansible_collections.cortex.serving.plugins.module_utils._plan import MIB, llamacpp_memory

from tests.gguf_shapes import write_gguf

BENCH = Path(__file__).resolve().parents[3] / "docs" / "bench"
SHORT = {
    "-ngl": "--n-gpu-layers", "-kvu": "--kv-unified", "-fa": "--flash-attn", "-b": "--batch-size",
    "-ub": "--ubatch-size", "-np": "--parallel", "-c": "--ctx-size", "-ctk": "--cache-type-k",
    "-ctv": "--cache-type-v",
}  # fmt: skip


def measured(name: str) -> list[dict]:
    return json.loads((BENCH / f"buffers-{name}.json").read_text())


@pytest.fixture(scope="module")
def llama3_8b(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "llama3-8b-q8_0.gguf"
    write_gguf(path, "llama3-8b", "Q8_0", fill="sparse")
    return read_gguf_info(str(path), gguf)


def planned(shape: dict, flags: str) -> dict:
    command = ["llama-server", *(SHORT.get(word, word) for word in shlex.split(flags))]
    return llamacpp_memory({"model": "m", "command": command, "gpus": [0]}, shape)["gpus"][0]


def check(shape: dict, row: dict) -> None:
    ours = planned(shape, row["flags"])
    theirs = row["llama_cpp"]["devices"]["CUDA0"]
    assert ours["weights"] // MIB == theirs["model"], row["name"]
    assert ours["kv_cache"] // MIB == theirs["context"], row["name"]
    compute = ours["compute"] / MIB
    assert compute >= theirs["compute"] - 48, (row["name"], compute, theirs["compute"])
    assert compute <= max(theirs["compute"] * 1.05, theirs["compute"] + 48), (row["name"], compute, theirs)


@pytest.mark.parametrize("row", measured("gpt-oss-120b"), ids=lambda row: row["name"])
def test_gpt_oss_120b_is_planned_as_llama_cpp_accounts_it(gpt_oss_120b, row):
    check(gpt_oss_120b, row)


@pytest.mark.parametrize("row", measured("llama3-8b"), ids=lambda row: row["name"])
def test_llama3_8b_is_planned_as_llama_cpp_accounts_it(llama3_8b, row):
    check(llama3_8b, row)
