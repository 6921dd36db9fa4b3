"""Turn bench_llamacpp.py results into a Markdown table and a PNG plot.

    python report.py RESULTS.json [--png OUT.png] [--stock stock] [--best baseline_best]

Ratios are taken between configurations of the same run (same machine, same
minutes), never across runs. The plot needs matplotlib; the table does not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def level(config: dict, concurrency: int) -> dict:
    return next(item for item in config["levels"] if item["concurrency"] == concurrency)


def table(results: dict, stock: str) -> str:
    configs = results["configs"]
    levels = [item["concurrency"] for item in next(iter(configs.values()))["levels"]]
    head = "| configuration | flags | " + " | ".join(f"tok/s @{c}" for c in levels)
    head += (
        " | "
        + " | ".join(f"TTFT @{c} (ms)" for c in levels)
        + f" | @{levels[-1]} vs {stock} | GPU memory (MiB) |"
    )
    lines = [head, "|" + "---|" * (4 + 2 * len(levels))]
    base = level(configs[stock], levels[-1])["tok_s"] if stock in configs else None
    for name, config in configs.items():
        rates = [f"{level(config, c)['tok_s']:.0f}" for c in levels]
        ttfts = [f"{level(config, c)['ttft_mean_ms']:.0f}" for c in levels]
        ratio = f"{level(config, levels[-1])['tok_s'] / base:.2f}x" if base else ""
        memory = f"{config['gpu_memory_busy'] / 2**20:.0f}" if config.get("gpu_memory_busy") else ""
        flags = f"`{config['flags']}`" if config["flags"] else "(none)"
        lines.append(f"| {name} | {flags} | " + " | ".join(rates + ttfts) + f" | {ratio} | {memory} |")
    return "\n".join(lines)


def plan_table(results: dict) -> str:
    head = (
        "| configuration | measured (MiB) | planned (MiB) | error | weights | KV cache | compute | overhead |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for name, config in results["configs"].items():
        plan, measured = config.get("plan"), config.get("gpu_memory_busy")
        if not plan or not measured:
            continue
        total = sum(plan[k] for k in ("weights", "kv_cache", "compute", "overhead"))
        parts = " | ".join(f"{plan[k] / 2**20:.0f}" for k in ("weights", "kv_cache", "compute", "overhead"))
        error = 100 * (total / measured - 1)
        lines.append(f"| {name} | {measured / 2**20:.0f} | {total / 2**20:.0f} | {error:+.1f}% | {parts} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, config in results["configs"].items():
        xs = [item["concurrency"] for item in config["levels"]]
        left.plot(xs, [item["tok_s"] for item in config["levels"]], marker="o", label=name)
        right.plot(xs, [item["ttft_mean_ms"] for item in config["levels"]], marker="o", label=name)
    left.set(
        xlabel="concurrent streams",
        ylabel="generated tokens/s (all streams)",
        xscale="log",
        title="Throughput",
    )
    right.set(
        xlabel="concurrent streams",
        ylabel="mean time to first token (ms)",
        xscale="log",
        yscale="log",
        title="TTFT",
    )
    for axis in (left, right):
        axis.set_xticks([1, 8, 32], ["1", "8", "32"])
        axis.grid(True, alpha=0.3)
    left.legend()
    fig.suptitle(Path(results["model"]).name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("results")
    parser.add_argument("--png")
    parser.add_argument("--stock", default="stock")
    args = parser.parse_args()
    results = json.loads(Path(args.results).read_text())
    print(table(results, args.stock))
    print()
    print(plan_table(results))
    if args.png:
        plot(results, Path(args.png))


if __name__ == "__main__":
    main()
