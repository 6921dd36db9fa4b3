"""The prefix index's cost: CPU per request and memory per conversation.

    python tests/bench/routing/index.py

- CPU: microseconds per request to hash a conversation's prefix, look up its
  home and learn it, for conversations of 1 to 32 blocks (the default
  16 KiB prefix in 1 KiB blocks), measured beside json.loads of the same
  request body (which the gateway does for every request anyway);
- memory: the share of the last 10,000 conversations (of 16 KiB each) still
  found whole, for tables of several sizes, and the bytes that makes per
  conversation.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "gateway" / "src"))

from cortex_gateway.affinity import AffinitySettings, PrefixIndex, request_chain


def body(user: int, size: int) -> bytes:
    text = f"conversation {user}: " + "lorem ipsum dolor sit amet " * (size // 27 + 1)
    messages = [{"role": "system", "content": text[:size]}, {"role": "user", "content": "and then?"}]
    return json.dumps({"model": "chat", "messages": messages, "max_tokens": 16}).encode()


def per_request_us(size: int, rounds: int = 2000) -> tuple[float, float]:
    settings = AffinitySettings()
    index = PrefixIndex(None, entries=1 << 16)
    bodies = [body(n, size) for n in range(rounds)]
    started = time.perf_counter()
    for raw in bodies:
        json.loads(raw)
    parse = (time.perf_counter() - started) / rounds * 1e6
    payloads = [json.loads(raw) for raw in bodies]
    started = time.perf_counter()
    for n, payload in enumerate(payloads):
        chain = request_chain("chat", payload, None, settings)
        index.lookup(chain)
        index.learn(chain, 1 + n % 4)
    affinity = (time.perf_counter() - started) / rounds * 1e6
    return parse, affinity


def retained(entries: int, conversations: int = 10_000, size: int = 16384) -> float:
    settings = AffinitySettings()
    index = PrefixIndex(None, entries=entries)
    chains = [request_chain("chat", json.loads(body(n, size)), None, settings) for n in range(conversations)]
    for n, chain in enumerate(chains):
        index.learn(chain, 1 + n % 4)
    whole = sum(1 for n, chain in enumerate(chains) if index.lookup(chain) == (1 + n % 4, len(chain)))
    return whole / conversations


def main() -> None:
    print("| prefix bytes | blocks | json.loads us | hash + lookup + learn us | ratio |")
    print("|---|---|---|---|---|")
    for size in (400, 2048, 8192, 16384):
        parse, affinity = per_request_us(size)
        blocks = max(1, size // AffinitySettings().block_bytes)
        print(f"| {size} | {blocks} | {parse:.1f} | {affinity:.1f} | {affinity / parse:.2f}x |")
    print()
    print(
        "| table entries | table MiB | 10,000 conversations of 16 KiB found whole | bytes per conversation |"
    )
    print("|---|---|---|---|")
    for entries in (1 << 17, 1 << 18, 1 << 19, 1 << 20):
        share = retained(entries)
        mib = (entries + 1) * 8 / 2**20
        words = AffinitySettings().prefix_bytes // AffinitySettings().block_bytes
        print(f"| {entries} | {mib:.0f} | {share:.1%} | {words * 8} |")


if __name__ == "__main__":
    main()
