"""LoRA adapters in the formats the engines load, for a real base model.

- ``write_gguf_lora``: a llama.cpp adapter (``general.type`` adapter,
  ``adapter.type`` lora, ``adapter.lora.alpha``, and an ``.lora_a`` /
  ``.lora_b`` pair for each adapted weight), shaped from the base GGUF's own
  tensors, as llama.cpp's ``convert_lora_to_gguf.py`` writes them.
- ``write_peft_lora``: the same idea as a PEFT folder (``adapter_config.json``
  and ``adapter_model.safetensors``), which vLLM loads with ``--lora-modules``.

The low-rank weights are random (seeded): an adapter that changes what the
model says, which is all a serving test needs of one.

    python -m tests.lora_adapters BASE.gguf OUT.gguf [--rank 8] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import gguf
import numpy as np

# The projections an adapter changes, by their GGUF and Hugging Face names.
TARGETS = {"attn_q": "q_proj", "attn_v": "v_proj", "ffn_down": "down_proj"}


def _base_tensors(base: Path) -> tuple[str, dict[str, tuple[int, int]]]:
    """The base model's architecture and (rows, columns) of each target weight."""
    reader = gguf.GGUFReader(str(base))
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    shapes = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in TARGETS and parts[3] == "weight":
            # GGUF lists dimensions innermost first: (inputs, outputs).
            n_in, n_out = (int(d) for d in tensor.shape[:2])
            shapes[tensor.name] = (n_out, n_in)
    if not shapes:
        raise ValueError(f"{base}: no {', '.join(TARGETS)} weights to adapt")
    return arch, shapes


def _low_rank(rng, n_out: int, n_in: int, rank: int, std: float) -> tuple[np.ndarray, np.ndarray]:
    a = rng.normal(0.0, std, size=(rank, n_in)).astype(np.float32)
    b = rng.normal(0.0, std, size=(n_out, rank)).astype(np.float32)
    return a, b


def write_gguf_lora(
    base: str | Path, out: str | Path, rank: int = 8, alpha: float = 16.0, seed: int = 1, std: float = 0.05
) -> Path:
    """A llama.cpp LoRA adapter for the GGUF model ``base``."""
    arch, shapes = _base_tensors(Path(base))
    rng = np.random.default_rng(seed)
    out = Path(out)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("general.name", f"{out.stem} (random LoRA, rank {rank}, seed {seed})")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for name, (n_out, n_in) in sorted(shapes.items()):
        a, b = _low_rank(rng, n_out, n_in, rank, std)
        stem = name[: -len(".weight")]
        writer.add_tensor(f"{stem}.weight.lora_a", a)
        writer.add_tensor(f"{stem}.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors format (a length, a JSON header, then the raw tensors)."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def write_peft_lora(
    base: str | Path, out: str | Path, rank: int = 8, alpha: float = 16.0, seed: int = 1, std: float = 0.05
) -> Path:
    """A PEFT LoRA folder for the Hugging Face model whose GGUF is ``base``."""
    _arch, shapes = _base_tensors(Path(base))
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (n_out, n_in) in sorted(shapes.items()):
        layer, kind = name.split(".")[1], name.split(".")[2]
        module = "self_attn" if kind.startswith("attn") else "mlp"
        a, b = _low_rank(rng, n_out, n_in, rank, std)
        prefix = f"base_model.model.model.layers.{layer}.{module}.{TARGETS[kind]}"
        tensors[f"{prefix}.lora_A.weight"] = a
        tensors[f"{prefix}.lora_B.weight"] = b
    _write_safetensors(out / "adapter_model.safetensors", tensors)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(TARGETS.values()),
        "base_model_name_or_path": None,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("base", help="the base model's GGUF file")
    parser.add_argument("out", help="the adapter to write (.gguf), or a folder with --peft")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--peft", action="store_true", help="write a PEFT folder (for vLLM) instead")
    args = parser.parse_args(argv)
    write = write_peft_lora if args.peft else write_gguf_lora
    print(write(args.base, args.out, rank=args.rank, alpha=args.alpha, seed=args.seed))


if __name__ == "__main__":
    main()
