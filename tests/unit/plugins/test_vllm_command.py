"""Rendered `vllm serve` command lines, checked against the pinned vLLM's own options."""

from __future__ import annotations

import subprocess

import pytest
from ansible_collections.cortex.serving.plugins.module_utils._engine_command import (
    VLLM_CPU_BOOLEANS,
    VLLM_ENTRYPOINT,
    VLLM_OPTIONS,
    EngineCommandError,
    vllm_command,
)

from .vllm_parser import ParseError, parse, table

LLAMA = {
    "name": "llama-3-8b-instruct",
    "engine": "vllm",
    "source": {"hf_repo": "meta-llama/Meta-Llama-3-8B-Instruct", "revision": "5f0b02c"},
    "gpus": [0],
    "vllm": {"max_model_len": 8192, "gpu_memory_utilization": 0.9},
}


def with_key(args):
    # The entrypoint appends the key from the mounted file.
    return [*args, "--api-key", "k"]


def test_fixture_comes_from_the_pinned_vllm():
    assert table()["vllm_version"] == "0.33.0"
    assert len(table()["options"]) > 200


def test_a_typical_model_renders_and_parses():
    args = vllm_command(LLAMA)
    assert args[:5] == [
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "--revision",
        "5f0b02c",
        "--download-dir",
        "/cache/huggingface",
    ]
    parsed = parse(with_key(args))
    assert parsed.model_tag == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert parsed.served_model_name == ["llama-3-8b-instruct"]
    assert parsed.max_model_len == "8192"
    assert parsed.gpu_memory_utilization == 0.9
    assert parsed.port == 8000
    assert parsed.api_key == ["k"]


def every_option_set(value_for_bools):
    options = {}
    for key, spec in VLLM_OPTIONS.items():
        kind = spec[1]
        choices = spec[2] if len(spec) > 2 else None
        options[key] = {
            "int": choices[-1] if choices else 2,
            "float": 0.5,
            "str": choices[-1] if choices else "x",
            "flag": True,
            "negatable": value_for_bools,
        }[kind]
    options["tensor_parallel_size"] = 2
    options["pipeline_parallel_size"] = 1
    options["runner"] = "generate"  # pooling refuses prefix caching, which this turns on
    return options


@pytest.mark.parametrize("value_for_bools", [True, False])
def test_every_option_the_collection_renders_is_a_vllm_option(value_for_bools):
    model = {
        **LLAMA,
        "gpus": [0, 1],
        "vllm": {**every_option_set(value_for_bools), "extra_args": ["--disable-log-stats"]},
    }
    parsed = parse(with_key(vllm_command(model)))
    assert parsed.tensor_parallel_size == 2
    assert parsed.enable_prefix_caching is True  # either form sets the dest
    assert parsed.disable_log_stats is True


def test_every_choice_list_is_a_subset_of_vllms():
    by_flag = {flag: o for o in table()["options"] for flag in o["flags"]}
    for key, spec in VLLM_OPTIONS.items():
        assert spec[0] in by_flag, key
        if len(spec) > 2 and spec[2] and by_flag[spec[0]]["choices"]:
            assert {str(c) for c in spec[2]} <= set(by_flag[spec[0]]["choices"]), key
        if len(spec) > 3:
            assert spec[3] in by_flag, spec[3]


def test_the_parser_rejects_what_vllm_rejects():
    with pytest.raises(ParseError):
        parse(["m", "--no-such-flag", "1"])
    with pytest.raises(ParseError):
        parse(["m", "--max-num-seqs", "lots"])
    with pytest.raises(ParseError):
        parse(["m", "--kv-cache-dtype", "int3"])


def test_a_local_directory_is_mounted_at_models():
    args = vllm_command({**LLAMA, "source": {"path": "/srv/models/llama3"}})
    assert args[0] == "/models"
    parse(with_key(args))


def test_a_shared_gpu_gives_vllm_its_fraction():
    args = vllm_command({**LLAMA, "gpu_memory_fraction": 0.45, "vllm": {}})
    assert parse(with_key(args)).gpu_memory_utilization == 0.45


def test_the_api_key_never_appears_in_the_arguments():
    assert "--api-key" not in vllm_command(LLAMA)
    assert "--api-key" not in " ".join(VLLM_ENTRYPOINT)


def test_the_entrypoint_exports_the_key_from_its_file_and_execs_vllm_serve(tmp_path):
    # The real entrypoint, run by a real shell, with a `vllm` that reports
    # what it was started with.
    key_file = tmp_path / "engine-api-key"
    key_file.write_text("s3cret-key")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "vllm"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "key=$VLLM_API_KEY" "$@"\n')
    fake.chmod(0o755)
    script = VLLM_ENTRYPOINT[2].replace("/run/secrets/engine-api-key", str(key_file))
    args = vllm_command(LLAMA)
    result = subprocess.run(
        [*VLLM_ENTRYPOINT[:2], script, *VLLM_ENTRYPOINT[3:], *args],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "key=s3cret-key"
    assert lines[1:] == ["serve", *args]


def test_the_entrypoint_fails_without_the_key_file(tmp_path):
    script = VLLM_ENTRYPOINT[2].replace("/run/secrets/engine-api-key", str(tmp_path / "missing"))
    result = subprocess.run(
        [*VLLM_ENTRYPOINT[:2], script, *VLLM_ENTRYPOINT[3:], "m"],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "missing" in result.stderr


def test_a_model_without_gpus_renders_a_cpu_line():
    args = vllm_command(
        {
            "name": "smol",
            "engine": "vllm",
            "source": {"url": "file:///srv/smol.tar", "sha256": "a" * 64},
            "vllm": {"kv_cache_memory_bytes": 1 << 30, "enforce_eager": True, "uvicorn_access_log": False},
        }
    )
    # The CPU image's vLLM (0.32.0) parses CPU lines: tests/integration/test_vllm_engine.py.
    assert args[:1] == ["/models"]
    assert args[args.index("--kv-cache-memory-bytes") + 1] == str(1 << 30)
    assert "--enforce-eager" in args
    assert "--disable-uvicorn-access-log" in args
    assert "--gpu-memory-utilization" not in args


@pytest.mark.parametrize("key", sorted(VLLM_CPU_BOOLEANS))
def test_cpu_lines_spell_booleans_as_the_cpu_vllm_does(key):
    model = {"name": "m", "engine": "vllm", "source": {"path": "/m"}}
    true_flag, false_flag = VLLM_CPU_BOOLEANS[key]
    assert true_flag in vllm_command({**model, "vllm": {key: True}})
    assert false_flag in vllm_command({**model, "vllm": {key: False}})
    # GPU lines keep the pinned GPU vLLM's spelling, which its table accepts.
    for value in (True, False):
        parse(with_key(vllm_command({**model, "gpus": [0], "vllm": {key: value}})))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gpus": [], "vllm": {"tensor_parallel_size": 2}}, "a model without GPUs runs in one vLLM process"),
        ({"vllm": {"tensor_parallel_size": 2}}, "2 GPUs, but the model has 1"),
        ({"vllm": {"max_num_seqs": "many"}}, "vllm.max_num_seqs: must be a whole number"),
        ({"vllm": {"kv_cache_dtype": "int3"}}, "vllm.kv_cache_dtype: must be one of"),
        ({"vllm": {"max_modl_len": 4096}}, "vllm.max_modl_len: not a known option"),
        ({"source": {"file": "m.gguf"}}, "source: vLLM loads a model folder from"),
        (
            {"vllm": {"runner": "pooling", "enable_prefix_caching": True}},
            "vllm.enable_prefix_caching: an embedding model .runner pooling. fails to start",
        ),
    ],
)
def test_bad_settings_name_the_model_and_field(change, message):
    with pytest.raises(EngineCommandError, match=message):
        vllm_command({**LLAMA, **change})
