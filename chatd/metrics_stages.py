"""The stages' part of ``/metrics``: where messages spend their time, and the workers' stalls.

Each worker reports its cumulative histograms under ``stages`` in its ``stats`` message
(:meth:`chatd.worker.stages.Stages.report`); :class:`StageFigures` sums the live workers'
reports and keeps the exited ones' (a histogram's counts never go down), and :func:`render`
writes ``chatd_stage_seconds{stage}``, ``chatd_event_loop_lag_seconds`` and
``chatd_gc_pause_seconds``. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from chatd.metrics_http import Writer, histogram_of
from chatd.stats import Histogram

STAGES = ("commit", "queue", "first_token", "stream", "store_reply", "publish")
_OWN = ("loop_lag", "gc_pause")


@dataclass(slots=True)
class StageFigures:
    """The stage, loop lag and GC pause histograms summed over reports."""

    histograms: dict[str, Histogram] = field(default_factory=dict)

    def add(self, report: Any) -> None:
        """Add one worker's ``stages`` report."""
        if not isinstance(report, Mapping):
            return
        for name in (*STAGES, *_OWN):
            h = histogram_of(report.get(name))
            self.histograms.setdefault(name, Histogram()).merge(h.counts, h.total_ms)

    def merged(self, other: StageFigures) -> StageFigures:
        out = StageFigures()
        for src in (self.histograms, other.histograms):
            for name, h in src.items():
                out.histograms.setdefault(name, Histogram()).merge(h.counts, h.total_ms)
        return out

    def wire(self) -> dict[str, Any]:
        return {
            name: {"buckets": sorted(h.counts.items()), "sum_ms": h.total_ms}
            for name, h in sorted(self.histograms.items())
        }


def render(out: Writer, data: Any) -> None:
    """The three families from :meth:`StageFigures.wire` (every stage, even when empty)."""
    data = data if isinstance(data, Mapping) else {}
    for stage in STAGES:
        out.histogram(
            "chatd_stage_seconds",
            "Time chat messages spent in each stage in their worker: commit (to the ack), "
            "queue (for an LLM slot), first_token, stream (first to last token), store_reply, "
            "publish (to the sockets).",
            data.get(stage),
            {"stage": stage},
        )
    out.histogram(
        "chatd_event_loop_lag_seconds",
        "How late the workers' 100 ms timer fired: the event loop was blocked or busy.",
        data.get("loop_lag"),
    )
    out.histogram(
        "chatd_gc_pause_seconds",
        "Each garbage collection in a worker (the event loop stands still meanwhile).",
        data.get("gc_pause"),
    )
