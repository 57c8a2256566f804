"""The ``chatctl status`` document: the master's facts plus the workers' last reports.

:func:`aggregate_status` is pure: the master gives it a :class:`WorkerSnapshot` per slot (its
own facts, plus the worker's last ``stats`` message) and the configuration; it returns the JSON
document of ``spec/interfaces.md`` with a few extra fields. A malformed report from a worker
never breaks it: a bad value counts as 0 or unknown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatd.config import Config
from chatd.proto import control as proto
from chatd.stats import Histogram


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSnapshot:
    """The master's own facts about one worker slot, at one instant."""

    id: int
    pid: int | None
    generation: int
    state: str
    uptime_s: float
    restarts: int
    rss_bytes: int
    cpu_percent: float
    last_heartbeat_s: float | None
    stats: Mapping[str, Any] = field(default_factory=dict)
    """The worker's last ``stats`` message (empty before the first)."""


_COUNTERS = ("connections", "messages_total", "errors_total")


def _number(value: Any) -> float:
    """A worker-reported number, or 0 for anything else (a bad report must not break status)."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _worker_row(w: WorkerSnapshot) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": w.id,
        "pid": w.pid,
        "generation": w.generation,
        "state": w.state,
        "uptime_s": round(w.uptime_s, 3),
        **{k: _number(w.stats.get(k, 0)) for k in _COUNTERS},
        "restarts": w.restarts,
        "rss_bytes": w.rss_bytes,
        "cpu_percent": round(w.cpu_percent, 1),
        "last_heartbeat_s": None if w.last_heartbeat_s is None else round(w.last_heartbeat_s, 3),
    }
    # The other fields of the worker's report pass through; the master's own facts win.
    for key, value in w.stats.items():
        if key != proto.T:
            row.setdefault(key, value)
    return row


def _backends(cfg: Config, workers: Sequence[WorkerSnapshot]) -> list[dict[str, Any]]:
    """The configured backends, with health and load as the workers last reported them.

    ``healthy`` is None until a worker reports the backend, then True only while every worker
    that reports it says so (one worker that cannot reach a backend is worth showing).
    """
    reports: dict[str, list[Mapping[str, Any]]] = {}
    for w in workers:
        for b in w.stats.get("backends") or ():
            if isinstance(b, Mapping) and isinstance(b.get("url"), str):
                reports.setdefault(b["url"].rstrip("/"), []).append(b)
    out = []
    for b in cfg.llm.backends:
        seen = reports.get(b.base_url, [])
        health = [r["healthy"] for r in seen if isinstance(r.get("healthy"), bool)]
        out.append(
            {
                "url": b.url,
                "api": b.api,
                "healthy": all(health) if health else None,
                "in_flight": sum(_number(r.get("in_flight", 0)) for r in seen),
                "max_parallel": b.max_parallel,
            }
        )
    return out


def _buckets(value: Any) -> dict[int, int] | None:
    """A worker's histogram (``[[bucket, count], ...]`` or a map), or None if malformed."""
    pairs = value.items() if isinstance(value, Mapping) else value
    if not isinstance(pairs, Iterable):
        return None
    try:
        return {int(b): int(n) for b, n in pairs}
    except (TypeError, ValueError):
        return None


def _merge_latency(workers: Sequence[WorkerSnapshot], name: str) -> dict[str, float]:
    """Daemon-wide percentiles of ``<name>_ms``.

    Workers that send ``<name>_buckets`` (a :class:`chatd.stats.Histogram`'s counts) are merged
    exactly. For the others only their own percentiles are known; the result is then at least
    the largest of them: a union's p-quantile never exceeds the largest p-quantile of its
    parts, so that is an honest upper bound (and exact with one worker).
    """
    histogram = Histogram()
    bound = {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    for w in workers:
        counts = _buckets(w.stats.get(f"{name}_buckets"))
        summary = w.stats.get(f"{name}_ms")
        if counts is not None:
            histogram.merge(counts)
        elif isinstance(summary, Mapping):
            for key in bound:
                bound[key] = max(bound[key], float(_number(summary.get(key, 0))))
    return {key: max(bound[key], histogram.percentile(float(key[1:]))) for key in bound}


def aggregate_status(
    *,
    master: Mapping[str, Any],
    workers: Sequence[WorkerSnapshot],
    cfg: Config,
    restarts_total: int,
    retired: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The ``chatctl status --json`` document (``spec/interfaces.md``), plus extra fields.

    Args:
        master: the ``master`` object, as is.
        workers: one snapshot per slot.
        cfg: for the backends and the queue limit.
        restarts_total: workers replaced since the master started.
        retired: counters (``messages_total``, ``errors_total``) of the workers that have
            exited, from their last report, so that the totals never go down.
    """
    rows = [_worker_row(w) for w in workers]
    errors_by_code: dict[str, float] = {}
    for w in workers:
        codes = w.stats.get("errors_by_code")
        if isinstance(codes, Mapping):
            for code, count in codes.items():
                errors_by_code[str(code)] = errors_by_code.get(str(code), 0) + _number(count)
    totals: dict[str, Any] = {k: sum(row[k] for row in rows) for k in _COUNTERS}
    for key, value in (retired or {}).items():
        totals[key] = totals.get(key, 0) + value
    totals.update(
        errors_by_code=errors_by_code,
        worker_restarts_total=restarts_total,
        latency_ms=_merge_latency(workers, "latency"),
        ttft_ms=_merge_latency(workers, "ttft"),
    )
    return {
        "master": dict(master),
        "workers": rows,
        "backends": _backends(cfg, workers),
        "queue": {"depth": 0, "max": cfg.llm.max_queue},
        "totals": totals,
    }
