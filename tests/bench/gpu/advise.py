"""Serve every setting model_plan offers for a model that does not fit this GPU.

The model's command line is the one the model_servers role renders with its
GPU defaults (host_instances over tests/role_defaults.py) for ``--slots``
slots of a context per slot that doubles from ``--ctx-per-slot`` until the
plan, against this GPU's memory (NVML), says it does not fit. Each "would fit"
setting the plan then offers is served with that command line changed by it
(tests/bench/gpu/bench_llamacpp.py): loaded or not, NVML against the plan,
tokens/s at 1 and 32 streams.

    python advise.py --server BIN --model GGUF --name NAME --out FILE.json --collections DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
MIB = 1024 * 1024
# What a native serve cannot take of the container's command line.
CONTAINER_ONLY = {"--model": 1, "--host": 1, "--port": 1, "--api-key-file": 1, "--alias": 1, "--no-webui": 0}
FLAGS = {
    "ctx_size": "--ctx-size",
    "parallel": "--parallel",
    "cache_type_k": "--cache-type-k",
    "cache_type_v": "--cache-type-v",
    "n_cpu_moe": "--n-cpu-moe",
    "flash_attn": "--flash-attn",
}


def gpu_total_mib() -> int:
    import pynvml

    pynvml.nvmlInit()
    try:
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total // MIB
    finally:
        pynvml.nvmlShutdown()


def served_flags(command: list[str]) -> list[str]:
    """The container's command line without what only a container needs."""
    flags, skip = [], 0
    for word in command[1:] if command and not command[0].startswith("-") else command:
        if skip:
            skip -= 1
            continue
        if word in CONTAINER_ONLY:
            skip = CONTAINER_ONLY[word]
            continue
        flags.append(word)
    return flags


def with_option(flags: list[str], option: dict) -> list[str]:
    changed = list(flags)
    for key, value in option.items():
        flag, text = FLAGS[key], "on" if value is True else str(value)
        if flag in changed:
            changed[changed.index(flag) + 1] = text
        else:
            changed += [flag, text]
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--ctx-per-slot", type=int, default=8192)
    parser.add_argument("--out", required=True)
    parser.add_argument("--collections", required=True)
    parser.add_argument("--deadline", type=float, default=0)
    args = parser.parse_args()
    sys.path.insert(0, args.collections)
    import gguf
    from ansible_collections.cortex.serving.plugins.module_utils._gguf_info import read_gguf_info
    from ansible_collections.cortex.serving.plugins.module_utils._models import host_instances
    from ansible_collections.cortex.serving.plugins.module_utils._plan import plan, table

    from tests.role_defaults import model_servers_defaults

    shape = read_gguf_info(args.model, gguf)
    gpus = [{"index": 0, "memory_total_mib": gpu_total_mib()}]
    per_slot = args.ctx_per_slot
    while True:
        entry = {
            "name": args.name,
            "engine": "llamacpp",
            "source": {"path": args.model},
            "gpus": [0],
            "llamacpp": {"parallel": args.slots, "ctx_size": args.slots * per_slot},
        }
        instance = host_instances([entry], "gpu-host", 1, model_servers_defaults())["instances"][0]
        result = plan([instance], {args.name: shape}, gpus)
        if not result["fits"] or per_slot >= 1 << 20:
            break
        per_slot *= 2
    print(table(result, "gpu-host"), flush=True)
    flags = served_flags(instance["command"])
    configs = [("as_planned_does_not_fit", flags, None)]
    for found in result.get("suggestions") or []:
        for number, option in enumerate(found["options"]):
            name = f"suggestion_{number}_" + "_".join(f"{k}_{v}" for k, v in option["llamacpp"].items())
            configs.append((name, with_option(flags, option["llamacpp"]), option))
    for name, served, _option in configs[1:]:
        changed = [dict(instance, command=["llama-server", *served])]
        again = plan(changed, {args.name: shape}, gpus)
        need = sum(r["need"] for r in again["rows"])
        print(
            f"{name}: planned {need // MIB} MiB of {gpus[0]['memory_total_mib']}, fits {again['fits']}",
            flush=True,
        )
    out = Path(args.out)
    bench = [
        sys.executable, str(HERE / "bench_llamacpp.py"), "--server", args.server, "--model", args.model,
        "--out", str(out.with_name(out.stem + "-served.json")), "--collections", args.collections,
        "--deadline", str(args.deadline), "--n-predict", "32", "--levels", "1,32",
    ]  # fmt: skip
    for name, served, _option in configs[1:]:
        bench += ["--config", f"{name}={' '.join(served)}"]
    subprocess.run(bench, check=False, stdout=subprocess.DEVNULL, timeout=3600)
    served = json.loads(out.with_name(out.stem + "-served.json").read_text())["configs"]
    rows = []
    for name, flags_served, option in configs[1:]:
        got = served.get(name, {})
        plan_row = got.get("plan") or {}
        need = sum(int(plan_row.get(k) or 0) for k in ("weights", "kv_cache", "compute", "overhead"))
        busy = got.get("gpu_memory_busy")
        levels = {level["concurrency"]: level for level in got.get("levels") or []}
        rows.append(
            {
                "config": name,
                "option": option,
                "flags": " ".join(flags_served),
                "loaded": "error" not in got and bool(got),
                "error": got.get("error"),
                "planned_mib": need // MIB if need else None,
                "nvml_mib": busy // MIB if busy else None,
                "error_pct": round(100.0 * (need - busy) / busy, 2) if need and busy else None,
                "left_mib": gpus[0]["memory_total_mib"] - need // MIB if need else None,
                "tok_s_1": (levels.get(1) or {}).get("tok_s"),
                "tok_s_32": (levels.get(32) or {}).get("tok_s"),
                "errors_32": (levels.get(32) or {}).get("errors"),
                "buffers_mib": (got.get("server_log") or {}).get("buffers_mib"),
            }
        )
    out.write_text(json.dumps({"gpu_total_mib": gpus[0]["memory_total_mib"], "rows": rows}, indent=1))
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
