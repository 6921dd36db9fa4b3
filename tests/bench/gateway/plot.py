"""Plot compare.py results: python plot.py RESULTS.json OUT.png (needs matplotlib)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

NAMES = ["backend alone", "cortex-gateway", "litellm proxy"]
COLOURS = ["#999999", "#2a7ab9", "#d9822b"]


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(sys.argv[1]).read_text())
    rows = {r["name"]: r for r in data["results"]}
    panels = [
        ("p50 latency @1 (ms)", "{:.2f}", lambda r: r["c1"]["p50_ms"]),
        ("requests/s @64", "{:.0f}", lambda r: r["c64"]["rps"]),
        ("proxy CPU ms/request", "{:.2f}", lambda r: r["cpu_ms_per_request"]),
        ("resident memory (MB)", "{:.0f}", lambda r: r["rss_mb"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.6))
    for axis, (title, fmt, pick) in zip(axes, panels, strict=True):
        values = [pick(rows[name]) for name in NAMES]
        bars = axis.bar(range(len(NAMES)), values, color=COLOURS)
        axis.set_xticks(range(len(NAMES)), ["backend", "cortex", "LiteLLM"])
        axis.set_title(title, fontsize=10)
        for rect, value in zip(bars, values, strict=True):
            axis.annotate(
                fmt.format(value),
                (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                ha="center",
                va="bottom",
            )
    fig.suptitle(f"Same backend, same load generator, one run on {data['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
