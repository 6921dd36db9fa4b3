"""llama-server's prompt-cache settings on a GPU, side by side, with the
traffic prefix-affinity routing sends one replica.

For each flag set (the role's GPU line with variations of --cache-ram,
--cache-reuse and --slot-prompt-similarity): start llama-server, then

- multi-turn: more conversations than slots (each a long document of its
  own, several turns), all turns to this one server, as the gateway's
  prefix affinity sends them; reports TTFT p50/p90 of the later turns and the
  share of their prompt tokens the server took from its cache (`cache_n`);
- unique: long prompts that share nothing, at full concurrency: generated
  tokens/s, which is what a prompt cache could cost.

Standard library only, so it runs on a bare GPU machine:

    python prefix_cache.py --server BIN --model M.gguf --out results.json \\
        --config 'gpu_default=--parallel 32 -c 262144 -kvu -fa on -b 512 -ub 512 --cache-ram 0' \\
        --config 'cache_ram_8g=--parallel 32 -c 262144 -kvu -fa on -b 512 -ub 512 --cache-ram 8192'

Every loop is bounded by a request count and a time limit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import shlex
import statistics
import threading
import time
from pathlib import Path

# The flag-set benchmark's server start and stop, and its port (this folder is on the path).
from bench_llamacpp import PORT, serve, stop


def _chat(messages: list[dict], max_tokens: int, timeout: float) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    body = json.dumps(
        {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
         "stream_options": {"include_usage": True}, "ignore_eos": True}
    )  # fmt: skip
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    first, usage, text = None, {}, []
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                first = first or time.perf_counter()
                text.append(piece)
        usage = event.get("usage") or usage
    ended = time.perf_counter()
    conn.close()
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "ttft": (first or ended) - started,
        "latency": ended - started,
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "cached_tokens": int(cached),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
        "text": "".join(text),
    }


def _words(rng: random.Random, count: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choice(letters) for _l in range(rng.randint(3, 8))) for _w in range(count))


def _run_users(user, count: int, limit: float) -> float:
    """``count`` threads running ``user`` (each bounded by the caller's deadline); the seconds they took."""
    threads = [threading.Thread(target=user) for _t in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=limit + 60)
    return time.perf_counter() - started


def multi_turn(conversations: int, turns: int, words: int, concurrency: int, limit: float) -> dict:
    """Every conversation's turn 1, then every conversation's turn 2, and so on
    (many users, each thinking between turns): a server with fewer slots than
    conversations must keep the others' prompts somewhere to reuse them."""
    rng = random.Random(11)
    histories = [[{"role": "system", "content": _words(rng, words)}] for _c in range(conversations)]
    done = [[threading.Event() for _t in range(turns)] for _c in range(conversations)]
    work = [(turn, number) for turn in range(turns) for number in range(conversations)]
    lock = threading.Lock()
    later: list[dict] = []
    first_turns: list[dict] = []
    errors: list[str] = []
    deadline = time.monotonic() + limit

    def user() -> None:
        while time.monotonic() < deadline:
            with lock:
                if not work:
                    return
                turn, number = work.pop(0)
            if turn and not done[number][turn - 1].wait(timeout=max(deadline - time.monotonic(), 0)):
                return
            messages = [*histories[number], {"role": "user", "content": f"question {turn}: {_words(rng, 8)}"}]
            try:
                result = _chat(messages, 16, timeout=300)
            except Exception as exc:  # noqa: BLE001 - recorded, not raised
                with lock:
                    errors.append(type(exc).__name__)
                continue
            finally:
                done[number][turn].set()
            with lock:
                (later if turn else first_turns).append(result)
                histories[number] = [*messages, {"role": "assistant", "content": result["text"]}]

    wall = _run_users(user, concurrency, limit)
    ttfts = sorted(r["ttft"] for r in later) or [float("nan")]
    prompt = sum(r["prompt_tokens"] for r in later)
    return {
        "conversations": conversations,
        "turns": turns,
        "errors": errors,
        "wall_s": round(wall, 2),
        "first_turn_ttft_p50_ms": round(statistics.median(r["ttft"] for r in first_turns) * 1000, 1)
        if first_turns
        else None,
        "later_ttft_p50_ms": round(ttfts[len(ttfts) // 2] * 1000, 1),
        "later_ttft_p90_ms": round(ttfts[int(len(ttfts) * 0.9)] * 1000, 1),
        "later_cached_share": round(sum(r["cached_tokens"] for r in later) / prompt, 3) if prompt else 0.0,
    }


def unique(requests: int, words: int, concurrency: int, limit: float) -> dict:
    rng = random.Random(23)
    prompts = [_words(rng, words) for _r in range(requests)]
    lock = threading.Lock()
    results: list[dict] = []
    errors: list[str] = []
    deadline = time.monotonic() + limit

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                if not prompts:
                    return
                prompt = prompts.pop()
            try:
                result = _chat([{"role": "user", "content": prompt}], 64, timeout=300)
            except Exception as exc:  # noqa: BLE001 - recorded, not raised
                with lock:
                    errors.append(type(exc).__name__)
                continue
            with lock:
                results.append(result)

    wall = _run_users(worker, concurrency, limit)
    return {
        "requests": len(results),
        "errors": errors,
        "tok_s": round(sum(r["completion_tokens"] for r in results) / wall, 1),
        "ttft_p50_ms": round(statistics.median(r["ttft"] for r in results) * 1000, 1) if results else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", action="append", required=True, help="name=flags")
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--words", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--unique-requests", type=int, default=96)
    parser.add_argument("--limit", type=float, default=150)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = []
    for spec in args.config:
        name, _sep, flags = spec.partition("=")
        log = Path(args.out).with_suffix(f".{name}.log")
        process = serve(args.server, args.model, shlex.split(flags), log)
        try:
            row = {
                "name": name,
                "flags": flags,
                "multi_turn": multi_turn(
                    args.conversations, args.turns, args.words, args.concurrency, args.limit
                ),
                "unique": unique(args.unique_requests, args.words, 32, args.limit),
            }
        finally:
            stop(process)
        results.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
