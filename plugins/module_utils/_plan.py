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

# What a process holds on a GPU beside its buffers: the CUDA context, cuBLAS's
# workspace and the kernel images llama.cpp loads as its first requests run.
# Measured on an H100 80GB (NVML against llama-server's own buffers after 32
# streams, docs/models.md): 603 to 706 MiB over Llama-3.2-1B F16, Llama-3-8B
# Q8_0 and gpt-oss-120b MXFP4; the largest, rounded up. vLLM's is its own.
DEFAULT_OVERHEAD_MIB = {"llamacpp": 712, "vllm": 1536}


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


def _flag(command, flag, negative=None, default=False):
    """A boolean flag's value: the last of ``flag`` and ``negative`` given wins."""
    value = default
    for arg in command:
        if arg == flag:
            value = True
        elif negative and arg == negative:
            value = False
    return value


def _pad(value, to=256):
    return -(-int(value) // to) * to


def _layer_devices(n_layer, ngl, count, split):
    """The GPU position (or None: host) of layers 0..n_layer, the last being the output.

    llama.cpp's own placement: the last ``ngl`` of the n_layer + 1 layers go
    to the GPUs, each GPU taking the run of layers its cumulative share of
    ``split`` covers.
    """
    start = max(n_layer + 1 - ngl, 0)
    active = min(ngl, n_layer + 1)
    bounds = []
    total = 0.0
    for share in _shares(count, split):
        total += share
        bounds.append(total)
    devices = []
    for il in range(n_layer + 1):
        if count == 0 or il < start:
            devices.append(None)
            continue
        at = float(il - start) / active
        devices.append(next((i for i, bound in enumerate(bounds) if at < bound), count - 1))
    return devices


def llamacpp_memory(instance, shape, overhead_mib=None):
    """Bytes one llama-server instance needs: per GPU, and in host memory.

    Weights are placed layer by layer as llama.cpp places them; experts of
    the layers ``--n-cpu-moe`` names (all with ``--cpu-moe``) stay in host
    memory. The KV cache of each layer holds the padded context, or on a
    sliding-window layer only the window of each sequence plus one
    micro-batch, unless ``--swa-full``.
    """
    name = instance["model"]
    for key in ("tensor_bytes", "block_count", "head_count_kv", "key_length", "value_length"):
        if not shape.get(key):
            raise PlanError(
                "model %s: its GGUF metadata has no %s, so its memory cannot be planned" % (name, key)
            )
    command = instance["command"]
    gpus = instance.get("gpus") or []
    n_layer = int(shape["block_count"])
    ctx = _pad(int(_arg(command, "--ctx-size", 4096)))
    parallel = max(1, int(_arg(command, "--parallel", 1)))
    unified = _flag(command, "--kv-unified", "--no-kv-unified")
    ngl = int(_arg(command, "--n-gpu-layers", n_layer + 1 if gpus else 0))
    ubatch = int(_arg(command, "--ubatch-size", 512))
    type_k = _arg(command, "--cache-type-k", "f16")
    type_v = _arg(command, "--cache-type-v", "f16")
    split_mode = _arg(command, "--split-mode", "layer")
    main_gpu = int(_arg(command, "--main-gpu", 0))
    split = _arg(command, "--tensor-split")
    split = [float(s) for s in split.split(",")] if split else None
    if "--cpu-moe" in command:
        host_expert_layers = n_layer
    else:
        host_expert_layers = min(int(_arg(command, "--n-cpu-moe", 0)), n_layer)

    embd = int(shape.get("token_embd_bytes") or 0)
    output = int(shape.get("output_bytes") or embd)
    tied = bool(shape.get("tied_output"))
    # Everything but the input embedding (kept in host memory) and the output
    # matrix is repeated per layer: per layer as the file has it, or evenly.
    repeating = int(shape["tensor_bytes"]) - embd - (0 if tied else output)
    layer_bytes = [int(b) for b in shape.get("layer_bytes") or []]
    if len(layer_bytes) != n_layer:
        layer_bytes = [repeating / float(n_layer)] * n_layer
    # What is in no layer (the output norm) goes with the output layer.
    rest = max(repeating - sum(layer_bytes), 0)
    experts = [int(b) for b in shape.get("layer_expert_bytes") or []]
    if len(experts) != n_layer:
        experts = [0] * n_layer

    # KV cells: llama.cpp pads the context to 256; without a unified pool each
    # of the parallel sequences has its own stream of ctx / parallel cells.
    streams = 1 if unified else parallel
    cells_per_stream = ctx if unified else _pad(ctx // parallel)
    full_cells = cells_per_stream * streams
    window = int(shape.get("sliding_window") or 0)
    swa = set(shape.get("swa_layers") or []) if window else set()
    if swa and not _flag(command, "--swa-full"):
        swa_cells = _pad(min(cells_per_stream, window * (parallel if unified else 1) + ubatch)) * streams
    else:
        swa_cells = full_cells
    kv_heads = shape.get("head_count_kv_per_layer") or []
    if len(kv_heads) < n_layer:
        kv_heads = [int(shape["head_count_kv"])] * n_layer
    bytes_k, bytes_v = KV_BYTES.get(type_k, 2.0), KV_BYTES.get(type_v, 2.0)

    def kv_of(il):
        k_len, v_len = _head_lengths(shape, il in swa)
        cells = swa_cells if il in swa else full_cells
        return cells * int(kv_heads[il]) * (k_len * bytes_k + v_len * bytes_v)

    compute_parts = _compute_buffer(
        shape, command, ubatch, streams, cells_per_stream, swa_cells // streams if swa else 0, kv_heads, swa,
        experts[:host_expert_layers]
        if host_expert_layers and _flag(command, "--op-offload", "--no-op-offload", default=True)
        else [],
    )  # fmt: skip
    overhead = (overhead_mib if overhead_mib is not None else DEFAULT_OVERHEAD_MIB["llamacpp"]) * MIB

    devices = _layer_devices(n_layer, ngl, len(gpus), split)
    host = embd
    per_gpu = [{"weights": 0.0, "kv_cache": 0.0, "compute": 0.0} for _gpu in gpus]
    shares = _shares(len(gpus), split) if gpus else []
    on_gpu = any(d is not None for d in devices)
    for il in range(n_layer + 1):
        is_output = il == n_layer
        # A tied output matrix is a copy of the embedding on the output's GPU.
        weights = output + rest if is_output else layer_bytes[il]
        host_part = 0 if is_output or il >= host_expert_layers else experts[il]
        kv = 0 if is_output else kv_of(il)
        if devices[il] is None:
            host += weights + kv
            continue
        host += host_part
        weights -= host_part
        if split_mode in ("row", "none"):
            # Row split shares the matrices and keeps KV and activations on
            # the main GPU; no split keeps everything there.
            for position in range(len(gpus)):
                share = shares[position] if split_mode == "row" else float(position == main_gpu)
                per_gpu[position]["weights"] += weights * share
                per_gpu[position]["kv_cache"] += kv if position == main_gpu else 0
        elif split_mode == "tensor":
            # Every matrix and the KV heads are shared by all the GPUs.
            for position in range(len(gpus)):
                per_gpu[position]["weights"] += weights * shares[position]
                per_gpu[position]["kv_cache"] += kv * shares[position]
        else:
            per_gpu[devices[il]]["weights"] += weights
            per_gpu[devices[il]]["kv_cache"] += kv
    output_position = devices[n_layer]
    rows = []
    if not gpus or not on_gpu:
        return {"gpus": [], "host": int(host)}
    layers_part, output_part = compute_parts
    for position, gpu in enumerate(gpus):
        # The output layer's GPU holds its logits too (the larger of the two
        # phases: llama.cpp's allocator reuses the layers' memory for them).
        holds_output = output_position is not None and (
            position == main_gpu if split_mode in ("row", "none")
            else split_mode == "tensor" or position == output_position
        )  # fmt: skip
        if split_mode in ("row", "none") and position != main_gpu:
            compute = 0
        else:
            compute = max(layers_part, output_part) if holds_output else layers_part
        rows.append(
            {
                "gpu": gpu,
                "weights": int(per_gpu[position]["weights"]),
                "kv_cache": int(per_gpu[position]["kv_cache"]),
                "compute": int(compute),
                "overhead": int(overhead),
            }
        )
    return {"gpus": rows, "host": int(host)}


def _head_lengths(shape, sliding):
    """The key and value lengths of a layer: a sliding-window layer's own, where the model has them."""
    if sliding:
        return (
            int(shape.get("key_length_swa") or shape["key_length"]),
            int(shape.get("value_length_swa") or shape["value_length"]),
        )
    return int(shape["key_length"]), int(shape["value_length"])


def _compute_buffer(shape, command, ubatch, streams, full_cells, swa_cells, kv_heads, swa, host_experts):
    """The compute buffer llama.cpp reserves on a GPU, as (for the layers, for the output).

    It is what llama.cpp's graph allocator reserves for the worst micro-batch:
    ubatch tokens against every cell of one stream of the cache. Checked
    against llama.cpp's own account with nothing allocated (llama-fit-params
    --fit-print; tests/bench/gpu/run.sh buffers, docs/bench/buffers-*.json) for
    gpt-oss-120b and Llama-3-8B, from 1 to 32 slots, 8k to 1M cells, f16, q8_0
    and q4_0 caches and experts in host memory. Its parts:

    - the attention masks, live through every layer: a row per token over
      the cells of one stream, F16 under flash attention (F32 without), one
      for the full layers and one for the sliding-window layers;
    - one layer at a time, the larger of its attention (the projections and,
      with a quantized cache under flash attention, the layer's K and V over
      every cell of every stream converted to F16) and its feed-forward (a
      dense one, or the experts each token runs and the router over all of them);
    - with experts kept in host memory, the largest expert tensor, copied in
      for large batches (llama.cpp's op offload), beside either;
    - the output layer: the logits over the vocabulary. Its memory is reused
      from the layers', so the buffer is the larger of the two.
    """
    flash = _arg(command, "--flash-attn", "on") != "off"
    type_k = _arg(command, "--cache-type-k", "f16")
    type_v = _arg(command, "--cache-type-v", "f16")
    embedding = int(shape.get("embedding_length") or 0)
    heads = int(shape.get("head_count") or 0)
    vocab = int(shape.get("vocab_size") or 0)
    n_layer = int(shape["block_count"])
    tokens = _pad(ubatch, 64)
    mask_bytes = 2 if flash else 4
    masks = full_cells * tokens * mask_bytes + swa_cells * tokens * mask_bytes

    key_length = int(shape["key_length"])
    attention = ubatch * 4 * (2 * embedding + 2 * heads * key_length + 2 * max(kv_heads) * key_length)
    quantized_k, quantized_v = type_k not in ("f16", "bf16"), type_v not in ("f16", "bf16")
    converted = 0
    if flash and (quantized_k or quantized_v):
        for il in range(n_layer):
            k_len, v_len = _head_lengths(shape, il in swa)
            width = (k_len if quantized_k else 0) + (v_len if quantized_v else 0)
            cells = (swa_cells if il in swa else full_cells) * streams
            converted = max(converted, cells * int(kv_heads[il]) * width * 2)
    experts = int(shape.get("expert_count") or 0)
    if experts > 1:
        used = int(shape.get("expert_used_count") or 0)
        expert_ff = int(shape.get("expert_feed_forward_length") or 0)
        feed_forward = ubatch * (16 * embedding + 12 * used * expert_ff + 16 * experts)
    else:
        feed_forward = ubatch * 12 * (embedding + int(shape.get("feed_forward_length") or 0))
    staging = int(shape.get("expert_tensor_max_bytes") or max(host_experts)) if host_experts else 0
    layer = staging + max(attention + converted, feed_forward)
    output = ubatch * (4 * vocab + 8 * embedding)
    return masks + layer, output


def draft_instance(instance):
    """The draft model of a llama.cpp instance, as an instance of its own for
    llamacpp_memory (None without a draft).

    llama.cpp gives the draft the target's context, slots and micro-batch, its
    own GPU layers and KV cache types, and the target's GPUs unless
    ``--spec-draft-device`` names some (one GPU: no split).
    """
    command = instance["command"]
    if "--spec-draft-model" not in command:
        return None
    gpus = list(instance.get("gpus") or [])
    devices = _arg(command, "--spec-draft-device")
    split_mode = _arg(command, "--split-mode", "layer")
    split = _arg(command, "--tensor-split")
    if devices and gpus:
        positions = [int(d[len("CUDA") :]) for d in devices.split(",") if d.startswith("CUDA")]
        gpus = [gpus[p] for p in positions if p < len(gpus)]
        split = None
        if len(gpus) == 1:
            split_mode = "layer"
    draft = [
        "--ctx-size",
        _arg(command, "--ctx-size", "4096"),
        "--parallel",
        _arg(command, "--parallel", "1"),
    ]
    draft += ["--n-gpu-layers", _arg(command, "--spec-draft-ngl", "999" if gpus else "0")]
    draft += ["--ubatch-size", _arg(command, "--ubatch-size", "512"), "--split-mode", split_mode]
    draft += ["--cache-type-k", _arg(command, "--spec-draft-type-k", "f16")]
    draft += ["--cache-type-v", _arg(command, "--spec-draft-type-v", "f16")]
    if split:
        draft += ["--tensor-split", split]
    if _flag(command, "--kv-unified", "--no-kv-unified"):
        draft.append("--kv-unified")
    return dict(instance, command=draft, gpus=gpus, model=instance["model"] + "+draft")


def llamacpp_instance_memory(instance, shapes, overhead_mib=None, unknown=None):
    """llamacpp_memory of an instance (its shape under its model's name in
    ``shapes``) with its draft's added: the same process, no second overhead.
    A draft whose shape is not known is appended to ``unknown``."""
    memory = llamacpp_memory(instance, shapes[instance["model"]], overhead_mib)
    draft = draft_instance(instance)
    if draft is None:
        return memory
    shape = shapes.get(draft["model"])
    if not shape:
        if unknown is not None:
            unknown.append(draft["model"])
        return memory
    extra = llamacpp_memory(draft, shape, overhead_mib=0)
    by_gpu = dict((row["gpu"], row) for row in extra["gpus"])
    rows = []
    for row in memory["gpus"]:
        more = by_gpu.get(row["gpu"]) or {}
        rows.append(
            dict(row, **dict((k, row[k] + int(more.get(k) or 0)) for k in ("weights", "kv_cache", "compute")))
        )
    return {"gpus": rows, "host": memory["host"] + extra["host"]}


def llamacpp_estimate(instance, shape, overhead_mib=None):
    """Per-GPU bytes of one llama-server instance: a list of dicts, one per GPU."""
    return llamacpp_memory(instance, shape, overhead_mib)["gpus"]


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


def _evaluate(instances, shapes, gpus, overhead_mib, headroom_mib, host_memory_mib):
    totals = dict((int(g["index"]), int(g["memory_total_mib"]) * MIB) for g in gpus or [])
    rows = []
    host = []
    unknown = []
    for instance in instances:
        if instance.get("state", "started") != "started" or not instance.get("gpus"):
            continue
        shape = (shapes or {}).get(instance["model"])
        if not shape:
            unknown.append(instance["model"])
            continue
        if instance["engine"] == "llamacpp":
            memory = llamacpp_instance_memory(instance, shapes, overhead_mib.get("llamacpp"), unknown)
            per_gpu = memory["gpus"]
            host.append(
                {"model": instance["model"], "replica": instance.get("replica", 0), "bytes": memory["host"]}
            )
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
                "kept_back": headroom_mib * MIB,
                "fits": index in totals and held + headroom_mib * MIB <= total,
            }
        )
    host_total = sum(h["bytes"] for h in host)
    host_fits = not host_memory_mib or host_total + headroom_mib * MIB <= host_memory_mib * MIB
    fits = all(r["fits"] for r in rows) and all(g["fits"] for g in summary) and host_fits
    return {
        "rows": rows,
        "gpus": summary,
        "host": host,
        "host_total": host_total,
        "host_memory": host_memory_mib * MIB,
        "host_fits": host_fits,
        "fits": fits,
        "unknown": sorted(set(unknown)),
    }


def _with_args(command, values):
    """``command`` with each flag of ``values`` set to its value (True: a bare flag)."""
    command = list(command)
    for flag, value in values.items():
        if flag in command:
            at = command.index(flag)
            if value is True:
                continue
            command[at + 1] = str(value)
        else:
            command += [flag] if value is True else [flag, str(value)]
    return command


def _largest(low, high, fits):
    """The largest whole number in [low, high] for which ``fits`` holds (fits is monotonic), or None."""
    if high < low or not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _gib(value):
    return "%.1f GiB" % (value / float(1024 * MIB))


def _suggestions(result, instances, shapes, gpus, overhead_mib, headroom_mib, host_memory_mib):
    """For each llama.cpp model that does not fit ``result``, the settings that would make the plan fit.

    Each is computed by planning again with only that model's settings
    changed (every replica of it), and is offered only when that plan fits:
    the largest context at its parallel slots, the most slots at its context
    per slot, a q8_0 KV cache, and for a mixture of experts the fewest layers
    whose experts stay in host memory (``n_cpu_moe``).
    """
    full = set(g["gpu"] for g in result["gpus"] if not g["fits"])
    failing = []
    for row in result["rows"]:
        short = not row["fits"] or row["gpu"] in full or not result["host_fits"]
        if row["engine"] == "llamacpp" and short and row["model"] not in failing:
            failing.append(row["model"])
    found = []
    for name in failing:
        shape = shapes[name]
        own = [i for i in instances if i["model"] == name and i.get("gpus")]
        command = own[0]["command"]

        def trial(values, name=name):
            changed = [
                dict(i, command=_with_args(i["command"], values)) if i["model"] == name else i
                for i in instances
            ]
            return _evaluate(changed, shapes, gpus, overhead_mib, headroom_mib, host_memory_mib)

        parallel = max(1, int(_arg(command, "--parallel", 1)))
        ctx = int(_arg(command, "--ctx-size", 4096))
        per_slot = ctx // parallel
        options = []
        slots = _largest(
            1, per_slot // 256 - 1, lambda n, p=parallel: trial({"--ctx-size": n * 256 * p})["fits"]
        )
        if slots:
            options.append(
                (
                    {"ctx_size": slots * 256 * parallel},
                    "%d tokens per slot at parallel %d" % (slots * 256, parallel),
                )
            )
        fewer = _largest(
            1, parallel - 1, lambda n, s=per_slot: trial({"--parallel": n, "--ctx-size": n * s})["fits"]
        )
        if fewer:
            options.append(
                ({"parallel": fewer, "ctx_size": fewer * per_slot}, "%d tokens per slot" % per_slot)
            )
        current = max(
            KV_BYTES.get(_arg(command, "--cache-type-k", "f16"), 2.0),
            KV_BYTES.get(_arg(command, "--cache-type-v", "f16"), 2.0),
        )
        if current > KV_BYTES["q8_0"]:
            values = {"--cache-type-k": "q8_0", "--cache-type-v": "q8_0"}
            flash = _arg(command, "--flash-attn", "auto")
            if flash == "off":
                # llama.cpp quantizes the V cache only with flash attention.
                values["--flash-attn"] = "on"
            if trial(values)["fits"]:
                option = {"cache_type_k": "q8_0", "cache_type_v": "q8_0"}
                if flash == "off":
                    option["flash_attn"] = True
                options.append(
                    (option, "the KV cache at %d%% of its size" % round(100 * KV_BYTES["q8_0"] / current))
                )
        n_layer = int(shape.get("block_count") or 0)
        if int(shape.get("expert_count") or 0) > 1 and "--cpu-moe" not in command:
            start = int(_arg(command, "--n-cpu-moe", 0)) + 1
            for count in range(start, n_layer + 1):
                tried = trial({"--n-cpu-moe": count})
                if tried["fits"]:
                    host = sum(h["bytes"] for h in tried["host"] if h["model"] == name)
                    options.append(
                        (
                            {"n_cpu_moe": count},
                            "the experts of the first %d of %d layers in host memory: %s of host memory for this model"
                            % (count, n_layer, _gib(host)),
                        )
                    )
                    break
        found.append({"model": name, "options": [{"llamacpp": o, "why": w} for o, w in options]})
    return found


def _resident_sets(instances, shapes, overhead_mib):
    """Pools (llama-server in router mode) planned by their largest resident
    set: each pool's instance replaced by its ``max_resident`` models that
    need the most GPU memory, each as the instance it would be on its own on
    the pool's GPUs (every model runs in a process of its own there).

    Returns the instances, the pools (name, models, resident) and the models
    whose shape is not known (a pool with one is planned without it).
    """
    planned = []
    pools = []
    unknown = []
    for instance in instances:
        pool = instance.get("pool")
        if not pool:
            planned.append(instance)
            continue
        sized = []
        for member in pool["members"]:
            one = dict(instance, model=member["name"], command=member["command"], replica=0)
            del one["pool"]
            if not shapes.get(member["name"]):
                unknown.append(member["name"])
                continue
            need = 0
            if one.get("gpus"):
                memory = llamacpp_instance_memory(one, shapes, overhead_mib, unknown)
                need = sum(
                    r["weights"] + r["kv_cache"] + r["compute"] + r["overhead"] for r in memory["gpus"]
                )
            sized.append((need, one))
        sized.sort(key=lambda pair: -pair[0])
        resident = [one for _need, one in sized[: int(pool["max_resident"])]]
        planned += resident
        pools.append(
            {
                "pool": pool["name"],
                "max_resident": int(pool["max_resident"]),
                "models": [m["name"] for m in pool["members"]],
                "resident": [one["model"] for one in resident],
            }
        )
    return planned, pools, unknown


def plan(instances, shapes, gpus, overhead_mib=None, headroom_mib=512, host_memory_mib=0):
    """Memory per instance and GPU, and whether each GPU holds its instances.

    ``gpus`` is gpu_facts' list (index, memory_total_mib). Returns
    ``{"rows": [...], "gpus": [...], "host": [...], "fits": bool,
    "unknown": [names], "suggestions": [...]}``; suggestions only when
    something does not fit. ``host_memory_mib`` (0: not checked) is the host
    memory the GPU instances' host-side weights must fit in.
    """
    overhead_mib = overhead_mib or {}
    instances, pools, unplanned = _resident_sets(instances, shapes or {}, overhead_mib.get("llamacpp"))
    result = _evaluate(instances, shapes, gpus, overhead_mib, headroom_mib, host_memory_mib)
    result["pools"] = pools
    result["unknown"] = sorted(set(result["unknown"]) | set(unplanned))
    result["suggestions"] = (
        []
        if result["fits"]
        else _suggestions(result, instances, shapes, gpus, overhead_mib, headroom_mib, host_memory_mib)
    )
    return result


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
            "%s GPU %d: %s MiB planned of %s MiB (%s MiB free), %s MiB of it kept back%s"
            % (
                host,
                g["gpu"],
                _mib(g["planned"]),
                _mib(g["total"]),
                _mib(g["free"]),
                _mib(g.get("kept_back", 0)),
                "" if g["fits"] else "  <- does not fit",
            )
        )
    if result["gpus"]:
        lines.append(
            "%s: kept back on each GPU: what the driver holds before any process runs (480 MiB of an"
            " H100 80GB) and a margin; each process's CUDA context and kernels are its overhead" % host
        )
    for entry in result.get("host") or []:
        if entry["bytes"]:
            lines.append(
                "%s host memory: %s replica %d keeps %s MiB (embeddings, layers and experts not on a GPU)"
                % (host, entry["model"], entry["replica"], _mib(entry["bytes"]))
            )
    if result.get("host_memory") and not result.get("host_fits", True):
        lines.append(
            "%s host memory: %s MiB planned of %s MiB  <- does not fit"
            % (host, _mib(result["host_total"]), _mib(result["host_memory"]))
        )
    for pool in result.get("pools") or []:
        lines.append(
            "%s pool %s: planned with its %d largest of %d models resident at once: %s"
            % (host, pool["pool"], pool["max_resident"], len(pool["models"]), ", ".join(pool["resident"]))
        )
    for name in result["unknown"]:
        lines.append("%s: %s has no known shape; not planned" % (host, name))
    for found in result.get("suggestions") or []:
        if not found["options"]:
            lines.append(
                "%s: %s does not fit with any setting the planner can change: give it more or larger GPUs, "
                "more host memory, or a smaller quantization" % (host, found["model"])
            )
            continue
        lines.append(
            "%s: %s would fit with any one of (each planned again, with the rest unchanged):"
            % (host, found["model"])
        )
        for option in found["options"]:
            lines.append(
                "  llamacpp: {%s}  (%s)"
                % (
                    ", ".join(
                        "%s: %s" % (k, str(v).lower() if isinstance(v, bool) else v)
                        for k, v in sorted(option["llamacpp"].items())
                    ),
                    option["why"],
                )
            )
    return "\n".join(lines)
