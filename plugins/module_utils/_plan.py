# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The resource planner: GPU memory each engine instance needs, and whether it fits.

For llama.cpp the estimate is built from the GGUF file itself (tensor bytes,
layers, KV heads, head sizes): offloaded weights, the KV cache of the whole
context with grouped-query attention counted, the compute buffer of one
micro-batch, and a fixed per-process CUDA overhead. For vLLM it is built from
the Hugging Face config (parameters from the shapes, bytes from dtype and
quantization) and checked against the memory vLLM will take, its
``--gpu-memory-utilization`` share of each GPU.

Private to the collection: the model_plan module and tests are its only users.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

MIB = 1024 * 1024

# Bytes per element of llama.cpp's KV cache types (block formats included).
KV_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34.0 / 32,
    "q4_0": 18.0 / 32,
    "q4_1": 20.0 / 32,
    "iq4_nl": 18.0 / 32,
    "q5_0": 22.0 / 32,
    "q5_1": 24.0 / 32,
}
# Bytes per parameter of vLLM weights by dtype or quantization method.
WEIGHT_BYTES = {
    "float32": 4.0,
    "float": 4.0,
    "float16": 2.0,
    "half": 2.0,
    "bfloat16": 2.0,
    "auto": 2.0,
    "fp8": 1.0,
    "awq": 0.53,
    "gptq": 0.53,
    "bitsandbytes": 0.56,
    "mxfp4": 0.53,
}
VLLM_KV_BYTES = {"auto": 2.0, "float16": 2.0, "bfloat16": 2.0, "fp8": 1.0, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0}

# Calibrated on an H100 (docs/model-plan.md): CUDA context, cuBLAS workspace
# and llama.cpp's own allocations per process and GPU, outside its buffers.
DEFAULT_OVERHEAD_MIB = {"llamacpp": 512, "vllm": 1536}


class PlanError(ValueError):
    """An instance lacks what its estimate needs; the message names the model."""


def _arg(command, flag, default=None):
    if flag in command:
        index = command.index(flag)
        if index + 1 < len(command):
            return command[index + 1]
    return default


def _shares(count, split):
    if not split:
        return [1.0 / count] * count
    total = float(sum(split))
    return [float(s) / total for s in split]


def llamacpp_estimate(instance, shape, overhead_mib=None):
    """Per-GPU bytes of one llama-server instance: a list of dicts, one per GPU."""
    name = instance["model"]
    for key in ("tensor_bytes", "block_count", "head_count_kv", "key_length", "value_length"):
        if not shape.get(key):
            raise PlanError(
                "model %s: its GGUF metadata has no %s, so its memory cannot be planned" % (name, key)
            )
    command = instance["command"]
    gpus = instance.get("gpus") or []
    n_layer = int(shape["block_count"])
    ctx = int(_arg(command, "--ctx-size", 4096))
    ngl = int(_arg(command, "--n-gpu-layers", n_layer + 1 if gpus else 0))
    ubatch = int(_arg(command, "--ubatch-size", 512))
    type_k = _arg(command, "--cache-type-k", "f16")
    type_v = _arg(command, "--cache-type-v", "f16")
    split_mode = _arg(command, "--split-mode", "layer")
    main_gpu = int(_arg(command, "--main-gpu", 0))
    split = _arg(command, "--tensor-split")
    split = [float(s) for s in split.split(",")] if split else None

    embd = int(shape.get("token_embd_bytes") or 0)
    output = int(shape.get("output_bytes") or embd)
    tied = bool(shape.get("tied_output"))
    # Everything but the input embedding (kept in host memory) and the output
    # matrix is repeated per layer.
    repeating = int(shape["tensor_bytes"]) - embd - (0 if tied else output)
    layers_on_gpu = min(ngl, n_layer)
    weights = repeating * float(layers_on_gpu) / n_layer + (output if ngl > n_layer else 0)
    kv_per_token_layer = int(shape["head_count_kv"]) * (
        int(shape["key_length"]) * KV_BYTES.get(type_k, 2.0)
        + int(shape["value_length"]) * KV_BYTES.get(type_v, 2.0)
    )
    kv = ctx * layers_on_gpu * kv_per_token_layer
    # One micro-batch of activations and, with the output layer on the GPU,
    # its logits over the whole vocabulary.
    vocab = int(shape.get("vocab_size") or 0)
    embedding = int(shape.get("embedding_length") or 0)
    compute = ubatch * (embedding * 4 * 4 + (vocab * 4 if ngl > n_layer else 0))
    overhead = (overhead_mib if overhead_mib is not None else DEFAULT_OVERHEAD_MIB["llamacpp"]) * MIB

    if not gpus or layers_on_gpu == 0:
        return []
    rows = []
    shares = _shares(len(gpus), split)
    for position, gpu in enumerate(gpus):
        share = shares[position]
        if split_mode == "row":
            # Matrices are split by rows; KV and activations stay on the main GPU.
            own_kv = kv if position == main_gpu else 0
            own_compute = compute if position == main_gpu else 0
            own_weights = weights * share
        elif split_mode == "none":
            own_weights = weights if position == main_gpu else 0
            own_kv = kv if position == main_gpu else 0
            own_compute = compute if position == main_gpu else 0
        else:
            own_weights = repeating * float(layers_on_gpu) / n_layer * share
            # The output layer lives with the last layers.
            if ngl > n_layer and position == len(gpus) - 1:
                own_weights += output
            own_kv = kv * share
            own_compute = compute
        rows.append(
            {
                "gpu": gpu,
                "weights": int(own_weights),
                "kv_cache": int(own_kv),
                "compute": int(own_compute),
                "overhead": int(overhead),
            }
        )
    return rows


def hf_parameter_count(config):
    """Parameters of a decoder-only transformer from its Hugging Face config."""
    text = config.get("text_config") or config
    try:
        hidden = int(text["hidden_size"])
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        vocab = int(text["vocab_size"])
        intermediate = int(text.get("intermediate_size") or 4 * hidden)
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError("the Hugging Face config lacks %s" % exc) from exc
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    experts = int(text.get("num_local_experts") or text.get("num_experts") or 1)
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * intermediate * experts
    embeddings = vocab * hidden * (1 if text.get("tie_word_embeddings") else 2)
    return embeddings + layers * (attention + mlp + 2 * hidden)


def vllm_estimate(instance, shape, gpu_memory_bytes, overhead_mib=None):
    """Per-GPU bytes one vLLM instance needs at least, and what it will take."""
    name = instance["model"]
    config = shape.get("hf_config") or {}
    command = instance["command"]
    gpus = instance.get("gpus") or []
    tp = int(_arg(command, "--tensor-parallel-size", 1))
    pp = int(_arg(command, "--pipeline-parallel-size", 1))
    if shape.get("parameter_count"):
        params = float(shape["parameter_count"])
    elif config:
        params = float(hf_parameter_count(config))
    else:
        raise PlanError(
            "model %s: give plan.hf_config (its config.json) or plan.parameter_count so its memory can be planned"
            % name
        )
    method = (
        _arg(command, "--quantization") or _arg(command, "--dtype") or config.get("torch_dtype") or "auto"
    )
    weights = params * WEIGHT_BYTES.get(str(method), 2.0) / (tp * pp)
    text = config.get("text_config") or config
    utilization = float(_arg(command, "--gpu-memory-utilization", 0.9))
    kv_min = 0
    if text.get("num_hidden_layers"):
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
        max_len = int(str(_arg(command, "--max-model-len", text.get("max_position_embeddings") or 4096)))
        kv_bytes = VLLM_KV_BYTES.get(_arg(command, "--kv-cache-dtype", "auto"), 2.0)
        # vLLM refuses to start unless one whole max-length sequence fits.
        kv_min = max_len * int(text["num_hidden_layers"]) * 2 * kv_heads * head_dim * kv_bytes / (tp * pp)
    overhead = (overhead_mib if overhead_mib is not None else DEFAULT_OVERHEAD_MIB["vllm"]) * MIB
    return [
        {
            "gpu": gpu,
            "weights": int(weights),
            "kv_cache": int(kv_min),
            "compute": 0,
            "overhead": int(overhead),
            "reserved": int(utilization * gpu_memory_bytes.get(gpu, 0)),
        }
        for gpu in gpus
    ]


def plan(instances, shapes, gpus, overhead_mib=None, headroom_mib=512):
    """Memory per instance and GPU, and whether each GPU holds its instances.

    ``gpus`` is gpu_facts' list (index, memory_total_mib). Returns
    ``{"rows": [...], "gpus": [...], "fits": bool, "unknown": [names]}``.
    """
    overhead_mib = overhead_mib or {}
    totals = dict((int(g["index"]), int(g["memory_total_mib"]) * MIB) for g in gpus or [])
    rows = []
    unknown = []
    for instance in instances:
        if instance.get("state", "started") != "started" or not instance.get("gpus"):
            continue
        shape = (shapes or {}).get(instance["model"])
        if not shape:
            unknown.append(instance["model"])
            continue
        if instance["engine"] == "llamacpp":
            per_gpu = llamacpp_estimate(instance, shape, overhead_mib.get("llamacpp"))
        else:
            per_gpu = vllm_estimate(instance, shape, totals, overhead_mib.get("vllm"))
        fraction = instance.get("gpu_memory_fraction")
        for row in per_gpu:
            need = row["weights"] + row["kv_cache"] + row["compute"] + row["overhead"]
            total = totals.get(row["gpu"], 0)
            allowed = int(total * fraction) if fraction else total
            if instance["engine"] == "vllm":
                allowed = row["reserved"]
            rows.append(
                dict(
                    row,
                    model=instance["model"],
                    replica=instance.get("replica", 0),
                    engine=instance["engine"],
                    need=int(need),
                    # What the instance holds on the GPU: vLLM takes its whole share.
                    holds=int(row.get("reserved") or need),
                    allowed=allowed,
                    fits=need <= allowed,
                )
            )
    summary = []
    for index in sorted(set(list(totals) + [r["gpu"] for r in rows])):
        held = sum(r["holds"] for r in rows if r["gpu"] == index)
        total = totals.get(index, 0)
        summary.append(
            {
                "gpu": index,
                "total": total,
                "planned": held,
                "free": total - held,
                "fits": index in totals and held + headroom_mib * MIB <= total,
            }
        )
    fits = all(r["fits"] for r in rows) and all(g["fits"] for g in summary)
    return {"rows": rows, "gpus": summary, "fits": fits, "unknown": sorted(set(unknown))}


def _mib(value):
    return "%d" % (value // MIB)


def table(result, host="host"):
    """The plan as a fixed-width text table (MiB), for play output and failures."""
    lines = [
        "%-28s %3s %-8s %4s %9s %9s %9s %9s %9s %9s %s"
        % (
            "model",
            "rep",
            "engine",
            "gpu",
            "weights",
            "kv_cache",
            "compute",
            "overhead",
            "need",
            "allowed",
            "fits",
        )
    ]
    for r in result["rows"]:
        lines.append(
            "%-28s %3d %-8s %4d %9s %9s %9s %9s %9s %9s %s"
            % (
                r["model"][:28],
                r["replica"],
                r["engine"],
                r["gpu"],
                _mib(r["weights"]),
                _mib(r["kv_cache"]),
                _mib(r["compute"]),
                _mib(r["overhead"]),
                _mib(r["need"]),
                _mib(r["allowed"]),
                "yes" if r["fits"] else "NO",
            )
        )
    for g in result["gpus"]:
        lines.append(
            "%s GPU %d: %s MiB planned of %s MiB (%s MiB free)%s"
            % (
                host,
                g["gpu"],
                _mib(g["planned"]),
                _mib(g["total"]),
                _mib(g["free"]),
                "" if g["fits"] else "  <- does not fit",
            )
        )
    for name in result["unknown"]:
        lines.append("%s: %s has no known shape; not planned" % (host, name))
    return "\n".join(lines)
