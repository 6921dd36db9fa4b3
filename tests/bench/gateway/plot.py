"""Plot compare.py results: python plot.py RESULTS.json OUT.png (needs matplotlib)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLOURS = {"backend": "#999999", "cortex": "#2a7ab9", "litellm": "#d9822b"}


def label(name: str) -> str:
    """'cortex-gateway, 2 workers' -> 'cortex x2'; the others by their first word."""
    if name.startswith("cortex-gateway, "):
        return "cortex x" + name.split(", ")[1].split()[0]
    return {"backend alone": "backend", "cortex-gateway": "cortex", "litellm proxy": "LiteLLM"}.get(
        name, name
    )


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(sys.argv[1]).read_text())
    rows = {r["name"]: r for r in data["results"]}
    names = list(rows)
    colours = [COLOURS[label(n).split()[0].lower()] for n in names]
    panels = [
        ("p50 latency @1 (ms)", "{:.2f}", lambda r: r["c1"]["p50_ms"]),
        ("requests/s @64", "{:.0f}", lambda r: r["c64"]["rps"]),
        ("proxy CPU ms/request", "{:.2f}", lambda r: r["cpu_ms_per_request"]),
        ("resident memory (MB)", "{:.0f}", lambda r: r["rss_mb"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.6))
    for axis, (title, fmt, pick) in zip(axes, panels, strict=True):
        values = [pick(rows[name]) for name in names]
        bars = axis.bar(range(len(names)), values, color=colours)
        axis.set_xticks(range(len(names)), [label(n) for n in names])
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
