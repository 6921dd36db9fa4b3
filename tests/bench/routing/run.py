"""Cache-aware routing against least-outstanding, side by side, on real engines.

Starts real llama-server replicas of SmolLM2-135M on CPU (the project's
engine image, one core each) and a real gateway in front of them, then, for
each workload, runs the same requests under each routing policy, in
alternating order, each run with documents of its own (so no run finds
another's prompts in the engines' caches):

- multi-turn: users with a long document each, several turns each, all users at once;
- shared prefix: one long system prompt, a different short question per request;
- unique: long prompts that share nothing (the control).

Per workload and policy it prints time to first token p50/p90, end-to-end
latency p50, generated tokens/s, the engines' cache hit rate (prompt tokens
they took from their cache, from the gateway's counters) and the balance
(the busiest replica's share of the requests against the mean), and the
ratios of prefix affinity to least-outstanding.

    python tests/bench/routing/run.py [--quick] [--out results.json] [--plot routing.png]

Every loop is bounded by a request count and a time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[3]
# As pytest's pythonpath has them (pyproject.toml).
for _path in (ROOT, ROOT / "gateway" / "src", ROOT / ".cache" / "collections"):
    sys.path.insert(0, str(_path))

from cortex_gateway.auth import hash_key  # noqa: E402

# The fault suite's engine container (its name, port and URL) and the tests' free_port.
from tests.faults.conftest import Engine  # noqa: E402
from tests.integration.conftest import docker, ensure_llamacpp_image, fetch_smollm2_gguf  # noqa: E402
from tests.unit.gateway.conftest import free_port  # noqa: E402

KEY = "sk-bench-routing-0123456789abcdef"
ENGINE_KEY = "engine-bench-key"
MODEL = "smollm2"
POLICIES = ("least_outstanding", "prefix_affinity", "predicted_ttft")
SHORT = {"prefix_affinity": "affinity", "predicted_ttft": "predicted"}
# A vocabulary for documents that tokenize like prose.
_VOCABULARY = (
    "account budget customer delivery engine forecast growth harbour invoice journey kernel ledger "
    "market network order partner quarter region schedule supplier target update vendor warehouse "
    "yield analysis balance capacity demand estimate factory margin product revenue service storage "
    "transport volume weather contract research station battery circuit voltage signal channel"
)
WORDS = _VOCABULARY.split()


def document(rng: random.Random, words: int) -> str:
    sentences, sentence = [], []
    for _word in range(words):
        sentence.append(rng.choice(WORDS))
        if len(sentence) >= rng.randint(8, 16):
            sentences.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    return " ".join(sentences)


# --- workloads: lists of conversations, each a list of turns ---------------------


@dataclass
class Workload:
    name: str
    # Each conversation: its turns' messages, sent one after the other.
    conversations: list[list[list[dict]]]
    concurrency: int
    # Seconds a user takes between turns (read, type), on average: without
    # it, every answer frees the slot the user's next turn then takes, and
    # any policy looks sticky.
    think: float = 0.0
    # Seconds between the users' first requests: arrivals spread over time,
    # as a service sees them, rather than all at the same instant.
    stagger: float = 1.0


def multi_turn(salt: str, users: int, turns: int, words: int, think: float) -> Workload:
    rng = random.Random(salt)
    conversations = []
    for user in range(users):
        system = f"[{salt}-{user}] You answer questions about this report.\n" + document(rng, words)
        history = [{"role": "system", "content": system}]
        convo = []
        for turn in range(turns):
            history = [
                *history,
                {"role": "user", "content": f"Question {turn}: what about the {rng.choice(WORDS)}?"},
            ]
            convo.append(list(history))
            history = [*history, {"role": "assistant", "content": f"The {rng.choice(WORDS)} is on schedule."}]
        conversations.append(convo)
    return Workload("multi-turn", conversations, concurrency=users, think=think)


def shared_prefix(salt: str, groups: int, questions: int, words: int, concurrency: int) -> Workload:
    """Groups of users that share a long system prompt, each asking its own question, shuffled."""
    rng = random.Random(salt)
    systems = [
        f"[{salt}-{g}] You are help desk {g} of a logistics firm. Policies:\n" + document(rng, words)
        for g in range(groups)
    ]
    conversations = [
        [
            [
                {"role": "system", "content": systems[g]},
                {"role": "user", "content": f"Ticket {n}: {document(rng, 12)}"},
            ]
        ]
        for g in range(groups)
        for n in range(questions)
    ]
    rng.shuffle(conversations)
    return Workload("shared prefix", conversations, concurrency)


def unique(salt: str, requests: int, words: int, concurrency: int) -> Workload:
    rng = random.Random(salt)
    conversations = [
        [[{"role": "user", "content": f"[{salt}-{n}] Summarise: " + document(rng, words)}]]
        for n in range(requests)
    ]
    return Workload("unique", conversations, concurrency)


# --- the deployment ----------------------------------------------------------------


def start_engines(count: int, options: dict, folder: Path) -> list[Engine]:
    from ansible_collections.cortex.serving.plugins.module_utils._engine_command import (
        API_KEY_FILE,
        llamacpp_command,
    )

    image, model = ensure_llamacpp_image(), fetch_smollm2_gguf()
    key_file = folder / "api-key"
    key_file.write_text(ENGINE_KEY)
    key_file.chmod(0o644)
    # The role's CPU defaults (parallel 2, metrics), one thread each.
    role_defaults = yaml.safe_load((ROOT / "roles" / "model_servers" / "defaults" / "main.yml").read_text())
    settings = {**role_defaults["model_servers_llamacpp_defaults"], "threads": 1, "seed": 7, **options}
    command = llamacpp_command(
        {"name": MODEL, "model_file": model.name, "llamacpp": settings}, context_length=8192
    )
    cpus = os.cpu_count() or 1
    engines = []
    for number in range(count):
        engine = Engine(f"cortex-bench-routing-{number}-{secrets.token_hex(3)}", free_port())
        docker(
            "run", "-d", "--name", engine.name, "--cpuset-cpus", str(number % cpus),
            "-p", f"127.0.0.1:{engine.port}:8080",
            "-v", f"{model.parent}:/models:ro", "-v", f"{key_file}:{API_KEY_FILE}:ro",
            image, *command,
        )  # fmt: skip
        engines.append(engine)
    print(f"engines: {count} x llama-server {' '.join(command[2:])}", flush=True)
    return engines


def stop_engines(engines: list[Engine]) -> None:
    for engine in engines:
        docker("rm", "-f", engine.name, check=False)


@contextlib.asynccontextmanager
async def gateway(engines: list[Engine], policy: str, folder: Path):
    port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin_listen": {"host": "127.0.0.1", "port": free_port()},
        "workers": 1,
        "auth": {"require_api_key": True, "api_keys": [{"name": "bench", "sha256": hash_key(KEY)}]},
        "models": [
            {
                "name": MODEL,
                "engine": "llamacpp",
                "routing": {"policy": policy},
                "backends": [{"url": e.url, "api_key": ENGINE_KEY, "max_concurrency": 2} for e in engines],
            }
        ],
        "queue": {"per_slot": 64, "max_wait": 600},
        "timeouts": {"first_byte": 600, "idle": 600},
        "health": {"interval": 1.0},
    }
    async with serve_gateway(config, folder, policy, len(engines)) as base:
        yield base


@contextlib.asynccontextmanager
async def serve_gateway(config: dict, folder: Path, tag: str, ready: int, limit: float = 300):
    """A gateway process with ``config`` (its file and log in ``folder``, named
    by ``tag``), once it sees ``ready`` engines of MODEL ready (engines may
    still be loading: up to ``limit`` seconds); its base URL."""
    path = folder / f"gateway-{tag}.yml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "gateway" / "src")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cortex_gateway", "serve", "--config", str(path),
        env=env, stdout=subprocess.DEVNULL, stderr=(folder / f"gateway-{tag}.log").open("wb"),
    )  # fmt: skip
    base = f"http://127.0.0.1:{config['listen']['port']}"
    try:
        async with aiohttp.ClientSession() as session:
            for _attempt in range(int(limit * 10)):
                with contextlib.suppress(aiohttp.ClientError, ValueError):
                    async with session.get(base + "/healthz") as response:
                        if (await response.json())["ready_backends"].get(MODEL, 0) == ready:
                            break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"the gateway never saw {ready} ready engines")
        yield base
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def counters(base: str) -> dict[tuple[str, str], float]:
    """(metric, label) -> value: requests and prompt cache tokens per backend."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session, session.get(base + "/metrics") as response:
        text = await response.text()
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cortex_gateway_requests_total":
                key = ("requests", sample.labels["backend"])
            elif sample.name == "cortex_gateway_prompt_cache_tokens_total":
                key = ("cache_" + sample.labels["result"], sample.labels["backend"])
            elif sample.name == "cortex_gateway_routing_decisions_total":
                key = ("decision", sample.labels["decision"])
            else:
                continue
            values[key] = values.get(key, 0.0) + sample.value
    return values


# --- one run -------------------------------------------------------------------------


@dataclass
class Outcome:
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    failures: dict[str, int] = field(default_factory=dict)


@dataclass
class Streamed:
    """One streamed chat: its status, its first content's and its end's time, its usage."""

    status: int
    retry_after: str | None = None
    first: float | None = None
    ended: float = 0.0
    usage: dict | None = None


async def stream_chat(session: aiohttp.ClientSession, base: str, key: str, body: dict) -> Streamed:
    """Send a streamed chat completion and read it to its end (exceptions go to the caller)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with session.post(
        base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        answer = Streamed(response.status, response.headers.get("Retry-After"))
        if response.status != 200:
            await response.read()
            return answer
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if answer.first is None and any(
                (c.get("delta") or {}).get("content") for c in event.get("choices", [])
            ):
                answer.first = time.perf_counter()
            if event.get("usage"):
                answer.usage = event["usage"]
    answer.ended = time.perf_counter()
    return answer


async def one_request(
    session: aiohttp.ClientSession, base: str, messages: list[dict], max_tokens: int, out: Outcome
):
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    started = time.perf_counter()
    try:
        answer = await stream_chat(session, base, KEY, body)
    except Exception as exc:  # noqa: BLE001 - every way a request can fail is recorded, by kind
        kind = type(exc).__name__
        out.failures[kind] = out.failures.get(kind, 0) + 1
        return
    if answer.status != 200:
        kind = f"status {answer.status}"
        out.failures[kind] = out.failures.get(kind, 0) + 1
        return
    out.completion_tokens += int((answer.usage or {}).get("completion_tokens") or 0)
    out.ttft.append((answer.first or answer.ended) - started)
    out.latency.append(answer.ended - started)


async def run(base: str, workload: Workload, max_tokens: int, limit: float) -> dict:
    out = Outcome()
    queue: asyncio.Queue[list[list[dict]]] = asyncio.Queue()
    for conversation in workload.conversations:
        queue.put_nowait(conversation)
    before = await counters(base)

    async def worker(session: aiohttp.ClientSession, number: int) -> None:
        pauses = random.Random(number)
        await asyncio.sleep(number * workload.stagger)
        while not queue.empty():
            for count, turn in enumerate(queue.get_nowait()):
                if count:
                    await asyncio.sleep(workload.think * pauses.uniform(0.5, 1.5))
                await one_request(session, base, turn, max_tokens, out)

    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=limit)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.wait_for(
            asyncio.gather(*(worker(session, n) for n in range(workload.concurrency))), limit
        )
    wall = time.perf_counter() - started
    after = await counters(base)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    hit = sum(v for (kind, _b), v in delta.items() if kind == "cache_hit")
    miss = sum(v for (kind, _b), v in delta.items() if kind == "cache_miss")
    per_backend = [v for (kind, _b), v in delta.items() if kind == "requests"]
    requests = sum(len(c) for c in workload.conversations)
    return {
        "requests": requests,
        "failures": out.failures,
        "ttft_p50": pct(out.ttft, 50),
        "ttft_p90": pct(out.ttft, 90),
        "latency_p50": pct(out.latency, 50),
        "tokens_per_s": out.completion_tokens / wall,
        "wall_s": wall,
        "hit_rate": hit / (hit + miss) if hit + miss else 0.0,
        "prompt_tokens": hit + miss,
        "max_load_over_mean": max(per_backend) / statistics.mean(per_backend) if per_backend else 0.0,
        # Prefix affinity's choices: the prefix's replica, another (spill), none known (new).
        "decisions": {name: int(v) for (kind, name), v in delta.items() if kind == "decision" and v},
    }


def pct(values: list[float], p: int) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# --- the whole benchmark ---------------------------------------------------------------


def workloads(salt: str, quick: bool) -> list[Workload]:
    # On one core llama-server computes about 180 prompt tokens/s of SmolLM2
    # (a word of these documents is about one token) and reuses a cached
    # prompt about 30 times faster.
    scale = 1 if quick else 2
    return [
        multi_turn(salt, users=6 if quick else 8, turns=4, words=1500, think=2.0),
        shared_prefix(salt, groups=2 * scale, questions=4, words=1500, concurrency=4),
        unique(salt, requests=8 * scale, words=600, concurrency=4),
    ]


async def bench(args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="cortex-bench-routing-"))
    results: dict[str, dict[str, list[dict]]] = {}
    options = json.loads(args.engine_options)
    order = [p for p in POLICIES if p in args.policies.split(",")]
    wanted = set(args.workloads.split(","))
    for repeat in range(args.repeats):
        for policy in order if repeat % 2 == 0 else order[::-1]:
            # Fresh engines for every run, so that no run finds what another left
            # in the engines' caches, and documents of this run only.
            engines = start_engines(args.replicas, options, folder)
            try:
                async with gateway(engines, policy, folder) as base:
                    for workload in workloads(f"{policy}-{repeat}-{secrets.token_hex(2)}", args.quick):
                        if workload.name not in wanted:
                            continue
                        row = await run(base, workload, args.max_tokens, args.limit)
                        results.setdefault(workload.name, {}).setdefault(policy, []).append(row)
                        print(
                            f"  {workload.name:14} {policy:18} ttft p50 {row['ttft_p50']:.3f}s "
                            f"hit {row['hit_rate']:.0%} balance {row['max_load_over_mean']:.2f} "
                            f"failures {row['failures'] or 0} decisions {row['decisions']}",
                            flush=True,
                        )
            finally:
                stop_engines(engines)
    merged = {name: {p: merge(rows) for p, rows in by_policy.items()} for name, by_policy in results.items()}
    return {"replicas": args.replicas, "engine_options": options, "results": merged}


def merge(rows: list[dict]) -> dict:
    """Repeats: the median of each figure; failures added up."""
    merged = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k not in ("failures", "decisions")}
    merged["decisions"] = {}
    for row in rows:
        for name, count in row["decisions"].items():
            merged["decisions"][name] = merged["decisions"].get(name, 0) + count
    failures: dict[str, int] = {}
    for row in rows:
        for kind, count in row["failures"].items():
            failures[kind] = failures.get(kind, 0) + count
    merged["failures"] = failures
    return merged


FIGURES = (
    ("ttft_p50", "TTFT p50 s", "lower"),
    ("ttft_p90", "TTFT p90 s", "lower"),
    ("latency_p50", "latency p50 s", "lower"),
    ("tokens_per_s", "gen tok/s", "higher"),
    ("hit_rate", "cache hit", "higher"),
    ("max_load_over_mean", "max/mean load", "lower"),
)


def table(data: dict) -> str:
    lines = [
        f"replicas: {data['replicas']}, engine options: {data['engine_options'] or 'the role defaults'}",
        "",
    ]
    policies = [p for p in POLICIES if any(p in by for by in data["results"].values())]
    others = [p for p in policies if p != "least_outstanding"]
    compared = "least_outstanding" in policies
    ratios = [f"{SHORT[p]} / least" for p in others] if compared else []
    header = f"| workload | figure | {' | '.join(policies)} | {' | '.join(ratios)} |"
    lines += [header, "|" + "---|" * (len(policies) + len(ratios) + 2)]
    for name, by_policy in data["results"].items():
        for key, label, _better in FIGURES:
            fmt = "{:.0%}" if key == "hit_rate" else "{:.2f}" if key != "tokens_per_s" else "{:.1f}"
            values = [fmt.format(by_policy[p][key]) if p in by_policy else "-" for p in policies]
            base = by_policy.get("least_outstanding", {}).get(key) if compared else None
            shares = (
                [f"{by_policy[p][key] / base:.2f}x" if base and p in by_policy else "-" for p in others]
                if compared
                else []
            )
            lines.append(f"| {name} | {label} | {' | '.join(values)} | {' | '.join(shares)} |")
        fails = [str(by_policy[p]["failures"] or 0) if p in by_policy else "-" for p in policies]
        lines.append(
            f"| {name} | failed requests | {' | '.join(fails)} | {' | '.join('' for _ratio in ratios)} |"
        )
    return "\n".join(lines)


def plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data["results"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for axis, (key, label) in zip(
        axes,
        (
            ("ttft_p50", "TTFT p50 (s)"),
            ("tokens_per_s", "generated tokens/s"),
            ("hit_rate", "cache hit rate"),
        ),
        strict=True,
    ):
        policies = [p for p in POLICIES if all(p in data["results"][n] for n in names)]
        width = 0.8 / len(policies)
        for i, policy in enumerate(policies):
            values = [data["results"][n][policy][key] for n in names]
            axis.bar(
                [x + i * width for x in range(len(names))], values, width, label=policy.replace("_", " ")
            )
        axis.set_xticks([x + width * (len(policies) - 1) / 2 for x in range(len(names))], names)
        axis.set_title(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="half the requests")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs per policy, in alternating order")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--limit", type=float, default=900, help="seconds one workload may take")
    parser.add_argument("--engine-options", default="{}", help="llamacpp settings over the role's, as JSON")
    parser.add_argument(
        "--policies", default=",".join(POLICIES), help="comma-separated, of " + ", ".join(POLICIES)
    )
    parser.add_argument(
        "--workloads", default="multi-turn,shared prefix,unique", help="comma-separated workload names"
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, help="a PNG of the results (needs matplotlib)")
    parser.add_argument("--from-results", type=Path, help="print (and plot) a results file of an earlier run")
    args = parser.parse_args()
    data = json.loads(args.from_results.read_text()) if args.from_results else asyncio.run(bench(args))
    print(table(data))
    if args.out:
        args.out.write_text(json.dumps(data, indent=2))
    if args.plot:
        plot(data, args.plot)


if __name__ == "__main__":
    main()
