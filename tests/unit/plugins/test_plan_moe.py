"""gguf_info and model_plan on mixtures of experts and sliding-window models.

The files are real GGUF files written with gguf-py with every tensor name,
shape and type and every metadata key of the real models (tests/gguf_shapes.py),
sparse, so a 59 GiB gpt-oss-120b takes no disk.
"""

from __future__ import annotations

from types import SimpleNamespace

import gguf
import pytest
from ansible_collections.cortex.serving.plugins.module_utils._gguf_info import (
    GGUFInfoError,
    read_gguf_info,
    swa_layers,
)
from ansible_collections.cortex.serving.plugins.module_utils._models import host_instances
from ansible_collections.cortex.serving.plugins.module_utils._plan import KV_BYTES, MIB, plan, table

from tests.gguf_shapes import write_gguf

GIB = 1024 * MIB
L40S = {"memory_total_mib": 46068}
H200 = {"memory_total_mib": 143771}


def gpus(count, memory=None):
    return [{"index": i, **(memory or L40S)} for i in range(count)]


@pytest.fixture(scope="module")
def oss120(gpt_oss_120b):
    return gpt_oss_120b


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "gemma-3-27b-q4_0.gguf"
    write_gguf(path, "gemma3-27b", "Q4_0", fill="sparse")
    return read_gguf_info(str(path), gguf)


def oss(gpu_list=(0,), **llamacpp):
    return {
        "name": "gpt-oss-120b",
        "engine": "llamacpp",
        "source": {"path": "/m/gpt-oss-120b-mxfp4-00001-of-00003.gguf"},
        "gpus": list(gpu_list),
        "llamacpp": {"n_gpu_layers": 999, "flash_attn": True, **llamacpp},
    }


def planned(models, shape, gpu_count, host_memory_mib=0, memory=None):
    names = {m["name"] for m in models}
    instances = host_instances(models, "gpu-a", gpu_count)["instances"]
    return plan(
        instances, dict.fromkeys(names, shape), gpus(gpu_count, memory), host_memory_mib=host_memory_mib
    )


# gguf_info


def test_gpt_oss_120b_is_read_as_a_mixture_of_experts_with_sliding_windows(oss120):
    assert oss120["architecture"] == "gpt-oss"
    assert oss120["quantization"] == "MXFP4_MOE"
    # The published file: 116.8 B parameters, 59.0 GiB.
    assert oss120["parameter_count"] == pytest.approx(116.83e9, rel=0.001)
    assert oss120["size_bytes"] / GIB == pytest.approx(59.03, abs=0.01)
    assert (oss120["expert_count"], oss120["expert_used_count"], oss120["expert_feed_forward_length"]) == (
        128,
        4,
        2880,
    )
    # llama.cpp's pattern for gpt-oss: every other layer slides, starting with layer 0.
    assert oss120["sliding_window"] == 128
    assert oss120["swa_layers"] == list(range(0, 36, 2))
    assert oss120["attention_sinks"] is True
    assert (oss120["key_length"], oss120["value_length"], oss120["head_count_kv"]) == (64, 64, 8)
    groups = oss120["tensor_groups"]
    assert groups["experts"]["types"] == {"MXFP4": 108, "F32": 108}
    assert groups["attention"]["types"]["Q8_0"] == 144
    assert groups["embedding"]["types"] == {"Q8_0": 1}
    assert groups["experts"]["bytes"] / GIB == pytest.approx(56.88, abs=0.01)
    assert len(oss120["layer_expert_bytes"]) == 36
    assert sum(oss120["layer_expert_bytes"]) == groups["experts"]["bytes"]
    assert sum(oss120["layer_bytes"]) < oss120["tensor_bytes"]


def test_gemma3_slides_on_five_layers_of_six(gemma3):
    assert gemma3["architecture"] == "gemma3"
    assert gemma3["sliding_window"] == 1024
    assert gemma3["swa_layers"] == [il for il in range(62) if il % 6 != 5]
    assert len(gemma3["swa_layers"]) == 52
    assert gemma3["expert_count"] == 0
    assert gemma3["tied_output"] is True
    assert gemma3["tensor_groups"]["feed_forward"]["types"] == {"Q4_0": 186}


def test_a_pattern_in_the_file_wins_over_the_architectures():
    assert swa_layers("gpt-oss", 6, 128, None) == [0, 2, 4]
    assert swa_layers("gpt-oss", 6, 128, 3) == [0, 1, 3, 4]
    assert swa_layers("gemma3", 4, 1024, [True, False, False, True]) == [0, 3]
    assert swa_layers("cohere2moe", 8, 4096, None) == [1, 2, 3, 5, 6, 7]  # the dense layer first
    assert swa_layers("llama", 32, 4096, None) == []  # llama.cpp runs Mistral-style windows in full
    assert swa_layers("gemma3", 62, 0, None) == []


def test_a_file_newer_than_the_gguf_package_is_named_with_the_fix(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    write_gguf(path, "gpt-oss-tiny", "MXFP4", fill="sparse")

    def old_reader(_path):
        # What gguf 0.17.1 raises on an MXFP4 tensor.
        raise ValueError("np.uint32(39) is not a valid GGMLQuantizationType")

    old = SimpleNamespace(GGUFReader=old_reader, __version__="0.17.1")
    with pytest.raises(GGUFInfoError, match=r"gguf package here \(0\.17\.1\) may be older than the file"):
        read_gguf_info(str(path), old)


def test_the_pinned_gguf_package_reads_mxfp4(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "gpt-oss-tiny", "MXFP4", fill="random")
    info = read_gguf_info(str(path), gguf)
    assert info["tensor_groups"]["experts"]["types"]["MXFP4"] == 4 * 3


# The planner: sliding windows


def kv_per_cell(shape, cache=2.0):
    return shape["head_count_kv"] * (shape["key_length"] + shape["value_length"]) * cache


def test_sliding_window_layers_keep_only_the_window(oss120):
    result = planned([oss(parallel=4, ctx_size=131072, kv_unified=True)], oss120, 1, memory=H200)
    row = result["rows"][0]
    cell = kv_per_cell(oss120)
    # 18 full layers of 131072 cells; 18 sliding layers of 4 x 128 + one
    # micro-batch (512), padded to 256: 1024 cells.
    assert row["kv_cache"] == 18 * 131072 * cell + 18 * 1024 * cell
    full = planned(
        [oss(parallel=4, ctx_size=131072, kv_unified=True, swa_full=True)],
        oss120,
        1,
        memory=H200,
    )["rows"][0]
    assert full["kv_cache"] == 36 * 131072 * cell
    assert row["kv_cache"] < 0.51 * full["kv_cache"]


def test_without_a_unified_pool_each_slot_keeps_its_own_window(oss120):
    row = planned([oss(parallel=4, ctx_size=131072, kv_unified=False)], oss120, 1, memory=H200)["rows"][0]
    cell = kv_per_cell(oss120)
    # Per slot: 128 + 512 = 640 cells, padded to 768, in each of 4 streams.
    assert row["kv_cache"] == 18 * 131072 * cell + 18 * 768 * 4 * cell


def test_gemma3_kv_is_a_sixth_of_full_context_and_quantizes(gemma3):
    model = {
        "name": "gemma-3-27b",
        "engine": "llamacpp",
        "source": {"path": "/m/gemma-3-27b.gguf"},
        "gpus": [0],
        "llamacpp": {"n_gpu_layers": 999, "parallel": 1, "ctx_size": 131072, "flash_attn": True},
    }
    row = planned([model], gemma3, 1, memory=H200)["rows"][0]
    cell = kv_per_cell(gemma3)
    assert row["kv_cache"] == 10 * 131072 * cell + 52 * 1536 * cell
    model["llamacpp"].update(cache_type_k="q8_0", cache_type_v="q8_0")
    q8 = planned([model], gemma3, 1, memory=H200)["rows"][0]
    assert q8["kv_cache"] == pytest.approx(row["kv_cache"] * KV_BYTES["q8_0"] / 2, rel=1e-9)


# The planner: experts


def test_experts_kept_in_host_memory_leave_the_gpu(oss120):
    big = {"memory_total_mib": 143771}
    # A context large enough that the layers, not the output's logits, set the compute buffer.
    slots = {"parallel": 32, "ctx_size": 1048576, "kv_unified": True}
    base = planned([oss(**slots)], oss120, 1, memory=big)
    cpu = planned([oss(**slots, cpu_moe=True)], oss120, 1, memory=big)
    some = planned([oss(**slots, n_cpu_moe=10)], oss120, 1, memory=big)
    experts = oss120["layer_expert_bytes"]
    assert base["rows"][0]["weights"] - cpu["rows"][0]["weights"] == sum(experts)
    assert base["rows"][0]["weights"] - some["rows"][0]["weights"] == sum(experts[:10])
    # Host memory: the input embedding, and the experts kept there.
    assert base["host"][0]["bytes"] == oss120["token_embd_bytes"]
    assert cpu["host"][0]["bytes"] == oss120["token_embd_bytes"] + sum(experts)
    assert some["host"][0]["bytes"] == oss120["token_embd_bytes"] + sum(experts[:10])
    # For large batches llama.cpp copies the host's experts to the GPU one tensor at a time.
    assert oss120["expert_tensor_max_bytes"] == 128 * 2880 * 2880 // 32 * 17
    assert some["rows"][0]["compute"] - base["rows"][0]["compute"] == oss120["expert_tensor_max_bytes"]
    no_copy = planned([oss(**slots, n_cpu_moe=10, op_offload=False)], oss120, 1, memory=big)
    assert no_copy["rows"][0]["compute"] == base["rows"][0]["compute"]


def test_host_memory_that_cannot_hold_the_experts_fails_the_plan(oss120):
    model = oss(parallel=1, ctx_size=8192, cpu_moe=True)
    assert planned([model], oss120, 1, host_memory_mib=128 * 1024)["fits"]
    result = planned([model], oss120, 1, host_memory_mib=32 * 1024)
    assert not result["fits"]
    assert not result["host_fits"]
    assert "host memory" in table(result)
    assert "does not fit" in table(result)


def test_layer_split_places_whole_layers_with_their_experts(oss120):
    result = planned([oss((0, 1), parallel=4, ctx_size=32768, split_mode="layer")], oss120, 2)
    first, second = result["rows"]
    layer = oss120["layer_bytes"][0]
    # 37 layers with the output: layers 0-18 on GPU 0, 19-35 and the output on GPU 1.
    assert first["weights"] == 19 * layer
    assert second["weights"] == pytest.approx(17 * layer + oss120["output_bytes"], abs=64 * 1024)
    # With the first 10 layers' experts on the host, GPU 0 is the lighter one.
    offload = planned([oss((0, 1), parallel=4, ctx_size=32768, split_mode="layer", n_cpu_moe=10)], oss120, 2)
    assert offload["rows"][0]["weights"] == first["weights"] - sum(oss120["layer_expert_bytes"][:10])
    assert offload["rows"][1]["weights"] == second["weights"]


# Suggestions when it does not fit


def apply(model, option):
    return {**model, "llamacpp": {**model["llamacpp"], **option["llamacpp"]}}


def test_too_long_a_context_gets_the_context_the_slots_and_the_cache_that_fit(oss120):
    # 64 slots of 131072 tokens: 8.4 M cells on 18 full-context layers.
    model = oss((0, 1, 2, 3), parallel=64, ctx_per_slot=131072, kv_unified=True)
    result = planned([model], oss120, 4)
    assert not result["fits"]
    (found,) = result["suggestions"]
    assert found["model"] == "gpt-oss-120b"
    options = {tuple(sorted(o["llamacpp"])): o for o in found["options"]}
    # Neither a q8_0 cache nor every expert on the host is enough here.
    assert set(options) == {("ctx_size",), ("ctx_size", "parallel")}
    for option in found["options"]:
        assert planned([apply(model, option)], oss120, 4)["fits"], option
    # Each is the most that fits: one step more does not.
    ctx = options[("ctx_size",)]["llamacpp"]["ctx_size"]
    assert not planned([apply(model, {"llamacpp": {"ctx_size": ctx + 256 * 64}})], oss120, 4)["fits"]
    slots = options[("ctx_size", "parallel")]["llamacpp"]["parallel"]
    bigger = {"parallel": slots + 1, "ctx_size": (slots + 1) * 131072}
    assert not planned([apply(model, {"llamacpp": bigger})], oss120, 4)["fits"]
    text = table(result, "gpu-a")
    assert "gpt-oss-120b would fit with any one of" in text
    assert f"ctx_size: {ctx}" in text


def test_a_quantized_cache_and_experts_on_the_host_are_offered_when_they_are_enough(oss120):
    # 32 slots of 98304 on four L40S: short by about 1 GiB a GPU; a q8_0 cache
    # saves more than its F16 copy in the compute buffer costs.
    model = oss((0, 1, 2, 3), parallel=32, ctx_per_slot=98304, kv_unified=True)
    result = planned([model], oss120, 4)
    assert not result["fits"]
    options = result["suggestions"][0]["options"]
    assert [sorted(o["llamacpp"]) for o in options] == [
        ["ctx_size"],
        ["ctx_size", "parallel"],
        ["cache_type_k", "cache_type_v"],
        ["n_cpu_moe"],
    ]
    assert options[2]["llamacpp"] == {"cache_type_k": "q8_0", "cache_type_v": "q8_0"}
    for option in options:
        assert planned([apply(model, option)], oss120, 4)["fits"], option


def test_a_quantized_cache_is_not_offered_where_its_f16_copy_does_not_fit(oss120):
    """Under flash attention llama.cpp converts a quantized layer's K and V over
    every cell to F16 in its compute buffer (3,103 MiB at 1M cells of
    gpt-oss-120b on an H100, docs/bench/buffers-gpt-oss-120b.json): at 4M
    cells that copy is larger than what the smaller cache saves."""
    model = oss((0, 1, 2, 3), parallel=32, ctx_per_slot=131072, kv_unified=True)
    result = planned([model], oss120, 4)
    assert not result["fits"]
    offered = [sorted(o["llamacpp"]) for o in result["suggestions"][0]["options"]]
    assert ["cache_type_k", "cache_type_v"] not in offered
    quantized = planned(
        [apply(model, {"llamacpp": {"cache_type_k": "q8_0", "cache_type_v": "q8_0"}})], oss120, 4
    )
    assert not quantized["fits"]
    assert quantized["rows"][0]["compute"] > 8 * GIB


def test_a_model_larger_than_the_gpu_gets_the_fewest_expert_layers_to_keep_on_the_host(oss120):
    model = oss((0,), parallel=4, ctx_size=32768)
    result = planned([model], oss120, 1, host_memory_mib=256 * 1024)
    assert not result["fits"]
    options = result["suggestions"][0]["options"]
    # No context is small enough: the weights alone are larger than one L40S.
    assert [sorted(o["llamacpp"]) for o in options] == [["n_cpu_moe"]]
    count = options[0]["llamacpp"]["n_cpu_moe"]
    assert 0 < count < 36
    assert planned([apply(model, options[0])], oss120, 1, host_memory_mib=256 * 1024)["fits"]
    assert not planned([apply(model, {"llamacpp": {"n_cpu_moe": count - 1}})], oss120, 1)["fits"]
    assert "host memory for this model" in options[0]["why"]
    # Without the host memory for those experts, it is not offered.
    small = planned([model], oss120, 1, host_memory_mib=16 * 1024)
    assert small["suggestions"][0]["options"] == []
    assert "does not fit with any setting the planner can change" in table(small)


def test_kv_heads_given_per_layer_are_counted_per_layer(oss120):
    big = H200
    base = planned([oss(parallel=1, ctx_size=8192)], oss120, 1, memory=big)["rows"][0]["kv_cache"]
    # Every other layer with no KV heads (as a recurrent layer has none): the full-context layers only.
    per_layer = [0 if il % 2 else 8 for il in range(36)]
    shape = {**oss120, "head_count_kv_per_layer": per_layer}
    only_swa = planned([oss(parallel=1, ctx_size=8192)], shape, 1, memory=big)["rows"][0]["kv_cache"]
    cell = kv_per_cell(oss120)
    assert only_swa == 18 * 768 * cell  # 128 + 512 cells padded to 768, on the 18 even layers
    assert base == only_swa + 18 * 8192 * cell
