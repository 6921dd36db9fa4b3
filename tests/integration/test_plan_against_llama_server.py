"""model_plan's KV cache and expert placement against the real llama-server's own account.

llama-server logs the size of the KV cache of its full-context and
sliding-window layers (at log verbosity 4) and, with every debug line, each
tensor it keeps in host memory. Small real-format gpt-oss and Gemma 3 files
(every tensor and key of the real architectures, tests/gguf_shapes.py) are
served on CPU with the command lines the role renders, and the planner's
bytes must be llama-server's, to the rounding of its log.
"""

from __future__ import annotations

import re
import secrets
import time

import gguf
import pytest
from ansible_collections.cortex.serving.plugins.module_utils._engine_command import llamacpp_command
from ansible_collections.cortex.serving.plugins.module_utils._gguf_info import read_gguf_info
from ansible_collections.cortex.serving.plugins.module_utils._plan import MIB, llamacpp_memory

from tests.gguf_shapes import write_gguf

from .conftest import docker

KV = re.compile(r"llama_kv_cache: size =\s+([\d.]+) MiB \(\s*(\d+) cells,\s+(\d+) layers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    folder.chmod(0o755)
    for name in ("gpt-oss-tiny", "gemma3-tiny"):
        write_gguf(folder / f"{name}.gguf", name, "MXFP4" if name.startswith("gpt-oss") else "F16")
        (folder / f"{name}.gguf").chmod(0o644)
    return folder


def served(image, folder, name, options, verbosity=("--log-verbosity", "4")):
    """Start llama-server with the rendered line; return its log once it has built its caches."""
    args = llamacpp_command({"name": name, "model_file": f"{name}.gguf", "llamacpp": options})
    key = args.index("--api-key-file")
    del args[key : key + 2]
    container = f"cortex-plan-{secrets.token_hex(4)}"
    docker(
        "run", "-d", "--name", container, "--user", "10001:10001", "--read-only", "--cap-drop", "ALL",
        "-v", f"{folder}:/models:ro", image, *args, *verbosity,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            logs = docker("logs", container, check=False)
            text = logs.stdout + logs.stderr
            if "server is listening" in text or "all slots are idle" in text:
                return text, args
            if "exiting due to" in text:
                break
            time.sleep(0.5)
        pytest.fail(f"llama-server did not start: {text[-2000:]}")
    finally:
        docker("rm", "-f", container, check=False)


CASES = [
    # (model, llamacpp options): the role's CPU line, a unified pool, one slot, --swa-full.
    ("gpt-oss-tiny", {"parallel": 4, "ctx_size": 8192}),
    ("gpt-oss-tiny", {"parallel": 4, "ctx_size": 8192, "kv_unified": True}),
    ("gpt-oss-tiny", {"parallel": 1, "ctx_size": 4096, "ubatch_size": 128}),
    ("gpt-oss-tiny", {"parallel": 2, "ctx_size": 4096, "swa_full": True}),
    ("gemma3-tiny", {"parallel": 2, "ctx_size": 4096}),
    ("gemma3-tiny", {"parallel": 8, "ctx_size": 16384, "kv_unified": True, "cache_type_k": "q8_0"}),
]


@pytest.mark.parametrize(("name", "options"), CASES)
def test_the_planned_kv_cache_is_llama_servers(llamacpp_image, models, name, options):
    text, args = served(llamacpp_image, models, name, {"threads": 2, **options})
    caches = [(float(mib), int(cells), int(layers)) for mib, cells, layers in KV.findall(text)]
    assert caches, text[-3000:]
    shape = read_gguf_info(str(models / f"{name}.gguf"), gguf)
    # The same command, as if every layer were on a GPU: the KV cache is the same bytes.
    command = list(args)
    command[command.index("--n-gpu-layers") + 1] = "999"
    planned = llamacpp_memory({"model": name, "command": command, "gpus": [0]}, shape)["gpus"][0]["kv_cache"]
    assert planned / MIB == pytest.approx(sum(c[0] for c in caches), abs=0.01 * len(caches))
    # And the sliding-window cache has the cells the planner gives it.
    if shape["swa_layers"] and not options.get("swa_full"):
        full, swa = caches
        assert swa[2] == len(shape["swa_layers"])
        assert full[2] == shape["block_count"] - len(shape["swa_layers"])
        assert swa[1] < full[1]


OVERRIDDEN = re.compile(r"tensor (\S+) \(\d+ MiB \w+\) buffer type overridden to CPU")


@pytest.mark.parametrize("options", [{"n_cpu_moe": 2}, {"cpu_moe": True}])
def test_the_experts_planned_on_the_host_are_those_llama_server_keeps_there(llamacpp_image, models, options):
    # Every debug line (-v): llama-server names each tensor it keeps in host memory.
    text, args = served(
        llamacpp_image, models, "gpt-oss-tiny", {"parallel": 1, "ctx_size": 4096, **options}, ("-v",)
    )
    kept = set(OVERRIDDEN.findall(text))
    layers = options.get("n_cpu_moe", 4)
    reader = gguf.GGUFReader(str(models / "gpt-oss-tiny.gguf"))
    experts = {t.name: int(t.n_bytes) for t in reader.tensors if "_exps." in t.name}
    expected = {n for n in experts if int(n.split(".")[1]) < layers}
    assert kept == expected
    assert len(kept) == 6 * layers  # gate, up, down: weights and biases
    shape = read_gguf_info(str(models / "gpt-oss-tiny.gguf"), gguf)
    command = list(args)
    command[command.index("--n-gpu-layers") + 1] = "999"
    host = llamacpp_memory({"model": "m", "command": command, "gpus": [0]}, shape)["host"]
    assert host == shape["token_embd_bytes"] + sum(experts[n] for n in kept)
