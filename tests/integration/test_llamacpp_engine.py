"""Rendered llama.cpp command lines against the real llama-server this project builds:
every flag the collection can render is in its --help, and a rendered line starts
a real server that answers with the key and refuses without it."""

from __future__ import annotations

import json
import re
import secrets
import time
import urllib.error
import urllib.request

import pytest
from ansible_collections.cortex.serving.plugins.module_utils._engine_command import (
    API_KEY_FILE,
    LLAMACPP_OPTIONS,
    llamacpp_command,
)

from .conftest import docker

FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


@pytest.fixture(scope="module")
def help_flags(llamacpp_image) -> set[str]:
    result = docker("run", "--rm", llamacpp_image, "--help")
    flags = set()
    for line in result.stdout.splitlines():
        # Only the option column: everything before the description.
        if not line.lstrip().startswith("-"):
            continue
        column = re.split(r"\s{2,}", re.sub(r",\s+", ", ", line.strip()), maxsplit=1)[0]
        flags.update(FLAG.findall(column))
    assert "--ctx-size" in flags
    return flags


def test_every_renderable_flag_is_a_llama_server_flag(help_flags):
    missing = []
    for key, spec in LLAMACPP_OPTIONS.items():
        wanted = [spec[0]]
        if spec[1] == "negatable":
            wanted.append(spec[3] if len(spec) > 3 else "--no-" + spec[0][2:])
        missing += [f"{key}: {flag}" for flag in wanted if flag not in help_flags]
    assert not missing


def test_the_fixed_part_of_every_command_is_known(help_flags):
    args = llamacpp_command({"name": "m", "model_file": "m.gguf", "llamacpp": {}})
    assert {a for a in args if a.startswith("--")} <= help_flags


def test_choices_are_llama_servers_choices(llamacpp_image):
    text = docker("run", "--rm", llamacpp_image, "--help").stdout
    for key in ("split_mode", "pooling", "flash_attn", "load_mode"):
        flag, _kind, choices = LLAMACPP_OPTIONS[key]
        at = text.index(flag)
        described = text[at : at + 1200]  # the flag's line and its description below
        for choice in choices:
            assert choice in described, (key, choice)
    cache_types = next(line for line in text.splitlines() if "allowed values" in line)
    for choice in LLAMACPP_OPTIONS["cache_type_k"][2]:
        assert choice in cache_types


def _request(url, key=None, body=None, timeout=30):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310 - loopback only
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_rendered_command_starts_a_real_server(llamacpp_image, smollm2_gguf, tmp_path):
    key = secrets.token_urlsafe(24)
    key_file = tmp_path / "api-key"
    key_file.write_text(key)
    key_file.chmod(0o644)
    model = {
        "name": "smollm2-test",
        "model_file": smollm2_gguf.name,
        "llamacpp": {
            "parallel": 2,
            "ctx_per_slot": 1024,
            "threads": 2,
            "batch_size": 256,
            "ubatch_size": 128,
            "cache_type_k": "q8_0",
            "cache_type_v": "f16",
            "flash_attn": "auto",
            "cache_ram": 0,
            "kv_unified": True,
            "cont_batching": True,
            "jinja": True,
            "load_mode": "mmap",
            "metrics": True,
            "seed": 7,
        },
    }
    args = llamacpp_command(model)
    name = f"cortex-it-{secrets.token_hex(4)}"
    docker(
        "run", "-d", "--name", name, "--user", "10001:10001", "--read-only", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "-p", "127.0.0.1::8080",
        "-v", f"{smollm2_gguf.parent}:/models:ro", "-v", f"{key_file}:{API_KEY_FILE}:ro",
        llamacpp_image, *args,
    )  # fmt: skip
    try:
        port = docker("port", name, "8080/tcp").stdout.strip().rsplit(":", 1)[1]
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline:
            try:
                status, _body = _request(base + "/health", timeout=2)
            except OSError:
                status = None
            if status == 200:
                break
            time.sleep(0.5)
        assert status == 200, docker("logs", name, check=False).stderr[-2000:]
        body = {"model": "smollm2-test", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8}
        status, _body = _request(base + "/v1/chat/completions", body=body)
        assert status == 401
        status, payload = _request(base + "/v1/chat/completions", key=key, body=body)
        assert status == 200
        assert json.loads(payload)["choices"][0]["message"]["content"]
        status, props = _request(base + "/props", key=key)
        assert status == 200
        assert json.loads(props)["default_generation_settings"]["n_ctx"] == 2048
        status, _body = _request(base + "/metrics", key=key)
        assert status == 200
    finally:
        docker("rm", "-f", name, check=False)
