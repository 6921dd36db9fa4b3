"""Write a random-weight GGUF with the exact shape of a real model.

The weights are random, but every tensor, every shape and every metadata key
that llama.cpp reads is the real model's, so load time, memory and speed are
those of the real model. Tensors are generated and written one at a time, so
a 70B shape needs no more memory than its largest tensor.

    python make_random_gguf.py llama3-8b Q8_0 /data/llama3-8b-q8_0.gguf
"""

from __future__ import annotations

import argparse
import sys

import gguf
import numpy as np

SHAPES = {
    # name: (layers, embd, ff, heads, kv_heads, vocab, ctx, tied output)
    "llama3-8b": (32, 4096, 14336, 32, 8, 128256, 8192, False),
    "llama3.2-1b": (16, 2048, 8192, 32, 8, 128256, 131072, True),
    "llama3-70b": (80, 8192, 28672, 64, 8, 128256, 8192, False),
    "smollm2-135m": (30, 576, 1536, 9, 3, 49152, 8192, True),
}
BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18)}
FILE_TYPE = {"F16": 1, "Q4_0": 2, "Q8_0": 7}


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
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    while len(tokens) < size - 2:
        tokens.append(f"<|filler_{len(tokens)}|>")
    tokens += ["<|begin_of_text|>", "<|end_of_text|>"]
    types = [gguf.TokenType.NORMAL] * (size - 2) + [gguf.TokenType.CONTROL] * 2
    return tokens, types, merges


def _tensor(rng, rows: int, cols: int, qtype: str):
    if qtype == "F16":
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16), None
    per, size = BLOCK[qtype]
    blocks = rows * cols // per
    data = np.empty((blocks, size), dtype=np.uint8)
    scale = np.array([0.02 / 64], dtype=np.float16).view(np.uint8)
    data[:, 0:2] = scale
    data[:, 2:] = rng.integers(0, 256, size=(blocks, size - 2), dtype=np.uint8)
    return data.reshape(rows, cols // per * size), getattr(gguf.GGMLQuantizationType, qtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("qtype", choices=sorted(FILE_TYPE))
    parser.add_argument("path")
    args = parser.parse_args()
    layers, embd, ff, heads, kv_heads, vocab, ctx, tied = SHAPES[args.shape]
    head_dim = embd // heads
    rng = np.random.default_rng(0)

    writer = gguf.GGUFWriter(args.path, "llama")
    writer.add_name(f"random-{args.shape}-{args.qtype}")
    writer.add_file_type(FILE_TYPE[args.qtype])
    writer.add_context_length(ctx)
    writer.add_embedding_length(embd)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    tokens, types, merges = _vocab(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab - 2)
    writer.add_eos_token_id(vocab - 1)

    # (name, rows, cols, quantized?) in numpy order: rows = output features.
    plan = [("token_embd.weight", vocab, embd, True)]
    for i in range(layers):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", 1, embd, False),
            (p + "attn_q.weight", heads * head_dim, embd, True),
            (p + "attn_k.weight", kv_heads * head_dim, embd, True),
            (p + "attn_v.weight", kv_heads * head_dim, embd, True),
            (p + "attn_output.weight", embd, heads * head_dim, True),
            (p + "ffn_norm.weight", 1, embd, False),
            (p + "ffn_gate.weight", ff, embd, True),
            (p + "ffn_up.weight", ff, embd, True),
            (p + "ffn_down.weight", embd, ff, True),
        ]
    plan.append(("output_norm.weight", 1, embd, False))
    if not tied:
        plan.append(("output.weight", vocab, embd, True))

    def make(rows, cols, quantized):
        if not quantized:
            return np.ones((cols,), dtype=np.float32), None
        return _tensor(rng, rows, cols, args.qtype)

    # Declare every tensor first, then stream the data one tensor at a time.
    for name, rows, cols, quantized in plan:
        if not quantized:
            writer.add_tensor_info(name, (cols,), np.dtype(np.float32), cols * 4)
        elif args.qtype == "F16":
            writer.add_tensor_info(name, (rows, cols), np.dtype(np.float16), rows * cols * 2)
        else:
            per, size = BLOCK[args.qtype]
            writer.add_tensor_info(
                name,
                (rows, cols // per * size),
                np.dtype(np.uint8),
                rows * cols // per * size,
                raw_dtype=getattr(gguf.GGMLQuantizationType, args.qtype),
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for index, (_name, rows, cols, quantized) in enumerate(plan):
        data, _raw_type = make(rows, cols, quantized)
        writer.write_tensor_data(data)
        if index % 50 == 0:
            print(f"[gguf] {args.path}: {index + 1}/{len(plan)} tensors", file=sys.stderr)
    writer.close()
    print(f"[gguf] wrote {args.path}", file=sys.stderr)


if __name__ == "__main__":
    main()
