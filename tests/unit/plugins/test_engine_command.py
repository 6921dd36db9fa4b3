"""The llama-server command line rendered from a model entry."""

from __future__ import annotations

import pytest
from ansible_collections.cortex.serving.plugins.module_utils._engine_command import (
    LLAMACPP_OPTIONS,
    EngineCommandError,
    llamacpp_command,
)

SMOLLM = {
    "name": "smollm2-135m-instruct",
    "engine": "llamacpp",
    "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "llamacpp": {"ctx_size": 8192, "parallel": 2},
}


def flag(args, name):
    return args[args.index(name) + 1]


def test_local_default_renders_exactly():
    assert llamacpp_command(SMOLLM, {"parallel": 2, "metrics": True}) == [
        "--model", "/models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "--alias", "smollm2-135m-instruct",
        "--host", "0.0.0.0",  # noqa: S104 - inside the container
        "--port", "8080",
        "--api-key-file", "/run/secrets/engine-api-key",
        "--ctx-size", "8192",
        "--parallel", "2",
        "--no-webui",
        "--n-gpu-layers", "0",
        "--metrics",
    ]  # fmt: skip


def test_each_slot_keeps_the_full_trained_context_unless_told_otherwise():
    model = {**SMOLLM, "llamacpp": {"parallel": 4}}
    assert flag(llamacpp_command(model, context_length=8192), "--ctx-size") == str(4 * 8192)
    model = {**SMOLLM, "llamacpp": {"parallel": 4, "ctx_per_slot": 2048}}
    assert flag(llamacpp_command(model, context_length=8192), "--ctx-size") == str(4 * 2048)


def test_gpu_settings_render_to_llama_server_flags():
    model = {
        **SMOLLM,
        "gpus": [0, 1],
        "llamacpp": {
            "parallel": 16,
            "n_gpu_layers": 999,
            "flash_attn": True,
            "batch_size": 2048,
            "ubatch_size": 512,
            "cache_type_k": "q8_0",
            "cache_type_v": "q8_0",
            "tensor_split": [1, 1],
            "split_mode": "row",
            "cache_ram": 0,
            "cont_batching": False,
        },
    }
    args = llamacpp_command(model, context_length=4096)
    assert flag(args, "--n-gpu-layers") == "999"
    assert flag(args, "--flash-attn") == "on"
    assert flag(args, "--tensor-split") == "1,1"
    assert flag(args, "--split-mode") == "row"
    assert flag(args, "--cache-type-k") == "q8_0"
    assert flag(args, "--cache-ram") == "0"
    assert "--no-cont-batching" in args


def test_without_gpus_nothing_is_offloaded():
    args = llamacpp_command({**SMOLLM, "llamacpp": {"n_gpu_layers": 999}})
    assert flag(args, "--n-gpu-layers") == "0"


def test_extra_args_come_last():
    model = {
        **SMOLLM,
        "llamacpp": {"threads": 2, "embeddings": True, "metrics": False, "extra_args": ["--seed", 7]},
    }
    args = llamacpp_command(model)
    assert "--embeddings" in args
    assert "--metrics" not in args
    assert args[-2:] == ["--seed", "7"]


def test_api_key_never_appears_on_the_command_line():
    args = llamacpp_command({**SMOLLM, "api_key": "secret"}, {})
    assert "secret" not in args
    assert "--api-key" not in args


def test_every_option_has_a_long_flag():
    assert all(spec[0].startswith("--") for spec in LLAMACPP_OPTIONS.values())


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"engine": "llamacpp", "model_file": "x.gguf"}, "a model entry has no name"),
        ({"name": "m", "engine": "llamacpp"}, "model m: no model file"),
        ({**SMOLLM, "llamacpp": {"extra_args": "--seed 7"}}, "llamacpp.extra_args must be a list"),
        ({**SMOLLM, "llamacpp": {"parallel": 0}}, "llamacpp.parallel: must be a whole number of 1 or more"),
        (
            {**SMOLLM, "llamacpp": {"split_mode": "diagonal"}},
            "llamacpp.split_mode: must be one of none, layer, row, tensor",
        ),
        ({**SMOLLM, "llamacpp": {"cache_type_k": "q2"}}, "llamacpp.cache_type_k: must be one of"),
        ({**SMOLLM, "llamacpp": {"flash_attn": "yes"}}, "llamacpp.flash_attn: must be true, false or one of"),
        ({**SMOLLM, "gpus": [0, 1], "llamacpp": {"tensor_split": [1, 1, 1]}}, "3 shares for 2 GPUs"),
        ({**SMOLLM, "llamacpp": {"ctxsize": 1}}, "llamacpp.ctxsize: not a known option"),
        ({**SMOLLM, "llamacpp": {"batch_size": "big"}}, "llamacpp.batch_size: must be a whole number"),
        ({**SMOLLM, "llamacpp": {"n_cpu_moe": -1}}, "llamacpp.n_cpu_moe: must be 0 or more"),
        ({**SMOLLM, "llamacpp": {"n_cpu_moe": 1.5}}, "llamacpp.n_cpu_moe: must be a whole number"),
    ],
)
def test_bad_entries_name_the_model_and_field(model, message):
    with pytest.raises(EngineCommandError, match=message):
        llamacpp_command(model, {})


def test_a_unified_pool_holds_every_slot_and_one_whole_long_context():
    model = {**SMOLLM, "llamacpp": {"parallel": 32, "kv_unified": True}}
    assert flag(llamacpp_command(model, context_length=8192), "--ctx-size") == str(32 * 8192)
    # A 128k model: 32 slots of 8k each, and room for one request of the full 128k.
    assert flag(llamacpp_command(model, context_length=131072), "--ctx-size") == str(max(32 * 8192, 131072))
    model = {**SMOLLM, "llamacpp": {"parallel": 2, "kv_unified": True}}
    assert flag(llamacpp_command(model, context_length=131072), "--ctx-size") == "131072"
