"""Optional PNG plots of a report (matplotlib, the ``bench`` extra); skipped without it.

Per load scenario: ``NAME_latency.png`` (reply latency p50/p99/max per second of intended
send time), ``NAME_histogram.png`` (reply latency counts per bucket of the seed's table) and
``NAME_throughput.png`` (messages answered per second of intended send time).
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from typing import Any


def write(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write the PNGs into ``out``; [] (and a note on stderr) when matplotlib is missing."""
    try:
        mpl = importlib.import_module("matplotlib")
        mpl.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        print(
            "chatd-bench: matplotlib is not installed: no plots (pip install chatd[bench])",
            file=sys.stderr,
        )
        return []
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for r in results:
        tl = r["chatd"]["timeline"]
        if not tl:
            continue
        name = r["name"]
        t = [b["t_s"] for b in tl]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for key in ("p50", "p99", "max"):
            ax.plot(t, [math.nan if b["count"] == 0 else b[key] for b in tl], label=key)
        ax.set(xlabel="intended send time (s)", ylabel="reply latency (ms)", title=name)
        ax.legend()
        paths.append(_save(fig, plt, out / f"{name}_latency.png"))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [label for label, _ in r["chatd"]["histogram"]]
        ax.bar(labels, [k for _, k in r["chatd"]["histogram"]])
        ax.set(xlabel="reply latency (ms)", ylabel="messages", title=name)
        paths.append(_save(fig, plt, out / f"{name}_histogram.png"))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(t, [b["count"] for b in tl])
        ax.set(xlabel="intended send time (s)", ylabel="messages answered / s", title=name)
        paths.append(_save(fig, plt, out / f"{name}_throughput.png"))
    return paths


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
