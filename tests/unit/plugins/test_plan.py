"""The resource planner: per-GPU memory of engine instances."""

from __future__ import annotations

import pytest
from ansible_collections.cortex.serving.plugins.module_utils._models import host_instances
from ansible_collections.cortex.serving.plugins.module_utils._plan import (
    MIB,
    PlanError,
    hf_parameter_count,
    plan,
    table,
)

# Llama-3-8B's shape, as gguf_info reads it from a Q8_0 file.
LLAMA3_8B_Q8 = {
    "tensor_bytes": 8_540_000_000,
    "token_embd_bytes": 558_000_000,
    "output_bytes": 558_000_000,
    "tied_output": False,
    "block_count": 32,
    "head_count": 32,
    "head_count_kv": 8,
    "key_length": 128,
    "value_length": 128,
    "embedding_length": 4096,
    "vocab_size": 128256,
    "context_length": 8192,
}
LLAMA3_8B_CONFIG = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}
H100 = [{"index": 0, "memory_total_mib": 81559}, {"index": 1, "memory_total_mib": 81559}]


def instances(models, gpu_count=2):
    return host_instances(models, "gpu-a", gpu_count)["instances"]


def llama(**llamacpp):
    return {
        "name": "llama",
        "engine": "llamacpp",
        "source": {"path": "/m/llama.gguf"},
        "gpus": llamacpp.pop("gpus", [0]),
        "llamacpp": {"n_gpu_layers": 999, "parallel": 16, "ctx_size": 65536, **llamacpp},
    }


def test_kv_cache_counts_grouped_query_attention():
    row = plan(instances([llama()]), {"llama": LLAMA3_8B_Q8}, H100)["rows"][0]
    # 65536 tokens x 32 layers x 8 KV heads x (128 + 128) x 2 bytes: 8 GiB, not the 32 of full attention.
    assert row["kv_cache"] == 65536 * 32 * 8 * 256 * 2
    assert row["weights"] == 8_540_000_000 - 558_000_000
    assert row["fits"]


def test_quantized_kv_cache_is_smaller():
    f16 = plan(instances([llama()]), {"llama": LLAMA3_8B_Q8}, H100)["rows"][0]["kv_cache"]
    q8 = plan(instances([llama(cache_type_k="q8_0", cache_type_v="q8_0")]), {"llama": LLAMA3_8B_Q8}, H100)[
        "rows"
    ][0]
    assert q8["kv_cache"] == pytest.approx(f16 * 34 / 64)


def test_partial_offload_keeps_the_rest_in_host_memory():
    full = plan(instances([llama()]), {"llama": LLAMA3_8B_Q8}, H100)["rows"][0]
    half = plan(instances([llama(n_gpu_layers=16)]), {"llama": LLAMA3_8B_Q8}, H100)
    # As llama.cpp counts them, the output is one of the 16 layers: 15 of the
    # 32 repeating layers and the output go to the GPU.
    assert half["rows"][0]["kv_cache"] == full["kv_cache"] // 32 * 15
    per_layer = (8_540_000_000 - 2 * 558_000_000) / 32
    assert half["rows"][0]["weights"] == int(15 * per_layer + 558_000_000)
    # The other 17 layers and the input embedding stay in host memory.
    host = 558_000_000 + 17 * per_layer + full["kv_cache"] // 32 * 17
    assert half["host"][0]["bytes"] == pytest.approx(host, abs=1)


def test_layer_split_shares_weights_and_kv_row_split_keeps_kv_on_the_main_gpu():
    layer = plan(
        instances([llama(gpus=[0, 1], tensor_split=[1, 1], split_mode="layer")]),
        {"llama": LLAMA3_8B_Q8},
        H100,
    )
    row = plan(
        instances([llama(gpus=[0, 1], tensor_split=[1, 1], split_mode="row")]), {"llama": LLAMA3_8B_Q8}, H100
    )
    # llama.cpp's placement: of the 33 layers (the output counted), the first
    # 17 go to GPU 0 (layer il goes where il / 33 falls in the cumulative split).
    assert [r["kv_cache"] for r in layer["rows"]] == [8 * 2**30 // 32 * 17, 8 * 2**30 // 32 * 15]
    assert [r["kv_cache"] for r in row["rows"]] == [8 * 2**30, 0]
    assert (
        layer["rows"][1]["weights"] > layer["rows"][0]["weights"]
    )  # the output layer sits with the last layers


def test_too_big_fails_with_a_table():
    result = plan(instances([llama(ctx_size=16 * 65536)]), {"llama": LLAMA3_8B_Q8}, H100)
    assert not result["fits"]
    text = table(result, "gpu-a")
    assert "NO" in text
    assert "does not fit" in text
    assert "llama" in text


def test_sharing_a_gpu_adds_up():
    models = [
        {**llama(ctx_size=8192), "gpu_memory_fraction": 0.5},
        {**llama(ctx_size=8192), "name": "other", "gpu_memory_fraction": 0.5},
    ]
    result = plan(instances(models), {"llama": LLAMA3_8B_Q8, "other": LLAMA3_8B_Q8}, H100)
    assert result["fits"]
    assert result["gpus"][0]["planned"] == sum(r["need"] for r in result["rows"])
    small = [{**H100[0], "memory_total_mib": 16000}]
    assert not plan(instances(models, 1), {"llama": LLAMA3_8B_Q8, "other": LLAMA3_8B_Q8}, small)["fits"]


def test_hf_parameter_count_of_llama3_8b():
    assert hf_parameter_count(LLAMA3_8B_CONFIG) == pytest.approx(8.03e9, rel=0.01)


def test_vllm_takes_its_share_and_needs_weights_plus_one_sequence():
    model = {
        "name": "v",
        "engine": "vllm",
        "source": {"hf_repo": "meta-llama/Meta-Llama-3-8B-Instruct"},
        "gpus": [0],
        "vllm": {"gpu_memory_utilization": 0.3, "max_model_len": 8192},
    }
    result = plan(instances([model]), {"v": {"hf_config": LLAMA3_8B_CONFIG}}, H100)
    row = result["rows"][0]
    assert row["weights"] == pytest.approx(8.03e9 * 2, rel=0.01)
    assert row["kv_cache"] == 8192 * 32 * 2 * 8 * 128 * 2
    assert row["holds"] == int(0.3 * 81559 * MIB)
    assert row["fits"]
    model["vllm"]["gpu_memory_utilization"] = 0.2
    assert not plan(instances([model]), {"v": {"hf_config": LLAMA3_8B_CONFIG}}, H100)["fits"]


def test_models_without_a_shape_are_named_not_guessed():
    result = plan(instances([llama()]), {}, H100)
    assert result["unknown"] == ["llama"]
    assert result["rows"] == []


def test_a_shape_without_attention_metadata_is_an_error():
    with pytest.raises(PlanError, match="model llama: its GGUF metadata has no head_count_kv"):
        plan(instances([llama()]), {"llama": {**LLAMA3_8B_Q8, "head_count_kv": None}}, H100)


def test_cpu_models_are_not_planned_on_gpus():
    cpu = {**llama(), "gpus": []}
    assert plan(instances([cpu]), {"llama": LLAMA3_8B_Q8}, H100)["rows"] == []


# Llama-3-70B's shape (Q8_0), as the two-GPU run of issue 9 would serve it.
LLAMA3_70B_Q8 = {
    **LLAMA3_8B_Q8,
    "tensor_bytes": 74_970_000_000,
    "token_embd_bytes": 1_116_000_000,
    "output_bytes": 1_116_000_000,
    "block_count": 80,
    "head_count": 64,
    "embedding_length": 8192,
}
H200X2 = [{"index": 0, "memory_total_mib": 143771}, {"index": 1, "memory_total_mib": 143771}]


def test_a_70b_model_split_over_two_gpus_by_layer_and_by_row():
    shapes = {"llama": LLAMA3_70B_Q8}
    layer = plan(
        instances([llama(gpus=[0, 1], tensor_split=[1, 1], split_mode="layer", ctx_size=65536)]),
        shapes,
        H200X2,
    )
    row = plan(
        instances([llama(gpus=[0, 1], tensor_split=[1, 1], split_mode="row", ctx_size=65536)]), shapes, H200X2
    )
    kv = 65536 * 80 * 8 * 256 * 2  # 20 GiB with 8 KV heads
    # Of 81 layers (the output counted), GPU 0 takes layers 0-40, GPU 1 41-79 and the output.
    assert [r["kv_cache"] for r in layer["rows"]] == [kv // 80 * 41, kv // 80 * 39]
    assert [r["kv_cache"] for r in row["rows"]] == [kv, 0]
    repeating = 74_970_000_000 - 2 * 1_116_000_000
    assert layer["rows"][0]["weights"] == int(repeating / 80 * 41)
    assert layer["rows"][1]["weights"] == int(repeating / 80 * 39 + 1_116_000_000)
    assert layer["fits"]
    assert row["fits"]
    # On one 80 GB GPU it does not fit.
    h100 = [{"index": 0, "memory_total_mib": 81559}]
    assert not plan(instances([llama(gpus=[0], ctx_size=65536)], 1), shapes, h100)["fits"]
