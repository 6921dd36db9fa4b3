# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Engine command lines, rendered from one model entry of ``cortex_models``.

Every option an inventory can set is typed here, and each renders to the
engine's own long flag. The unit tests check every rendered vLLM line against
the option table of the pinned vLLM's parser, and every llama.cpp line against
the ``--help`` of the llama-server this project builds.

Private to the collection: the filter plugins and tests are its only users.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import posixpath

from ansible_collections.cortex.serving.plugins.module_utils._features import (
    VLLM_LORA_RANKS,
    llamacpp_feature_args,
    vllm_feature_args,
)

# Where things are inside the engine containers.
LLAMACPP_PORT = 8080
VLLM_PORT = 8000
MODEL_DIR = "/models"
LLAMACPP_MODEL_DIR = MODEL_DIR
API_KEY_FILE = "/run/secrets/engine-api-key"
LLAMACPP_API_KEY_FILE = API_KEY_FILE
# vLLM reads its key from VLLM_API_KEY (or --api-key). The entrypoint exports
# it from the mounted file and then execs `vllm serve`, so the key is in no
# command line (ps), no container definition (docker inspect) and no log. The
# same entrypoint serves vLLM's own GPU image and the project's CPU image.
VLLM_ENTRYPOINT = [
    "/bin/sh",
    "-c",
    'VLLM_API_KEY="$(cat %s)" && export VLLM_API_KEY && exec vllm serve "$@"' % API_KEY_FILE,
    "vllm-serve",
]
# Where the CPU image expects the vLLM virtualenv when it is not inside it.
VLLM_VENV_DIR = "/opt/vllm"
HF_CACHE_DIR = "/cache/huggingface"
# Per-slot share of a unified KV pool when the inventory does not size it.
UNIFIED_SLOT_TOKENS = 8192

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
SPLIT_MODES = ("none", "layer", "row", "tensor")
POOLING = ("none", "mean", "cls", "last", "rank")
FLASH_ATTN = ("on", "off", "auto")

# option: (flag, kind[, choices[, negative flag]]). kind: int, float, str,
# flag (on when true), onoff (a boolean written as on/off), negatable
# (--x / --no-x, or the given negative flag), list (comma-joined).
LLAMACPP_OPTIONS = {
    "n_gpu_layers": ("--n-gpu-layers", "int"),
    "flash_attn": ("--flash-attn", "onoff", FLASH_ATTN),
    "batch_size": ("--batch-size", "int"),
    "ubatch_size": ("--ubatch-size", "int"),
    "cache_type_k": ("--cache-type-k", "str", CACHE_TYPES),
    "cache_type_v": ("--cache-type-v", "str", CACHE_TYPES),
    "tensor_split": ("--tensor-split", "list"),
    "split_mode": ("--split-mode", "str", SPLIT_MODES),
    "main_gpu": ("--main-gpu", "int"),
    "cache_ram": ("--cache-ram", "int"),
    # Prompt reuse: the least chunk of a cached prompt shifted into place
    # instead of computed again (0: off), and how similar a slot's last prompt
    # must be to a request's for the request to take that slot.
    "cache_reuse": ("--cache-reuse", "int"),
    "slot_prompt_similarity": ("--slot-prompt-similarity", "float"),
    # Mixture of experts: keep the experts of the first N layers (or of all)
    # in host memory, where they are run by the CPU.
    "n_cpu_moe": ("--n-cpu-moe", "int"),
    "cpu_moe": ("--cpu-moe", "flag"),
    # Copy host-memory weights to the GPU for large batches (llama.cpp's default).
    "op_offload": ("--op-offload", "negatable"),
    # Sliding-window layers keep the whole context instead of the window.
    "swa_full": ("--swa-full", "flag"),
    "threads": ("--threads", "int"),
    "threads_batch": ("--threads-batch", "int"),
    "cont_batching": ("--cont-batching", "negatable"),
    "kv_unified": ("--kv-unified", "negatable"),
    "embeddings": ("--embeddings", "flag"),
    "pooling": ("--pooling", "str", POOLING),
    "reranking": ("--reranking", "flag"),
    "jinja": ("--jinja", "negatable"),
    "chat_template": ("--chat-template", "str"),
    "load_mode": ("--load-mode", "str", ("auto", "none", "mmap", "mlock", "mmap+mlock", "dio")),
    "metrics": ("--metrics", "flag"),
    "seed": ("--seed", "int"),
}
# Handled by llamacpp_command itself rather than the table.
LLAMACPP_OWN = ("ctx_size", "ctx_per_slot", "parallel", "extra_args")

VLLM_OPTIONS = {
    "gpu_memory_utilization": ("--gpu-memory-utilization", "float"),
    "max_model_len": ("--max-model-len", "int"),
    "tensor_parallel_size": ("--tensor-parallel-size", "int"),
    "pipeline_parallel_size": ("--pipeline-parallel-size", "int"),
    "kv_cache_dtype": (
        "--kv-cache-dtype",
        "str",
        ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"),
    ),
    "enable_prefix_caching": ("--enable-prefix-caching", "negatable", None, "--disable-prefix-caching"),
    "enable_chunked_prefill": ("--enable-chunked-prefill", "negatable", None, "--disable-chunked-prefill"),
    "max_num_seqs": ("--max-num-seqs", "int"),
    # "priority": each request's `priority` field orders vLLM's queue and
    # its preemptions (the gateway sets it from the client key's class).
    "scheduling_policy": ("--scheduling-policy", "str", ("fcfs", "priority")),
    "max_num_batched_tokens": ("--max-num-batched-tokens", "int"),
    "dtype": ("--dtype", "str", ("auto", "half", "float16", "bfloat16", "float", "float32")),
    "quantization": ("--quantization", "str"),
    "enforce_eager": ("--enforce-eager", "flag"),
    "trust_remote_code": ("--trust-remote-code", "flag"),
    "seed": ("--seed", "int"),
    "tokenizer": ("--tokenizer", "str"),
    "generation_config": ("--generation-config", "str"),
    # What the model is run as: "pooling" serves embeddings.
    "runner": ("--runner", "str", ("auto", "generate", "pooling")),
    # The KV cache's size in bytes, instead of a share of the memory: how
    # vLLM on CPU is sized (its --gpu-memory-utilization is a share of RAM).
    "kv_cache_memory_bytes": ("--kv-cache-memory-bytes", "int"),
    # Answers report the prompt tokens taken from the prefix cache
    # (usage.prompt_tokens_details.cached_tokens): the gateway counts them.
    "enable_prompt_tokens_details": (
        "--enable-prompt-tokens-details",
        "negatable",
        None,
        "--disable-prompt-tokens-details",
    ),
    # The largest LoRA rank among the model's adapters (vLLM's default is 16).
    "max_lora_rank": ("--max-lora-rank", "int", VLLM_LORA_RANKS),
    # Each health check would be a log line.
    "uvicorn_access_log": ("--enable-uvicorn-access-log", "negatable", None, "--disable-uvicorn-access-log"),
}
VLLM_OWN = ("extra_args",)
# vllm-cpu 0.32.0 (the CPU image) spells these booleans otherwise than the
# pinned GPU vLLM 0.33.0 does: (flag when true, flag when false). Lines for
# models without GPUs use these; the integration tests parse them with the CPU
# image's own parser, and the unit tests parse the GPU lines with 0.33.0's table.
VLLM_CPU_BOOLEANS = {
    "enable_prefix_caching": ("--enable-prefix-caching", "--no-enable-prefix-caching"),
    "enable_chunked_prefill": ("--enable-chunked-prefill", "--no-enable-chunked-prefill"),
    "enable_prompt_tokens_details": ("--enable-prompt-tokens-details", "--no-enable-prompt-tokens-details"),
    "uvicorn_access_log": ("--no-disable-uvicorn-access-log", "--disable-uvicorn-access-log"),
}


class EngineCommandError(ValueError):
    """A model entry cannot be rendered; the message names the model and field."""


def _render(name, section, options, table, own, booleans=None):
    """Flags for ``options`` by ``table``; ``booleans`` overrides how negatable ones are spelt."""
    args = []
    for key in sorted(options):
        if key in own:
            continue
        if key not in table:
            raise EngineCommandError(
                "model %s: %s.%s: not a known option (known: %s; anything else goes in %s.extra_args)"
                % (name, section, key, ", ".join(sorted(set(table) | set(own))), section)
            )
    for key, spec in table.items():
        if key not in options or options[key] is None:
            continue
        value = options[key]
        flag, kind = spec[0], spec[1]
        choices = spec[2] if len(spec) > 2 else None
        where = "model %s: %s.%s" % (name, section, key)
        if kind in ("int", "float"):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or (kind == "int" and value != int(value))
            ):
                raise EngineCommandError(
                    "%s: must be %s, got %r"
                    % (where, "a whole number" if kind == "int" else "a number", value)
                )
            if choices and value not in choices:
                raise EngineCommandError(
                    "%s: must be one of %s, got %r" % (where, ", ".join(str(c) for c in choices), value)
                )
            args += [flag, str(int(value) if kind == "int" else value)]
        elif kind == "str":
            if choices and str(value) not in choices:
                raise EngineCommandError("%s: must be one of %s, got %r" % (where, ", ".join(choices), value))
            args += [flag, str(value)]
        elif kind == "onoff":
            if isinstance(value, bool):
                value = "on" if value else "off"
            if str(value) not in choices:
                raise EngineCommandError(
                    "%s: must be true, false or one of %s, got %r" % (where, ", ".join(choices), value)
                )
            args += [flag, str(value)]
        elif kind == "flag":
            if not isinstance(value, bool):
                raise EngineCommandError("%s: must be true or false, got %r" % (where, value))
            if value:
                args.append(flag)
        elif kind == "negatable":
            if not isinstance(value, bool):
                raise EngineCommandError("%s: must be true or false, got %r" % (where, value))
            negative = spec[3] if len(spec) > 3 else "--no-" + flag[2:]
            flag, negative = (booleans or {}).get(key, (flag, negative))
            args.append(flag if value else negative)
        elif kind == "list":
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)
            ):
                raise EngineCommandError(
                    "%s: must be a list of non-negative numbers, got %r" % (where, value)
                )
            args += [flag, ",".join(str(v) for v in value)]
    extra = options.get("extra_args") or []
    if not isinstance(extra, list):
        raise EngineCommandError("model %s: %s.extra_args must be a list of strings" % (name, section))
    return args, [str(a) for a in extra]


def _whole(name, where, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EngineCommandError(
            "model %s: %s: must be a whole number of 1 or more, got %r" % (name, where, value)
        )
    return value


def llamacpp_command(model, defaults=None, context_length=None):
    """The llama-server arguments (after the image's entrypoint) for one model.

    ``defaults`` holds the role's llama.cpp defaults; the model's own
    ``llamacpp`` section overrides them key by key. The total context is
    ``ctx_size`` when given, else ``parallel`` slots of ``ctx_per_slot``
    tokens each; without either, each request keeps the model's own trained
    context (``context_length``): a slot each, or a unified pool that holds it.
    """
    name = model.get("name")
    if not name:
        raise EngineCommandError("a model entry has no name")
    options = dict(defaults or {})
    options.update(model.get("llamacpp") or {})
    model_file = model.get("model_file")
    if not model_file:
        raise EngineCommandError("model %s: no model file was resolved from its source" % name)
    parallel = _whole(name, "llamacpp.parallel", options.get("parallel", 1))
    if options.get("ctx_size") is not None:
        ctx_size = _whole(name, "llamacpp.ctx_size", options["ctx_size"])
    elif options.get("ctx_per_slot") is not None:
        ctx_size = parallel * _whole(name, "llamacpp.ctx_per_slot", options["ctx_per_slot"])
    else:
        trained = _whole(name, "context length", context_length or 4096)
        if options.get("kv_unified"):
            # One KV pool shared by the slots: sized for every slot at up to
            # UNIFIED_SLOT_TOKENS, and never below one whole trained context,
            # so any single request can still use the model's full context.
            ctx_size = max(parallel * min(trained, UNIFIED_SLOT_TOKENS), trained)
        else:
            ctx_size = parallel * trained
    gpus = model.get("gpus") or []
    split = options.get("tensor_split")
    if split is not None and isinstance(split, list) and gpus and len(split) != len(gpus):
        raise EngineCommandError(
            "model %s: llamacpp.tensor_split: %d shares for %d GPUs (%s)"
            % (name, len(split), len(gpus), ", ".join(str(g) for g in gpus))
        )
    if not gpus:
        # Without a GPU nothing can be offloaded.
        options["n_gpu_layers"] = 0
    rendered, extra = _render(name, "llamacpp", options, LLAMACPP_OPTIONS, LLAMACPP_OWN)
    if options.get("n_cpu_moe") is not None and options["n_cpu_moe"] < 0:
        # llama-server would refuse it only when the container starts.
        raise EngineCommandError(
            "model %s: llamacpp.n_cpu_moe: must be 0 or more (layers whose experts stay in host memory), got %r"
            % (name, options["n_cpu_moe"])
        )
    args = [
        "--model",
        posixpath.join(MODEL_DIR, model_file),
        "--alias",
        name,
        # Inside the container's own network namespace; the host side is
        # published on loopback (or the internal address) only.
        "--host",
        "0.0.0.0",  # noqa: S104
        "--port",
        str(LLAMACPP_PORT),
        "--api-key-file",
        API_KEY_FILE,
        "--ctx-size",
        str(ctx_size),
        "--parallel",
        str(parallel),
        # Engines sit behind the gateway; nobody browses to them.
        "--no-webui",
    ]
    return args + rendered + llamacpp_feature_args(model, gpus) + extra


def vllm_command(model, defaults=None, nodes=1, listen=None):
    """The ``vllm serve`` arguments for one model (after VLLM_ENTRYPOINT).

    A model without GPUs runs on CPUs, in the CPU image. The API key is not
    among the arguments: the entrypoint exports it from the key file. A model
    that spans ``nodes`` hosts has that many times its GPUs for its ranks,
    and listens on the host's network at ``listen`` (address, port).
    """
    name = model.get("name")
    if not name:
        raise EngineCommandError("a model entry has no name")
    options = dict(defaults or {})
    options.update(model.get("vllm") or {})
    source = model.get("source") or {}
    gpus = model.get("gpus") or []
    tensor = _whole(name, "vllm.tensor_parallel_size", options.get("tensor_parallel_size", 1))
    pipeline = _whole(name, "vllm.pipeline_parallel_size", options.get("pipeline_parallel_size", 1))
    if nodes > 1:
        pass  # the layout is checked against every host's GPUs (_multinode.check_layout)
    elif gpus and tensor * pipeline != len(gpus):
        raise EngineCommandError(
            "model %s: vllm.tensor_parallel_size: %d x pipeline_parallel_size %d = %d GPUs, but the model has %d (%s)"
            % (name, tensor, pipeline, tensor * pipeline, len(gpus), ", ".join(str(g) for g in gpus))
        )
    if not gpus and tensor * pipeline != 1 and nodes == 1:
        raise EngineCommandError(
            "model %s: vllm.tensor_parallel_size: a model without GPUs runs in one vLLM process on CPUs; "
            "give it gpus for tensor or pipeline parallelism" % name
        )
    if options.get("runner") == "pooling" and options.get("enable_prefix_caching"):
        # Seen with all-MiniLM-L6-v2: "HybridKVCacheCoordinator requires at
        # least one cacheable group", and a container that never gets healthy.
        raise EngineCommandError(
            "model %s: vllm.enable_prefix_caching: an embedding model (runner pooling) fails to start "
            "with prefix caching on; leave it out" % name
        )
    if options.get("gpu_memory_utilization") is None and model.get("gpu_memory_fraction") is not None:
        # A shared GPU: vLLM takes exactly the fraction the inventory gave it.
        options["gpu_memory_utilization"] = model["gpu_memory_fraction"]
    if source.get("hf_repo"):
        target = [source["hf_repo"]]
        if source.get("revision"):
            target += ["--revision", str(source["revision"])]
        target += ["--download-dir", HF_CACHE_DIR]
    elif source.get("path") or source.get("wheel") or source.get("url"):
        # The model folder, mounted read-only.
        target = [MODEL_DIR]
    else:
        raise EngineCommandError(
            "model %s: source: vLLM loads a model folder from source.hf_repo, path, wheel or url" % name
        )
    rendered, extra = _render(
        name, "vllm", options, VLLM_OPTIONS, VLLM_OWN, booleans=None if gpus else VLLM_CPU_BOOLEANS
    )
    address, port = listen or ("0.0.0.0", VLLM_PORT)  # noqa: S104 - the container's own network
    served = ["--served-model-name", name, "--host", address, "--port", str(port)]
    return target + served + rendered + vllm_feature_args(model) + extra
