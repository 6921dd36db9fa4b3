"""GGUF files with the exact shape of real models, for tests and benchmarks.

Every tensor name, shape and type, and every metadata key llama.cpp reads, is
the real model's; only the numbers in the tensors are made up. Three fillings:

- ``random``: every tensor random (what the GPU benchmarks load and run);
- ``sparse-experts``: every tensor random but the experts of a mixture of
  experts, which are left as holes in a sparse file (zero blocks that take no
  disk). The router, attention and embeddings are random, so which experts a
  token reads varies as with real weights; the experts' numbers do not change
  how fast their kernels run or how much memory they take;
- ``sparse``: no tensor data at all, only holes: a file of the real size that
  takes no disk, for reading its metadata (gguf_info and the planner's tests).

Tensors are written one at a time, so a 120B shape needs no more memory than
its largest tensor.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np


@dataclass(frozen=True)
class Shape:
    arch: str
    layers: int
    embd: int
    ff: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    ctx: int
    tied: bool
    # Mixture of experts: experts per layer, experts per token, their width.
    experts: int = 0
    experts_used: int = 0
    expert_ff: int = 0
    # Sliding-window attention: the window, in tokens (0: none).
    window: int = 0


SHAPES = {
    "llama3-8b": Shape("llama", 32, 4096, 14336, 32, 8, 128, 128256, 8192, False),
    "llama3.2-1b": Shape("llama", 16, 2048, 8192, 32, 8, 64, 128256, 131072, True),
    "llama3-70b": Shape("llama", 80, 8192, 28672, 64, 8, 128, 128256, 8192, False),
    "smollm2-135m": Shape("llama", 30, 576, 1536, 9, 3, 64, 49152, 8192, True),
    # openai/gpt-oss-120b and -20b: 128 (32) experts of which 4 per token,
    # sliding window of 128 tokens on every other layer, attention sinks.
    "gpt-oss-120b": Shape("gpt-oss", 36, 2880, 2880, 64, 8, 64, 201088, 131072, False, 128, 4, 2880, 128),
    "gpt-oss-20b": Shape("gpt-oss", 24, 2880, 2880, 64, 8, 64, 201088, 131072, False, 32, 4, 2880, 128),
    # google/gemma-3-27b-it (text): five sliding-window layers of 1024 tokens to one global layer.
    "gemma3-27b": Shape("gemma3", 62, 5376, 21504, 32, 16, 128, 262208, 131072, True, window=1024),
    # Few-kilobyte gpt-oss and Gemma 3 for tests that load the file in llama-server.
    "gpt-oss-tiny": Shape("gpt-oss", 4, 64, 64, 4, 2, 16, 512, 4096, False, 8, 2, 64, 32),
    "gemma3-tiny": Shape("gemma3", 12, 64, 128, 4, 2, 32, 512, 4096, True, window=64),
}
# Block size (elements) and bytes per block of the quantized types used here.
BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "MXFP4": (32, 17)}
# general.file_type written for each choice.
FILE_TYPE = {"F16": 1, "Q4_0": 2, "Q8_0": 7, "MXFP4": 38}
# llama.cpp's expert tensors (LLM_FFN_EXPS_REGEX in common/common.h).
EXPERT_TENSOR = re.compile(r"\.ffn_(up|down|gate|gate_up)_(ch|)exps")


def _vocab(size: int):
    """A byte-level BPE vocabulary: bytes, letter pairs (with their merges), fillers, specials."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    tokens = [chr(c) for c in cs]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ"]
    merges = []
    for a in letters:
        for b in letters:
            if len(tokens) >= size - 2:
                break
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    while len(tokens) < size - 2:
        tokens.append(f"<|filler_{len(tokens)}|>")
    tokens += ["<|begin_of_text|>", "<|end_of_text|>"]
    types = [gguf.TokenType.NORMAL] * (size - 2) + [gguf.TokenType.CONTROL] * 2
    return tokens, types, merges


def _tensors(shape: Shape, qtype: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy-order shape in elements, type) of every tensor, in file order.

    ``qtype`` MXFP4 is the layout of the published gpt-oss GGUFs: experts in
    MXFP4, attention and embeddings in Q8_0, norms, biases, sinks and the
    router in F32.
    """
    dense = "Q8_0" if qtype == "MXFP4" else qtype
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    plan = [("token_embd.weight", (shape.vocab, shape.embd), dense)]
    for i in range(shape.layers):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (shape.embd,), "F32"),
            (p + "attn_q.weight", (q, shape.embd), dense),
            (p + "attn_k.weight", (kv, shape.embd), dense),
            (p + "attn_v.weight", (kv, shape.embd), dense),
            (p + "attn_output.weight", (shape.embd, q), dense),
        ]
        if shape.arch == "gpt-oss":
            e, ff = shape.experts, shape.expert_ff
            plan += [
                (p + "attn_q.bias", (q,), "F32"),
                (p + "attn_k.bias", (kv,), "F32"),
                (p + "attn_v.bias", (kv,), "F32"),
                (p + "attn_output.bias", (shape.embd,), "F32"),
                (p + "attn_sinks.weight", (shape.heads,), "F32"),
                (p + "post_attention_norm.weight", (shape.embd,), "F32"),
                (p + "ffn_gate_inp.weight", (e, shape.embd), "F32"),
                (p + "ffn_gate_inp.bias", (e,), "F32"),
                (p + "ffn_gate_exps.weight", (e, ff, shape.embd), qtype),
                (p + "ffn_up_exps.weight", (e, ff, shape.embd), qtype),
                (p + "ffn_down_exps.weight", (e, shape.embd, ff), qtype),
                (p + "ffn_gate_exps.bias", (e, ff), "F32"),
                (p + "ffn_up_exps.bias", (e, ff), "F32"),
                (p + "ffn_down_exps.bias", (e, shape.embd), "F32"),
            ]
            continue
        if shape.arch == "gemma3":
            plan += [
                (p + "attn_q_norm.weight", (shape.head_dim,), "F32"),
                (p + "attn_k_norm.weight", (shape.head_dim,), "F32"),
                (p + "post_attention_norm.weight", (shape.embd,), "F32"),
            ]
        plan += [
            (p + "ffn_norm.weight", (shape.embd,), "F32"),
            (p + "ffn_gate.weight", (shape.ff, shape.embd), dense),
            (p + "ffn_up.weight", (shape.ff, shape.embd), dense),
            (p + "ffn_down.weight", (shape.embd, shape.ff), dense),
        ]
        if shape.arch == "gemma3":
            plan.append((p + "post_ffw_norm.weight", (shape.embd,), "F32"))
    plan.append(("output_norm.weight", (shape.embd,), "F32"))
    if not shape.tied:
        plan.append(("output.weight", (shape.vocab, shape.embd), dense))
    return plan


def _nbytes(dims: tuple[int, ...], qtype: str) -> int:
    count = int(np.prod(dims))
    if qtype == "F32":
        return count * 4
    if qtype == "F16":
        return count * 2
    per, size = BLOCK[qtype]
    return count // per * size


def _data(rng, name: str, dims: tuple[int, ...], qtype: str) -> np.ndarray:
    if qtype == "F32":
        if name.endswith("norm.weight"):
            return np.ones(dims, dtype=np.float32)
        return rng.standard_normal(dims, dtype=np.float32) * 0.02
    if qtype == "F16":
        return (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float16)
    per, size = BLOCK[qtype]
    blocks = int(np.prod(dims)) // per
    data = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
    if qtype == "MXFP4":
        # One E8M0 scale byte per block: 2^-6, so the FP4 values stay small.
        data[:, 0] = 127 - 6
    else:
        data[:, 0:2] = np.array([0.02 / 64], dtype=np.float16).view(np.uint8)
    return data.reshape(*dims[:-1], dims[-1] // per * size)


def write_gguf(path: str | Path, name: str, qtype: str, fill: str = "random", log=None) -> None:
    """Write the model ``name`` of SHAPES in ``qtype`` to ``path`` (see the module's doc for ``fill``)."""
    shape = SHAPES[name]
    if fill not in ("random", "sparse-experts", "sparse"):
        raise ValueError(f"fill must be random, sparse-experts or sparse, not {fill!r}")
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), shape.arch)
    writer.add_name(f"random-{name}-{qtype}")
    writer.add_file_type(FILE_TYPE[qtype])
    writer.add_context_length(shape.ctx)
    writer.add_embedding_length(shape.embd)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ff)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_layer_norm_rms_eps(1e-5 if shape.arch == "llama" else 1e-6)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_vocab_size(shape.vocab)
    if shape.arch == "gpt-oss":
        writer.add_rope_freq_base(150000.0)
        writer.add_expert_count(shape.experts)
        writer.add_expert_used_count(shape.experts_used)
        writer.add_expert_feed_forward_length(shape.expert_ff)
        writer.add_sliding_window(shape.window)
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(32.0)
        writer.add_rope_scaling_orig_ctx_len(4096)
    elif shape.arch == "gemma3":
        writer.add_rope_freq_base(1000000.0)
        writer.add_sliding_window(shape.window)
    else:
        writer.add_rope_freq_base(500000.0)
    tokens, types, merges = _vocab(shape.vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-4o" if shape.arch == "gpt-oss" else "llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(shape.vocab - 2)
    writer.add_eos_token_id(shape.vocab - 1)

    plan = _tensors(shape, qtype)
    for tensor, dims, kind in plan:
        nbytes = _nbytes(dims, kind)
        if kind in BLOCK:
            byte_dims = (*dims[:-1], dims[-1] // BLOCK[kind][0] * BLOCK[kind][1])
            raw = getattr(gguf.GGMLQuantizationType, kind)
            writer.add_tensor_info(tensor, byte_dims, np.dtype(np.uint8), nbytes, raw_dtype=raw)
        else:
            writer.add_tensor_info(
                tensor, dims, np.dtype(np.float32 if kind == "F32" else np.float16), nbytes
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    # The tensor data, each at the file's alignment; a hole where it is sparse.
    out = writer.fout[0]
    align = writer.data_alignment
    for index, (tensor, dims, kind) in enumerate(plan):
        out.seek(-out.tell() % align, 1)
        if fill == "sparse" or (fill == "sparse-experts" and EXPERT_TENSOR.search(tensor)):
            out.seek(_nbytes(dims, kind), 1)
        else:
            _data(rng, tensor, dims, kind).tofile(out)
        if log and index % 50 == 0:
            log(f"{path}: {index + 1}/{len(plan)} tensors")
    out.seek(-out.tell() % align, 1)
    out.truncate()
    writer.close()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a GGUF with the exact shape of a real model.")
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("qtype", choices=sorted(FILE_TYPE))
    parser.add_argument("path")
    parser.add_argument("--fill", default="random", choices=("random", "sparse-experts", "sparse"))
    args = parser.parse_args(argv)
    write_gguf(
        args.path, args.shape, args.qtype, args.fill, log=lambda m: print(f"[gguf] {m}", file=sys.stderr)
    )
    print(f"[gguf] wrote {args.path}", file=sys.stderr)


if __name__ == "__main__":
    main()
