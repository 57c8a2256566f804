"""The master's side of ``GET /metrics``: the whole daemon's figures, summed (pure).

The answering worker asks the master over its link (``metrics_request {rid}`` -> ``metrics
{rid, data}``); the master sums the workers' last ``stats`` reports (sent every second, so
figures are up to a second old), adds the counters of the workers that have exited
(:class:`Retired`, so counters never go down) and its own figures (slots, queue, restarts)
with :func:`aggregate`. The worker renders ``data`` (:func:`chatd.metrics.render`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from chatd.metrics_http import HttpFigures
from chatd.metrics_stages import StageFigures
from chatd.proto.control import HANDOFF_KEYS
from chatd.stats import GranterStats, Histogram, backend_keys

NOTICE_RESULTS = ("published", "received", "lost")
NOTICE_KEYS = tuple(f"notices_{result}_total" for result in NOTICE_RESULTS)
"""The workers' counters of the cross-host notices of stored replies (Redis pub/sub)."""

_COUNTERS = (
    *("messages_total", "replies_total", "connections_total", "bad_frames_total"),
    *("slow_closes_total", "store_failures_total"),
    *HANDOFF_KEYS,
    *NOTICE_KEYS,
)
_HISTOGRAMS = ("latency", "ttft")


def number(value: Any) -> float:
    """A reported number, or 0 for anything else (a bad report must not break /metrics)."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _histogram_of(stats: Mapping[str, Any], name: str) -> Histogram:
    """A worker report's ``<name>_buckets`` and ``<name>_sum_ms`` as a Histogram."""
    return Histogram.from_wire(stats.get(f"{name}_buckets"), stats.get(f"{name}_sum_ms"))


@dataclass(slots=True)
class Retired:
    """The counters and histograms of the workers that have exited (their last report)."""

    counters: dict[str, float] = field(default_factory=dict)
    errors_by_code: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(
        default_factory=lambda: {name: Histogram() for name in _HISTOGRAMS}
    )
    http: HttpFigures = field(default_factory=HttpFigures)  # the APIs' (chatd.metrics_http)
    stages: StageFigures = field(default_factory=StageFigures)  # (chatd.metrics_stages)

    def fold(self, stats: Mapping[str, Any]) -> None:
        """Add an exited worker's last ``stats`` report."""
        _add(self.counters, self.errors_by_code, self.histograms, stats)
        self.http.add(stats.get("http"), live=False)
        self.stages.add(stats.get("stages"))


def _add(
    counters: dict[str, float],
    errors: dict[str, float],
    histograms: dict[str, Histogram],
    stats: Mapping[str, Any],
) -> None:
    for key in _COUNTERS:
        counters[key] = counters.get(key, 0) + number(stats.get(key, 0))
    codes = stats.get("errors_by_code")
    if isinstance(codes, Mapping):
        for code, n in codes.items():
            errors[str(code)] = errors.get(str(code), 0) + number(n)
    for name in _HISTOGRAMS:
        h = _histogram_of(stats, name)
        histograms[name].merge(h.counts, h.total_ms)


def aggregate(
    workers: Iterable[tuple[str, Mapping[str, Any]]],
    retired: Retired,
    slots: GranterStats,
    restarts_total: int,
    embed: GranterStats | None = None,
) -> dict[str, Any]:
    """The daemon-wide figures (msgpack-friendly), for :func:`render`.

    Args:
        workers: ``(state, last stats report)`` of every live worker.
        retired: what the exited workers had counted.
        slots: the master's slot granter of the chat class.
        restarts_total: workers replaced since the master started.
        embed: the master's slot granter of the embed class: its figures go under ``embed``
            (``queue``, ``keys``, ``keys_other``, ``backends``, ``slots``, as for chat).
    """
    counters = dict(retired.counters)
    errors = dict(retired.errors_by_code)
    histograms = {name: Histogram() for name in _HISTOGRAMS}
    for name, h in retired.histograms.items():
        histograms[name].merge(h.counts, h.total_ms)
    states: dict[str, int] = {}
    connections = 0.0
    store_up = 1
    in_use: dict[str, float] = {}
    embed_in_use: dict[str, float] = {}
    http = HttpFigures()
    stages = StageFigures()
    for state, stats in workers:
        http.add(stats.get("http"))
        stages.add(stats.get("stages"))
        states[state] = states.get(state, 0) + 1
        connections += number(stats.get("connections", 0))
        if stats.get("store_healthy") is False:
            store_up = 0
        _add(counters, errors, histograms, stats)
        _add_in_use(in_use, stats.get("backends"))
        _add_in_use(embed_in_use, stats.get("embed_backends"))
    data: dict[str, Any] = {
        "workers": states,
        "connections": connections,
        **{key: counters.get(key, 0) for key in _COUNTERS},
        "errors_by_code": errors,
        **{
            name: {"counts": sorted(h.counts.items()), "sum_ms": h.total_ms}
            for name, h in histograms.items()
        },
        **_queue_and_keys(slots),
        "backends": [
            {
                "backend": b.key,
                "healthy": b.healthy,
                "in_flight": b.in_flight,
                "in_use": in_use.get(b.key, 0),
                "max_parallel": b.max_parallel,
            }
            for b in slots.backends
        ],
        "slots": _slot_counters(slots),
        "worker_restarts_total": restarts_total,
        "store_up": store_up,
        "http": http.merged(retired.http).wire(),
        "stages": stages.merged(retired.stages).wire(),
    }
    if embed is not None:
        data["embed"] = {
            **_queue_and_keys(embed),
            "backends": [
                {
                    "backend": b.key,
                    "in_flight": b.in_flight,
                    "in_use": embed_in_use.get(b.key, 0),
                    "max_parallel": b.max_parallel,
                }
                for b in embed.backends
            ],
            "slots": _slot_counters(embed),
        }
    return data


def _add_in_use(in_use: dict[str, float], report: Any) -> None:
    """Add a worker's ``backends`` (or ``embed_backends``) report: slots in use by backend."""
    reported = [b for b in report or () if isinstance(b, Mapping) and isinstance(b.get("url"), str)]
    for key, b in zip(backend_keys(b["url"] for b in reported), reported, strict=True):
        in_use[key] = in_use.get(key, 0) + number(b.get("in_flight", 0))


def _queue_and_keys(slots: GranterStats) -> dict[str, Any]:
    """A granter's ``queue``, ``keys`` and ``keys_other`` figures."""
    return {
        "queue": {"depth": slots.queue_depth, "max": slots.max_queue},
        # The busiest clients one by one, the others summed: a bounded number of series.
        "keys": [{"key": k.key, "queued": k.queued, "in_flight": k.in_flight} for k in slots.keys],
        "keys_other": {
            "queued": slots.other_keys.queued,
            "in_flight": slots.other_keys.in_flight,
        },
    }


def _slot_counters(slots: GranterStats) -> dict[str, int]:
    return {
        "granted_total": slots.granted_total,
        "queued_total": slots.queued_total,
        "refused_busy_total": slots.refused_busy_total,
        "refused_unavailable_total": slots.refused_unavailable_total,
        "refused_key_busy_total": slots.refused_key_busy_total,
    }


# -- rendering ---------------------------------------------------------------------------------
