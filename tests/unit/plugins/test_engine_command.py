"""The llama-server command line rendered from a model entry."""

from __future__ import annotations

import pytest
from ansible_collections.cortex.serving.plugins.module_utils._engine_command import (
    EngineCommandError,
    llamacpp_command,
)

SMOLLM = {
    "name": "smollm2-135m-instruct",
    "engine": "llamacpp",
    "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "llamacpp": {"ctx_size": 8192, "parallel": 2},
}


def test_local_default_renders_exactly():
    assert llamacpp_command(SMOLLM, {"ctx_size": 4096, "parallel": 2, "metrics": True}) == [
        "--model", "/models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "--alias", "smollm2-135m-instruct",
        "--host", "0.0.0.0",  # noqa: S104 - inside the container
        "--port", "8080",
        "--api-key-file", "/run/secrets/engine-api-key",
        "--ctx-size", "8192",
        "--parallel", "2",
        "--n-gpu-layers", "0",
        "--no-webui",
        "--metrics",
    ]  # fmt: skip


def test_model_settings_override_defaults_and_extra_args_come_last():
    model = {
        **SMOLLM,
        "llamacpp": {
            "flash_attn": True,
            "threads": 2,
            "embeddings": True,
            "metrics": False,
            "extra_args": ["--seed", 7],
        },
    }
    args = llamacpp_command(model, {"ctx_size": 4096, "parallel": 4})
    assert args[args.index("--ctx-size") + 1] == "4096"
    assert args[args.index("--parallel") + 1] == "4"
    assert args[args.index("--flash-attn") + 1] == "on"
    assert args[args.index("--threads") + 1] == "2"
    assert "--embeddings" in args
    assert "--metrics" not in args
    assert args[-2:] == ["--seed", "7"]


def test_api_key_never_appears_on_the_command_line():
    args = llamacpp_command({**SMOLLM, "api_key": "secret"}, {})
    assert "secret" not in args
    assert "--api-key" not in args


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"engine": "llamacpp", "model_file": "x.gguf"}, "a model entry has no name"),
        ({"name": "m", "engine": "llamacpp"}, "model m: no model file"),
        ({**SMOLLM, "llamacpp": {"extra_args": "--seed 7"}}, "llamacpp.extra_args must be a list"),
    ],
)
def test_bad_entries_name_the_model_and_field(model, message):
    with pytest.raises(EngineCommandError, match=message):
        llamacpp_command(model, {})
