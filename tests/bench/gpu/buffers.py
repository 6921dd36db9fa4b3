"""llama.cpp's own account of the memory a command line needs, without loading it.

For each configuration, ``llama-fit-params --fit-print on`` loads the model's
metadata with nothing allocated (llama.cpp's ``no_alloc``) and prints what each
device would hold: model weights, context (KV cache) and compute buffer, in
MiB. Beside it, model_plan's estimate for the same command line, so that the
planner's compute-buffer model can be checked against llama.cpp's own graph
for cases too large to load (a 1M-cell context, experts on the host).

    python buffers.py --fit-params BIN --model GGUF --out FILE.json \
        --config "NAME=llama-server flags" [--config ...] [--collections DIR]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_llamacpp import plan_estimate

MIB = 1024 * 1024


def fit_print(binary: str, model: str, flags: list[str]) -> dict:
    """Per device: model, context and compute MiB, as llama.cpp counts them."""
    args = [binary, "-m", model, "--fit-print", "on", *flags]
    started = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    devices: dict[str, dict[str, int]] = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):
            devices[parts[0]] = dict(zip(("model", "context", "compute"), map(int, parts[1:]), strict=True))
    return {
        "devices": devices,
        "seconds": round(time.monotonic() - started, 1),
        "returncode": done.returncode,
        "stderr_tail": done.stderr[-1500:] if not devices else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--fit-params", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", action="append", required=True, help="NAME=llama-server flags")
    parser.add_argument("--collections")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for config in args.config:
        name, _eq, flags = config.partition("=")
        split = shlex.split(flags)
        measured = fit_print(args.fit_params, args.model, split)
        try:
            planned = plan_estimate(args.model, split, args.collections)
        except Exception as exc:  # noqa: BLE001 - a plan that fails is a result too
            planned = [{"error": str(exc)}]
        row = {"name": name, "flags": flags, "llama_cpp": measured, "plan": planned}
        rows.append(row)
        cuda = measured["devices"].get("CUDA0", {})
        plan0 = (planned or [{}])[0]
        print(
            f"{name:40s} llama.cpp model {cuda.get('model', '?'):>6} ctx {cuda.get('context', '?'):>6} "
            f"compute {cuda.get('compute', '?'):>6} MiB | plan weights {plan0.get('weights', 0) // MIB:>6} "
            f"kv {plan0.get('kv_cache', 0) // MIB:>6} compute {plan0.get('compute', 0) // MIB:>6}",
            flush=True,
        )
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
