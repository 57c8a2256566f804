"""Optional PNG plots of a report (matplotlib, the ``bench`` extra); skipped without it.

Per load scenario: ``NAME_latency.png`` (reply latency p50/p99/max per second of intended
send time), ``NAME_histogram.png`` (reply latency counts per bucket of the seed's table) and
``NAME_throughput.png`` (messages answered per second of intended send time). A result with
a ``queue.series`` (the ``real`` scenario) also gets ``NAME_queue.png``: the daemon's queue
depth and LLM slots over time, with ``max_queue`` and the slot count as lines.
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
        ax.set(
            xlabel="intended send time (s)",
            ylabel="reply latency (ms)",
            title=f"{name}: reply latency by intended send time",
        )
        ax.legend()
        paths.append(_save(fig, plt, out / f"{name}_latency.png"))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [label for label, _ in r["chatd"]["histogram"]]
        ax.bar(labels, [k for _, k in r["chatd"]["histogram"]])
        ax.set(xlabel="reply latency (ms)", ylabel="messages", title=f"{name}: reply latency")
        paths.append(_save(fig, plt, out / f"{name}_histogram.png"))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(t, [b["count"] for b in tl])
        ax.set(
            xlabel="intended send time (s)",
            ylabel="messages answered / s",
            title=f"{name}: throughput (replies by intended send time)",
        )
        paths.append(_save(fig, plt, out / f"{name}_throughput.png"))
        if r.get("queue", {}).get("series"):
            paths.append(_queue(plt, r, out / f"{name}_queue.png"))
    return paths


def _queue(plt: Any, r: dict[str, Any], path: Path) -> Path:
    """Queue depth, slots granted and slots in use per status sample (``[t, depth, granted,
    in use]``), with the queue's limit and the slot count dashed."""
    q = r["queue"]
    t = [x[0] for x in q["series"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.step(t, [x[1] for x in q["series"]], where="post", label="queue depth")
    ax.step(t, [x[2] for x in q["series"]], where="post", label="slots granted")
    ax.step(t, [x[3] for x in q["series"]], where="post", label="slots in use")
    ax.axhline(q["max_queue"], linestyle="--", color="grey", label="max_queue")
    ax.axhline(q["slots"], linestyle=":", color="black", label="slots")
    ax.set(
        xlabel="time since the load started (s)",
        ylabel="messages",
        title=f"{r['name']}: LLM queue and slots (daemon status)",
    )
    ax.legend(loc="center", fontsize="small", ncol=2)
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
