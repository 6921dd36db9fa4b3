"""Serve a GGUF with llama-server under several flag sets and measure each side by side.

For each configuration: start llama-server, wait for /health, warm up, then
run streamed completions at each concurrency level (bounded request counts)
and record aggregate generated tokens/s, time to first token, and the GPU
memory of the server process, next to model_plan's estimate for the same
command line. Standard library only (plus nvidia-ml-py and gguf), so it runs
on a bare GPU machine.

    python bench_llamacpp.py --server BIN --model M.gguf --out results.json \\
        --config 'stock=' --config 'tuned=--parallel 32 -c 262144 -fa on'
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PORT = 18555


def _post_stream(prompt: str, n_predict: int, timeout: float) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    body = json.dumps(
        {
            "prompt": prompt,
            "n_predict": n_predict,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0,
            "cache_prompt": True,
        }
    )
    start = time.perf_counter()
    conn.request("POST", "/completion", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    first = None
    predicted = prompt_n = drafted = accepted = 0
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: "):
            continue
        event = json.loads(line[6:])
        if first is None and event.get("content"):
            first = time.perf_counter()
        if event.get("stop"):
            timings = event.get("timings") or {}
            predicted = int(timings.get("predicted_n") or event.get("tokens_predicted") or 0)
            prompt_n = int(timings.get("prompt_n") or 0)
            drafted = int(timings.get("draft_n") or 0)
            accepted = int(timings.get("draft_n_accepted") or 0)
            break
    end = time.perf_counter()
    conn.close()
    return {
        "ttft": (first or end) - start,
        "latency": end - start,
        "tokens": predicted,
        "prompt_tokens": prompt_n,
        # Speculative decoding: tokens drafted, and those the target accepted.
        "draft_n": drafted,
        "draft_accepted": accepted,
    }


def _prompt(rng: random.Random, words: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join(
        "".join(rng.choice(letters) for _letter in range(rng.randint(3, 8))) for _word in range(words)
    )


def run_level(concurrency: int, requests: int, n_predict: int, prompt_words: int, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [_prompt(rng, prompt_words) for _request in range(requests)]
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    queue = list(prompts)

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                prompt = queue.pop()
            try:
                result = _post_stream(prompt, n_predict, timeout=300)
            except Exception as exc:  # noqa: BLE001 - recorded, not raised
                with lock:
                    errors.append(str(exc))
                continue
            with lock:
                results.append(result)

    threads = [threading.Thread(target=worker) for _thread in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] for r in results) or [float("nan")]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "errors": len(errors),
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "tok_s": round(tokens / wall, 1) if wall else 0.0,
        "ttft_mean_ms": round(statistics.mean(ttfts) * 1000, 1),
        "ttft_p50_ms": round(ttfts[len(ttfts) // 2] * 1000, 1),
        "prompt_tokens_mean": round(statistics.mean(r["prompt_tokens"] for r in results), 1)
        if results
        else 0,
        "draft_n": sum(r["draft_n"] for r in results),
        "draft_accepted": sum(r["draft_accepted"] for r in results),
    }


def gpu_memory_per_gpu(pid: int) -> dict[int, int] | None:
    """NVML's memory of this process on each GPU (NVML's index), in bytes."""
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    try:
        used: dict[int, int] = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory:
                    used[index] = used.get(index, 0) + int(proc.usedGpuMemory)
        return used
    finally:
        pynvml.nvmlShutdown()


def gpu_memory_of(pid: int) -> int | None:
    used = gpu_memory_per_gpu(pid)
    return None if used is None else sum(used.values())


def visible_gpus() -> int:
    """How many GPUs llama-server sees (CUDA_VISIBLE_DEVICES, else every GPU)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return len([d for d in visible.split(",") if d.strip()])
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return max(1, len([line for line in out.splitlines() if line.startswith("GPU ")]))


BUFFER = re.compile(r"(CUDA\d+|CPU)\w*\s+(model|KV|compute|RS) buffer size =\s+([\d.]+) MiB")
N_CTX = re.compile(r"n_ctx\s+= (\d+)")


def parse_log(log: Path) -> dict:
    """llama-server's own account of its buffers (MiB) and its context size."""
    text = log.read_text(errors="replace")
    buffers: dict = {}
    for device, kind, mib in BUFFER.findall(text):
        buffers.setdefault(device, {}).setdefault(kind, 0.0)
        buffers[device][kind] += float(mib)
    contexts = [int(n) for n in N_CTX.findall(text)]
    return {"buffers_mib": buffers, "n_ctx": contexts[-1] if contexts else None}


def plan_estimate(model: str, args: list[str], collections: str | None) -> list[dict] | None:
    """model_plan's estimate for this command line, one row per visible GPU, in bytes."""
    if not collections:
        return None
    sys.path.insert(0, collections)
    import gguf
    from ansible_collections.cortex.serving.plugins.module_utils._gguf_info import read_gguf_info
    from ansible_collections.cortex.serving.plugins.module_utils._plan import llamacpp_instance_memory

    shape = read_gguf_info(model, gguf)
    command = list(args)
    if "-c" in command:
        command[command.index("-c")] = "--ctx-size"
    if "--ctx-size" not in command:
        # llama-server's default context: the model's trained context per... one slot.
        command += ["--ctx-size", str(shape["context_length"])]
    for short, long in (
        ("-ub", "--ubatch-size"),
        ("-ngl", "--n-gpu-layers"),
        ("-ctk", "--cache-type-k"),
        ("-ctv", "--cache-type-v"),
        ("-sm", "--split-mode"),
        ("-ts", "--tensor-split"),
        ("-np", "--parallel"),
        ("-kvu", "--kv-unified"),
        ("-fa", "--flash-attn"),
        ("-ncmoe", "--n-cpu-moe"),
        ("-cmoe", "--cpu-moe"),
    ):
        if short in command:
            command[command.index(short)] = long
    if "--n-gpu-layers" not in command:
        command += ["--n-gpu-layers", "999"]
    gpus = list(range(visible_gpus()))
    shapes = {"bench": shape}
    if "--spec-draft-model" in command:
        # The draft (long flags only), counted as model_plan counts it.
        shapes["bench+draft"] = read_gguf_info(command[command.index("--spec-draft-model") + 1], gguf)
    instance = {"model": "bench", "command": command, "gpus": gpus}
    return llamacpp_instance_memory(instance, shapes)["gpus"] or None


def serve(server: str, model: str, extra: list[str], log: Path):
    # Verbosity 4: llama-server's own account of its buffers (model, KV, compute) is logged.
    args = [
        server,
        "-m",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(PORT),
        "-ngl",
        "999",
        "--no-webui",
        "-lv",
        "4",
    ]
    args += extra
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}; see {log}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("llama-server did not become healthy in 600 s")


def stop(proc):
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", action="append", required=True, help="NAME=llama-server flags")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--n-predict", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=30, help="about 120 prompt tokens: a chat turn")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--collections", help="folder holding ansible_collections/cortex/serving, for the plan check"
    )
    parser.add_argument(
        "--deadline", type=float, default=0, help="unix time after which no new config starts"
    )
    args = parser.parse_args()

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"model": args.model, "configs": {}}
    for spec in args.config:
        name, _equals, flags = spec.partition("=")
        if name in results["configs"]:
            continue
        if args.deadline and time.time() > args.deadline:
            print(f"[bench] out of time before {name}", file=sys.stderr)
            break
        extra = shlex.split(flags)
        log = out.with_name(f"server-{name}.log")
        print("[bench] {}: llama-server {}".format(name, flags or "(stock flags)"), file=sys.stderr)
        started = time.perf_counter()
        try:
            proc = serve(args.server, args.model, extra, log)
        except RuntimeError as exc:
            # A flag set this llama-server refuses (row split here) is a result too.
            errors = [line for line in log.read_text(errors="replace").splitlines() if " E " in line]
            results["configs"][name] = {"flags": flags, "error": str(exc), "server_errors": errors[:5]}
            out.write_text(json.dumps(results, indent=1))
            print(f"[bench]   {name} did not start: {errors[:1]}", file=sys.stderr)
            continue
        load_s = time.perf_counter() - started
        try:
            run_level(2, 2, 16, args.prompt_words, seed=1)  # warm-up
            idle_mem = gpu_memory_of(proc.pid)
            idle_per_gpu = gpu_memory_per_gpu(proc.pid)
            levels = []
            for level in [int(x) for x in args.levels.split(",")]:
                requests = max(4, 2 * level)
                result = run_level(level, requests, args.n_predict, args.prompt_words, seed=level)
                print(
                    f"[bench]   c={result['concurrency']}: {result['tok_s']:.1f} tok/s, "
                    f"TTFT {result['ttft_mean_ms']:.1f} ms, errors {result['errors']}",
                    file=sys.stderr,
                )
                levels.append(result)
            busy_mem = gpu_memory_of(proc.pid)
        finally:
            stop(proc)
        logged = parse_log(log)
        plan_args = list(extra)
        if logged["n_ctx"] and "-c" not in plan_args and "--ctx-size" not in plan_args:
            plan_args += ["--ctx-size", str(logged["n_ctx"])]
        estimate = plan_estimate(args.model, plan_args, args.collections)
        results["configs"][name] = {
            "flags": flags,
            "load_s": round(load_s, 1),
            "levels": levels,
            "gpu_memory_idle": idle_mem,
            "gpu_memory_busy": busy_mem,
            "gpu_memory_idle_per_gpu": idle_per_gpu,
            "plan": estimate[0] if estimate else None,
            "plan_per_gpu": estimate,
            "server_log": logged,
        }
        out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
