"""How the gateway's throughput grows with its worker processes, side by side in one run.

Starts several fixed backends (so the backend is not the ceiling), then the
gateway with 1, 2, 4, ... workers in turn, each driven by the same
multi-process load generator for the same time. Prints requests/s, the ratio
to one worker, the gateway's CPU per request and resident memory per process.
Needs as many cores as the largest worker count plus the load generator and
backends to show anything: on 2 cores they all share the same two.

    python tests/bench/gateway/workers.py --workers 1,2,4,8 [--out results.json]

Every load is bounded by a time limit and a request count.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import (
    HERE,
    KEY,
    ROOT,
    cpu_seconds,
    free_port,
    rss_mb,
    run_load,
    start,
    stop,
    tree_pids,
    wait_up,
)

HEADERS = {"Authorization": f"Bearer {KEY}"}


async def load_in_processes(url: str, processes: int, concurrency: int, seconds: float) -> dict:
    """The same load from several processes (one Python process cannot drive many workers)."""
    argv = [sys.executable, __file__, "--load-only", url, str(concurrency // processes), str(seconds)]
    children = [
        await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE) for _p in range(processes)
    ]
    outputs = [json.loads((await child.communicate())[0]) for child in children]
    requests = sum(o["requests"] for o in outputs)
    return {
        "requests": requests,
        "errors": sum(o["errors"] for o in outputs),
        "rps": sum(o["rps"] for o in outputs),
        "p50_ms": max(o["p50_ms"] for o in outputs),
    }


async def main_async(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="cortex-bench-workers-"))
    procs = []
    results = []
    try:
        backend_ports = [free_port() for _b in range(args.backends)]
        for port in backend_ports:
            procs.append(start([sys.executable, str(HERE / "fixed_backend.py"), str(port)]))
        for port in backend_ports:
            await wait_up(f"http://127.0.0.1:{port}/v1/chat/completions", HEADERS)
        for workers in args.workers:
            port = free_port()
            config = {
                "listen": {"host": "127.0.0.1", "port": port},
                "workers": workers,
                "auth": {"require_api_key": True, "api_keys": [
                    {"name": "bench", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}]},
                "models": [{"name": "bench", "engine": "vllm", "backends": [
                    {"url": f"http://127.0.0.1:{p}", "max_concurrency": 1024} for p in backend_ports]}],
                "queue": {"per_slot": 4, "max_wait": 30},
            }  # fmt: skip
            path = work / f"gateway-{workers}.yml"
            path.write_text(yaml.safe_dump(config))
            gateway = start([sys.executable, "-m", "cortex_gateway", "serve", "--config", str(path)],
                            {"PYTHONPATH": str(ROOT / "gateway" / "src")})  # fmt: skip
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            try:
                await wait_up(url, HEADERS)
                await asyncio.sleep(1.0)  # every worker listening
                await load_in_processes(url, args.load_processes, args.concurrency, 3.0)  # warm up
                cpu_before = cpu_seconds(gateway.pid)
                load = await load_in_processes(url, args.load_processes, args.concurrency, args.seconds)
                cpu = cpu_seconds(gateway.pid) - cpu_before
                pids = tree_pids(gateway.pid)
                results.append({
                    "workers": workers, **load,
                    "cpu_ms_per_request": cpu * 1000 / max(1, load["requests"]),
                    "processes": len(pids),
                    "max_process_rss_mb": max(rss_mb(p) for p in pids),
                })  # fmt: skip
                print(f"[bench] {workers} worker(s): {load['rps']:.0f} req/s, {load['errors']} errors",
                      file=sys.stderr)  # fmt: skip
            finally:
                stop(gateway)
    finally:
        for proc in procs:
            stop(proc)
    return {"cores": os.cpu_count(), "backends": args.backends, "load_processes": args.load_processes,
            "concurrency": args.concurrency, "seconds": args.seconds, "results": results}  # fmt: skip


def table(data: dict) -> str:
    base = data["results"][0]["rps"]
    lines = [
        "| workers | req/s | vs 1 worker | errors | CPU ms/req | largest process RSS (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        lines.append(
            f"| {r['workers']} | {r['rps']:.0f} | {r['rps'] / base:.2f}x | {r['errors']} | "
            f"{r['cpu_ms_per_request']:.3f} | {r['max_process_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument(
        "--workers", default="1,2,4", help="comma-separated worker counts, the first is the base"
    )
    parser.add_argument("--backends", type=int, default=4)
    parser.add_argument("--load-processes", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out")
    parser.add_argument(
        "--load-only", nargs=3, metavar=("URL", "CONCURRENCY", "SECONDS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.load_only:
        url, concurrency, seconds = args.load_only
        result = asyncio.run(run_load(url, HEADERS, int(concurrency), 10_000_000, float(seconds)))
        print(json.dumps(result))
        return
    args.workers = [int(w) for w in args.workers.split(",")]
    started = time.monotonic()
    data = asyncio.run(main_async(args))
    data["wall_seconds"] = round(time.monotonic() - started, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1))
    print(table(data))


if __name__ == "__main__":
    main()
