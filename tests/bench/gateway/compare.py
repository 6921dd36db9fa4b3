"""cortex-gateway against LiteLLM's proxy, side by side, on this machine.

Starts a fixed-latency OpenAI-compatible backend, the gateway, nginx alone
(the gateway role's own site, proxying straight to the backend: the floor of
one proxy hop) and LiteLLM's proxy in front of it (each one process, nginx
one worker), and drives all of them and the backend alone with the same load
generator, in one run:

- added latency p50/p99 at concurrency 1 (non-streaming), against the backend alone;
- maximum requests/s at concurrency 64;
- proxy CPU time per request (from /proc), and resident memory;
- streaming: time to first chunk and mean gap between chunks, at concurrency 1.

    python tests/bench/gateway/compare.py [--litellm PATH/TO/litellm] [--baseline OLD_TREE] [--out results.json]

Every loop is bounded by a request count and a time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
KEY = "sk-bench-0123456789abcdef0123456789abcdef"
BODY = {"model": "bench", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_pids(pid: int) -> list[int]:
    """A process and its live descendants (the gateway's supervisor and workers)."""
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            queue += [int(c) for c in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live descendants (and children already waited for)."""
    total = 0.0
    for member in tree_pids(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICKS
    return total


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and its descendants (a proxy with worker processes)."""
    return sum(rss_mb(p) for p in tree_pids(pid))


def rss_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def wait_up(url: str, headers: dict, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.post(url, json=BODY, headers=headers) as response:
                    if response.status == 200:
                        await response.read()
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {limit:g}s")


async def run_load(url: str, headers: dict, concurrency: int, count: int, limit: float, stream: bool = False):
    latencies: list[float] = []
    ttfts: list[float] = []
    gaps: list[float] = []
    errors = 0
    body = {**BODY, "stream": stream}
    remaining = count
    deadline = time.monotonic() + limit
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker():
            nonlocal remaining, errors
            while remaining > 0 and time.monotonic() < deadline:
                remaining -= 1
                started = time.perf_counter()
                try:
                    async with session.post(url, json=body, headers=headers) as response:
                        if not stream:
                            await response.read()
                        else:
                            last = None
                            async for _chunk in response.content.iter_any():
                                now = time.perf_counter()
                                if last is None:
                                    ttfts.append(now - started)
                                else:
                                    gaps.append(now - last)
                                last = now
                        if response.status != 200:
                            errors += 1
                            continue
                except aiohttp.ClientError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _worker in range(concurrency)))
        wall = time.perf_counter() - began
    latencies.sort()

    def pct(values, p):
        return values[min(len(values) - 1, int(p * len(values)))] * 1000 if values else float("nan")

    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / wall if wall else 0.0,
        "p50_ms": pct(latencies, 0.50),
        "p99_ms": pct(latencies, 0.99),
        "ttft_p50_ms": pct(sorted(ttfts), 0.50),
        "gap_mean_ms": statistics.mean(gaps) * 1000 if gaps else float("nan"),
    }


def start_nginx(backend_port: int, work: Path) -> tuple[subprocess.Popen, int]:
    """nginx in the foreground with the gateway role's site template, passing
    requests straight to the backend."""
    import jinja2

    prefix, port = work / "nginx", free_port()
    (prefix / "logs").mkdir(parents=True)
    templates = jinja2.Environment(  # noqa: S701 - an nginx config, not HTML
        loader=jinja2.FileSystemLoader(ROOT / "roles" / "gateway" / "templates"), keep_trailing_newline=True
    )
    templates.filters["bool"] = bool  # the one Ansible filter the site template uses
    site = templates.get_template("nginx-site.conf.j2").render(
        ansible_managed="benchmark", gateway_listen_host="127.0.0.1", gateway_listen_port=backend_port,
        gateway_nginx_admin_expose=False, gateway_nginx_listen_port=f"127.0.0.1:{port}",
        gateway_nginx_tls="none", gateway_nginx_server_name="_", gateway_max_body_bytes="8m",
        _gateway_proxy_timeout=120,
    )  # fmt: skip
    (prefix / "site.conf").write_text(site)
    (prefix / "nginx.conf").write_text(
        f"daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log warn;\n"
        "events { worker_connections 4096; }\nhttp {\n"
        f"  access_log {prefix}/logs/access.log;\n  client_body_temp_path {prefix}/body;\n"
        f"  proxy_temp_path {prefix}/proxy;\n  fastcgi_temp_path {prefix}/fastcgi;\n"
        f"  uwsgi_temp_path {prefix}/uwsgi;\n  scgi_temp_path {prefix}/scgi;\n  include {prefix}/site.conf;\n}}\n"
    )
    return start(["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")]), port


def start(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


async def measure(name: str, url: str, headers: dict, pid: int | None, args) -> dict:
    print(f"[bench] {name}: warming up", file=sys.stderr)
    await run_load(url, headers, 4, 200, 30)
    result = {"name": name}
    result["c1"] = await run_load(url, headers, 1, args.latency_requests, 60)
    cpu_before = cpu_seconds(pid) if pid else 0.0
    result["c64"] = await run_load(url, headers, 64, args.throughput_requests, 90)
    if pid:
        result["cpu_ms_per_request"] = (
            (cpu_seconds(pid) - cpu_before) * 1000 / max(1, result["c64"]["requests"])
        )
        result["rss_mb"] = tree_rss_mb(pid)
        result["processes"] = len(tree_pids(pid))
        result["max_process_rss_mb"] = max(rss_mb(p) for p in tree_pids(pid))
    result["stream"] = await run_load(url, headers, 1, args.stream_requests, 60, stream=True)
    print(
        f"[bench] {name}: c1 p50 {result['c1']['p50_ms']:.2f} ms, c64 {result['c64']['rps']:.0f} req/s, "
        f"stream TTFT {result['stream']['ttft_p50_ms']:.2f} ms",
        file=sys.stderr,
    )
    return result


async def main_async(args) -> dict:
    backend_port, gateway_port, litellm_port = free_port(), free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="cortex-bench-"))
    gateway_config = {
        "listen": {"host": "127.0.0.1", "port": gateway_port},
        "auth": {"require_api_key": True, "api_keys": [{"name": "bench", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}]},
        "models": [{"name": "bench", "engine": "vllm", "backends": [{"url": f"http://127.0.0.1:{backend_port}", "max_concurrency": 256}]}],
        "queue": {"per_slot": 4, "max_wait": 30},
        "workers": 1,
        "admin_listen": {"host": "127.0.0.1", "port": free_port()},
    }  # fmt: skip
    (work / "gateway.yml").write_text(yaml.safe_dump(gateway_config))
    # The same gateway with several worker processes on one port (SO_REUSEPORT).
    workers_port = free_port()
    workers_config = {**gateway_config, "listen": {"host": "127.0.0.1", "port": workers_port},
                      "admin_listen": {"host": "127.0.0.1", "port": free_port()},
                      "workers": args.gateway_workers}  # fmt: skip
    (work / "gateway-workers.yml").write_text(yaml.safe_dump(workers_config))
    litellm_config = {
        "model_list": [{"model_name": "bench", "litellm_params": {
            "model": "openai/bench", "api_base": f"http://127.0.0.1:{backend_port}/v1", "api_key": "unused"}}],
        "general_settings": {"master_key": KEY},
        "litellm_settings": {"telemetry": False, "drop_params": True, "turn_off_message_logging": True},
    }  # fmt: skip
    (work / "litellm.yml").write_text(yaml.safe_dump(litellm_config))
    headers = {"Authorization": f"Bearer {KEY}"}
    procs = []
    try:
        backend = start(
            [
                sys.executable,
                str(HERE / "fixed_backend.py"),
                str(backend_port),
                "--delay-ms",
                str(args.delay_ms),
            ]
        )
        procs.append(backend)
        gateway = start([sys.executable, "-m", "cortex_gateway", "serve", "--config", str(work / "gateway.yml")],
                        {"PYTHONPATH": str(ROOT / "gateway" / "src")})  # fmt: skip
        procs.append(gateway)
        nginx, nginx_port = start_nginx(backend_port, work)
        procs.append(nginx)
        # The same gateway on asyncio's own event loop, to show what uvloop gives.
        asyncio_port = free_port()
        asyncio_config = {**gateway_config, "listen": {"host": "127.0.0.1", "port": asyncio_port},
                          "admin_listen": {"host": "127.0.0.1", "port": free_port()}}  # fmt: skip
        (work / "gateway-asyncio.yml").write_text(yaml.safe_dump(asyncio_config))
        gateway_asyncio = start(
            [sys.executable, "-m", "cortex_gateway", "serve", "--config", str(work / "gateway-asyncio.yml")],
            {"PYTHONPATH": str(ROOT / "gateway" / "src"), "CORTEX_GATEWAY_EVENT_LOOP": "asyncio"},
        )
        procs.append(gateway_asyncio)
        gateway_workers = None
        if args.gateway_workers > 1:
            gateway_workers = start(
                [
                    sys.executable,
                    "-m",
                    "cortex_gateway",
                    "serve",
                    "--config",
                    str(work / "gateway-workers.yml"),
                ],
                {"PYTHONPATH": str(ROOT / "gateway" / "src")},
            )
            procs.append(gateway_workers)
        baseline = None
        if args.baseline:
            # The same config, served by another source tree of the gateway
            # (an earlier commit's, checked out with `git worktree add`).
            baseline_port = free_port()
            baseline_config = {**gateway_config, "listen": {"host": "127.0.0.1", "port": baseline_port},
                               "admin_listen": {"host": "127.0.0.1", "port": free_port()}}  # fmt: skip
            (work / "gateway-baseline.yml").write_text(yaml.safe_dump(baseline_config))
            baseline = start(
                [
                    sys.executable,
                    "-m",
                    "cortex_gateway",
                    "serve",
                    "--config",
                    str(work / "gateway-baseline.yml"),
                ],
                {"PYTHONPATH": f"{args.baseline}/gateway/src"},
            )
            procs.append(baseline)
        litellm = None
        if args.litellm:
            litellm = start([args.litellm, "--config", str(work / "litellm.yml"), "--port", str(litellm_port),
                             "--host", "127.0.0.1", "--num_workers", "1"],
                            {"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "NO_DOCS": "True"})  # fmt: skip
            procs.append(litellm)
        targets = [("backend alone", f"http://127.0.0.1:{backend_port}/v1/chat/completions", backend.pid),
                   ("nginx alone", f"http://127.0.0.1:{nginx_port}/v1/chat/completions", nginx.pid),
                   ("cortex-gateway", f"http://127.0.0.1:{gateway_port}/v1/chat/completions", gateway.pid),
                   ("cortex-gateway, asyncio loop", f"http://127.0.0.1:{asyncio_port}/v1/chat/completions",
                    gateway_asyncio.pid)]  # fmt: skip
        if baseline:
            targets.append(("cortex-gateway, baseline", f"http://127.0.0.1:{baseline_port}/v1/chat/completions",
                            baseline.pid))  # fmt: skip
        if gateway_workers:
            targets.append((f"cortex-gateway, {args.gateway_workers} workers",
                            f"http://127.0.0.1:{workers_port}/v1/chat/completions", gateway_workers.pid))  # fmt: skip
        if litellm:
            targets.append(
                ("litellm proxy", f"http://127.0.0.1:{litellm_port}/v1/chat/completions", litellm.pid)
            )
        for _name, url, _pid in targets:
            await wait_up(url, headers)
        results = [await measure(name, url, headers, pid, args) for name, url, pid in targets]
        soak = (
            await run_soak(targets[1][1], headers, gateway.pid, args.soak_seconds)
            if args.soak_seconds
            else None
        )
    finally:
        for proc in procs:
            stop(proc)
    return {"delay_ms": args.delay_ms, "cores": os.cpu_count(), "results": results, "soak": soak}


async def run_soak(url: str, headers: dict, pid: int, seconds: float) -> dict:
    """Steady load on the gateway, its memory sampled every 30 s: it must stay flat."""
    samples = [(0.0, rss_mb(pid))]
    started = time.monotonic()
    served = 0
    while time.monotonic() - started < seconds:
        chunk = await run_load(url, headers, 16, 1_000_000, min(30.0, seconds - (time.monotonic() - started)))
        served += chunk["requests"]
        samples.append((round(time.monotonic() - started), rss_mb(pid)))
        print(
            f"[bench] soak {samples[-1][0]:.0f} s: {samples[-1][1]:.1f} MB, {served} requests",
            file=sys.stderr,
        )
    return {"seconds": seconds, "requests": served, "rss_mb": samples}


def table(data: dict) -> str:
    rows = {r["name"]: r for r in data["results"]}
    base = rows["backend alone"]
    lines = [
        "| target | p50 @1 (ms) | added p50 | p99 @1 (ms) | added p99 | req/s @64 | CPU ms/req | RSS MB | TTFT p50 (ms) | added TTFT | chunk gap (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, r in rows.items():
        added = name != "backend alone"
        lines.append(
            f"| {name} | {r['c1']['p50_ms']:.2f} | {r['c1']['p50_ms'] - base['c1']['p50_ms']:+.2f} " if added else
            f"| {name} | {r['c1']['p50_ms']:.2f} | - "
        )  # fmt: skip
        lines[-1] += (
            f"| {r['c1']['p99_ms']:.2f} | {(r['c1']['p99_ms'] - base['c1']['p99_ms']):+.2f} " if added else
            f"| {r['c1']['p99_ms']:.2f} | - "
        )  # fmt: skip
        lines[-1] += (
            f"| {r['c64']['rps']:.0f} | {r.get('cpu_ms_per_request', float('nan')):.3f} | {r.get('rss_mb', 0):.0f} "
        )
        lines[-1] += (
            f"| {r['stream']['ttft_p50_ms']:.2f} | {r['stream']['ttft_p50_ms'] - base['stream']['ttft_p50_ms']:+.2f} "
            if added else f"| {r['stream']['ttft_p50_ms']:.2f} | - "
        )  # fmt: skip
        lines[-1] += f"| {r['stream']['gap_mean_ms']:.3f} |"
    if "nginx alone" in rows:
        ours, floor = rows["cortex-gateway"], rows["nginx alone"]
        lines.append("")
        lines.append(
            f"cortex-gateway (prefix affinity on) vs nginx alone: added p50 at concurrency 1 "
            f"{ours['c1']['p50_ms'] - base['c1']['p50_ms']:.3f} ms vs {floor['c1']['p50_ms'] - base['c1']['p50_ms']:.3f} ms, "
            f"CPU per request {ours['cpu_ms_per_request']:.3f} ms = "
            f"{ours['cpu_ms_per_request'] / floor['cpu_ms_per_request']:.1f}x nginx's {floor['cpu_ms_per_request']:.3f} ms."
        )  # fmt: skip
        if "cortex-gateway, baseline" in rows:
            then = rows["cortex-gateway, baseline"]
            lines.append(
                f"this tree vs the baseline tree: CPU per request {ours['cpu_ms_per_request']:.3f} vs "
                f"{then['cpu_ms_per_request']:.3f} ms ({ours['cpu_ms_per_request'] / then['cpu_ms_per_request']:.2f}x), "
                f"req/s at 64 {ours['c64']['rps']:.0f} vs {then['c64']['rps']:.0f}, added p50 "
                f"{ours['c1']['p50_ms'] - base['c1']['p50_ms']:.3f} vs {then['c1']['p50_ms'] - base['c1']['p50_ms']:.3f} ms."
            )  # fmt: skip
        lines.append(
            f"cortex-gateway at concurrency 64: {ours['c64']['rps'] / base['c64']['rps']:.0%} of the backend alone's rate."
        )
        if "cortex-gateway, asyncio loop" in rows:
            plain = rows["cortex-gateway, asyncio loop"]
            lines.append(
                f"uvloop vs asyncio's loop: CPU per request {ours['cpu_ms_per_request']:.3f} vs "
                f"{plain['cpu_ms_per_request']:.3f} ms ({ours['cpu_ms_per_request'] / plain['cpu_ms_per_request']:.2f}x), "
                f"added p50 {ours['c1']['p50_ms'] - base['c1']['p50_ms']:.3f} vs "
                f"{plain['c1']['p50_ms'] - base['c1']['p50_ms']:.3f} ms."
            )  # fmt: skip
    if "litellm proxy" in rows:
        ours, theirs = rows["cortex-gateway"], rows["litellm proxy"]
        lines.append("")
        lines.append(
            f"cortex-gateway vs LiteLLM: {ours['c64']['rps'] / theirs['c64']['rps']:.1f}x the requests/s at concurrency 64, "
            f"{theirs['cpu_ms_per_request'] / ours['cpu_ms_per_request']:.1f}x less CPU per request, "
            f"{theirs['rss_mb'] / ours['rss_mb']:.1f}x less memory."
        )  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--litellm", help="the litellm executable (its proxy is left out without it)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="the backend's fixed latency")
    parser.add_argument(
        "--gateway-workers", type=int, default=os.cpu_count() or 1,
        help="also measure the gateway with this many worker processes (1: leave it out)",
    )  # fmt: skip
    parser.add_argument("--latency-requests", type=int, default=500)
    parser.add_argument("--throughput-requests", type=int, default=4000)
    parser.add_argument("--stream-requests", type=int, default=200)
    parser.add_argument(
        "--soak-seconds", type=float, default=0.0, help="then load the gateway this long, sampling memory"
    )
    parser.add_argument(
        "--baseline",
        help="also measure the gateway of this source tree (e.g. a `git worktree` of an earlier commit)",
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.baseline:
        args.baseline = str(Path(args.baseline).resolve())
    data = asyncio.run(main_async(args))
    print(table(data))
    if data["soak"]:
        first, last = data["soak"]["rss_mb"][1][1], data["soak"]["rss_mb"][-1][1]
        print(f"\nsoak: {data['soak']['requests']} requests in {data['soak']['seconds']:.0f} s; "
              f"RSS {first:.1f} MB after 30 s, {last:.1f} MB at the end")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
