# -*- coding: utf-8 -*-
# Copyright: cortex.serving contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""GGUF metadata, read with the ``gguf`` package (passed in, for tests).

A split model (``name-00001-of-00003.gguf``) is read as one: every part must
be present, and tensors are counted across all of them.

Beyond the attention shape, it reads what planning a mixture of experts and
sliding-window attention needs: experts per layer and per token, the window
and which layers use it (the file's own pattern, else the pattern llama.cpp
gives the architecture), head sizes per layer kind, and the bytes and types
of each tensor group, per layer where the planner places layers.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import hashlib
import os
import re
from collections import namedtuple

GGUF_MAGIC = b"GGUF"
_SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_LAYER = re.compile(r"^blk\.(\d+)\.")
# llama.cpp's expert tensors (LLM_FFN_EXPS_REGEX in its common/common.h): what
# --cpu-moe and --n-cpu-moe keep in host memory.
_EXPERTS = re.compile(r"\.ffn_(up|down|gate|gate_up)_(ch|)exps")
# Tensor groups, first match wins.
_GROUPS = (
    ("experts", _EXPERTS),
    ("shared_experts", re.compile(r"_shexp\b")),
    ("embedding", re.compile(r"^token_embd\.")),
    ("output", re.compile(r"^output\.")),
    ("attention", re.compile(r"\.attn_(q|k|v|qkv|output|q_a|q_b|kv_a_mqa|kv_b|k_b|v_b|sinks)\b")),
    ("feed_forward", re.compile(r"\.ffn_(up|down|gate|gate_up)\.")),
)
# Sliding-window attention as llama.cpp sets it up per architecture (its
# src/models/*.cpp): the layer pattern when the file has none (period n: layer
# il slides unless il % n == n - 1; dense first: unless il % n == 0), the
# window when the file has none (None: the file must say), and whether the
# architecture slides only when the file gives a window above 0.
_Sliding = namedtuple("_Sliding", "period dense_first window needs_window")
SWA_ARCHITECTURES = {
    "gpt-oss": _Sliding(2, False, None, False),
    "gemma2": _Sliding(2, False, 4096, False),
    "gemma3": _Sliding(6, False, None, True),
    "gemma3n": _Sliding(5, False, None, False),
    "gemma-embedding": _Sliding(6, False, None, False),
    "cohere2": _Sliding(4, False, None, False),
    "cohere2moe": _Sliding(4, True, None, False),
    "exaone4": _Sliding(4, False, None, True),
    "exaone-moe": _Sliding(4, False, 128, False),
    "llama4": _Sliding(4, False, 8192, False),
    "olmo2": _Sliding(4, False, None, True),
    "afmoe": _Sliding(4, False, None, True),
    "mellum": _Sliding(4, False, None, True),
    "plamo3": _Sliding(8, False, None, True),
    "smallthinker": _Sliding(4, True, None, True),
}


class GGUFInfoError(Exception):
    """The file is missing, not GGUF, or a split set is incomplete."""


def split_parts(path):
    """Every file of the model that ``path`` belongs to, in order."""
    match = _SPLIT_NAME.match(os.path.basename(path))
    if not match:
        return [path]
    count = int(match.group("count"))
    folder = os.path.dirname(path)
    parts = [
        os.path.join(folder, "%s-%05d-of-%05d.gguf" % (match.group("stem"), number, count))
        for number in range(1, count + 1)
    ]
    missing = [p for p in parts if not os.path.exists(p)]
    if missing:
        raise GGUFInfoError(
            "%s is part of a %d-file split model, but %s %s missing"
            % (
                path,
                count,
                ", ".join(os.path.basename(p) for p in missing),
                "is" if len(missing) == 1 else "are",
            )
        )
    return parts


def check_magic(path):
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except (IOError, OSError) as exc:
        raise GGUFInfoError("cannot read %s: %s" % (path, exc.strerror or exc)) from exc
    if magic != GGUF_MAGIC:
        raise GGUFInfoError("%s is not a GGUF file (it starts with %r, not %r)" % (path, magic, GGUF_MAGIC))


def _version(package):
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - only for a message
        return "unknown version"


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else None


def swa_layers(arch, block_count, window, pattern):
    """The layers llama.cpp runs with a sliding window, or [] when none does.

    ``pattern`` is the file's ``attention.sliding_window_pattern``: a list of
    per-layer flags, a period, or None for the architecture's own.
    """
    known = SWA_ARCHITECTURES.get(arch)
    if not known or not block_count or not window:
        return []
    period, dense_first = known.period, known.dense_first
    flags = _as_list(pattern)
    if flags is not None:
        return [il for il, flag in enumerate(flags[:block_count]) if flag]
    if pattern is not None:
        period = int(pattern)
    if period == 0:
        return list(range(block_count))
    if dense_first:
        return [il for il in range(block_count) if il % period != 0]
    return [il for il in range(block_count) if il % period < period - 1]


def tensor_groups(tensors, type_name):
    """Bytes and weight types of each tensor group, per layer bytes (all, experts), the largest expert tensor."""
    groups = {}
    layers = {}
    layer_experts = {}
    largest_expert = 0
    for tensor in tensors:
        name, size = tensor.name, int(tensor.n_bytes)
        group = next((g for g, pattern in _GROUPS if pattern.search(name)), "other")
        entry = groups.setdefault(group, {"bytes": 0, "tensors": 0, "types": {}})
        entry["bytes"] += size
        entry["tensors"] += 1
        kind = type_name(tensor.tensor_type)
        entry["types"][kind] = entry["types"].get(kind, 0) + 1
        match = _LAYER.match(name)
        if match:
            il = int(match.group(1))
            layers[il] = layers.get(il, 0) + size
            if group == "experts":
                layer_experts[il] = layer_experts.get(il, 0) + size
                largest_expert = max(largest_expert, size)
    count = max(layers) + 1 if layers else 0
    return (
        groups,
        [layers.get(il, 0) for il in range(count)],
        [layer_experts.get(il, 0) for il in range(count)],
        largest_expert,
    )


def quantization_name(gguf, file_type):
    """llama.cpp's name of a general.file_type (3 -> 'Q4_1')."""
    if file_type is None:
        return None
    try:
        name = gguf.LlamaFileType(int(file_type)).name
    except ValueError:
        return "unknown (%s)" % file_type
    return name[len("MOSTLY_") :] if name.startswith("MOSTLY_") else name


def _type_name(gguf):
    def name(tensor_type):
        try:
            return gguf.GGMLQuantizationType(int(tensor_type)).name
        except ValueError:
            return "type %s" % tensor_type

    return name


def vocabulary(reader):
    """What llama.cpp compares before it lets a draft model speculate for a target.

    The tokenizer model, the BOS/EOS tokens and whether they are added, the
    token count, and a digest of the token texts (a draft must have the same
    ones, token by token). None for a file without a tokenizer (an adapter).
    """
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        return None
    digest = hashlib.sha256()
    for token in tokens:
        digest.update(token.encode("utf-8", "replace") if not isinstance(token, bytes) else token)
        digest.update(b"\0")
    return {
        "model": _field(reader, "tokenizer.ggml.model"),
        "tokens": len(tokens),
        "tokens_sha256": digest.hexdigest(),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "add_bos_token": _field(reader, "tokenizer.ggml.add_bos_token"),
        "add_eos_token": _field(reader, "tokenizer.ggml.add_eos_token"),
    }


def read_gguf_info(path, gguf):
    """Architecture, size and attention shape of the model at ``path``."""
    parts = split_parts(path)
    for part in parts:
        check_magic(part)
    try:
        readers = [gguf.GGUFReader(part) for part in parts]
    except (KeyError, ValueError) as exc:
        # A tensor type newer than this gguf package (MXFP4 before gguf 0.18).
        raise GGUFInfoError(
            "cannot read %s: %s; the gguf package here (%s) may be older than the file: "
            "install the version in the collection's requirements.txt"
            % (path, exc, getattr(gguf, "__version__", None) or _version("gguf"))
        ) from exc
    first = readers[0]
    arch = _field(first, "general.architecture")
    if not arch:
        raise GGUFInfoError("%s has no general.architecture key" % path)

    def arch_field(key):
        return _field(first, "%s.%s" % (arch, key))

    file_type = _field(first, "general.file_type")
    tensors = [t for r in readers for t in r.tensors]
    names = set(t.name for t in tensors)
    token_embd_bytes = sum(int(t.n_bytes) for t in tensors if t.name == "token_embd.weight")
    output_bytes = sum(int(t.n_bytes) for t in tensors if t.name == "output.weight")
    head_count = arch_field("attention.head_count")
    head_count_kv = arch_field("attention.head_count_kv")
    # Some files give a count per layer.
    per_layer_kv = _as_list(head_count_kv)
    if per_layer_kv is not None:
        head_count_kv = max(per_layer_kv) if per_layer_kv else None
    if _as_list(head_count) is not None:
        head_count = max(head_count) if head_count else None
    embedding = arch_field("embedding_length")
    block_count = arch_field("block_count")
    known_swa = SWA_ARCHITECTURES.get(arch)
    window = arch_field("attention.sliding_window")
    if known_swa and window is None and not known_swa.needs_window:
        window = known_swa.window
    pattern = arch_field("attention.sliding_window_pattern")
    sliding = swa_layers(arch, block_count, window, pattern)
    groups, layer_bytes, layer_expert_bytes, largest_expert = tensor_groups(tensors, _type_name(gguf))
    key_length = arch_field("attention.key_length") or (
        embedding // head_count if embedding and head_count else None
    )
    value_length = arch_field("attention.value_length") or (
        embedding // head_count if embedding and head_count else None
    )
    return {
        "path": path,
        "files": parts,
        "split_count": len(parts),
        "size_bytes": sum(os.path.getsize(p) for p in parts),
        "architecture": arch,
        "name": _field(first, "general.name"),
        # "model", or "adapter" for a LoRA adapter (adapter.type lora).
        "type": _field(first, "general.type") or "model",
        "adapter_type": _field(first, "adapter.type"),
        "lora_alpha": _field(first, "adapter.lora.alpha"),
        "vocabulary": vocabulary(first),
        "file_type": file_type,
        "quantization": quantization_name(gguf, file_type),
        "parameter_count": sum(int(t.n_elements) for t in tensors),
        "tensor_bytes": sum(int(t.n_bytes) for t in tensors),
        # llama.cpp keeps the input embedding in host memory; a model without
        # its own output matrix reuses (and copies to the GPU) the embedding.
        "token_embd_bytes": token_embd_bytes,
        "tied_output": "output.weight" not in names,
        "output_bytes": output_bytes if "output.weight" in names else token_embd_bytes,
        "context_length": arch_field("context_length"),
        "block_count": block_count,
        "embedding_length": embedding,
        "feed_forward_length": arch_field("feed_forward_length"),
        "head_count": head_count,
        # Without the key, a model has as many KV heads as heads (no GQA).
        "head_count_kv": head_count_kv or head_count,
        "head_count_kv_per_layer": per_layer_kv,
        "key_length": key_length,
        "value_length": value_length,
        # Head sizes of the sliding-window layers, where they differ.
        "key_length_swa": arch_field("attention.key_length_swa") or key_length,
        "value_length_swa": arch_field("attention.value_length_swa") or value_length,
        "vocab_size": arch_field("vocab_size"),
        "expert_count": arch_field("expert_count") or 0,
        "expert_used_count": arch_field("expert_used_count") or 0,
        "expert_feed_forward_length": arch_field("expert_feed_forward_length"),
        "expert_shared_count": arch_field("expert_shared_count") or 0,
        "sliding_window": window if sliding else 0,
        "sliding_window_pattern": pattern if pattern is None or _as_list(pattern) is None else "per layer",
        "swa_layers": sliding,
        "attention_sinks": any(t.name.endswith("attn_sinks.weight") for t in tensors),
        "tensor_groups": groups,
        "layer_bytes": layer_bytes,
        "layer_expert_bytes": layer_expert_bytes,
        "expert_tensor_max_bytes": largest_expert,
    }
