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

from chatd.backendtable import BackendTable, Entry
from chatd.config import Config
from chatd.proto import control as proto
from chatd.stats import GranterStats, Histogram


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
    msg_per_s: float = 0.0
    """Messages per second, from the deltas of the worker's ``messages_total`` (the master's)."""
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
        "msg_per_s": round(w.msg_per_s, 1),
        "rss_bytes": w.rss_bytes,
        "cpu_percent": round(w.cpu_percent, 1),
        "last_heartbeat_s": None if w.last_heartbeat_s is None else round(w.last_heartbeat_s, 3),
    }
    # The other fields of the worker's report pass through; the master's own facts win.
    for key, value in w.stats.items():
        if key != proto.T:
            row.setdefault(key, value)
    return row


def _backends(entries: Sequence[Entry], workers: Sequence[WorkerSnapshot]) -> list[dict[str, Any]]:
    """The backends (the static tables, and each address of the dns tables, which says the
    table as ``discovered_from``), with health and load as the workers last reported them.

    ``healthy`` is None until a worker reports the backend, then True only while every worker
    that reports it says so (one worker that cannot reach a backend is worth showing).
    """
    reports: dict[str, list[Mapping[str, Any]]] = {}
    for w in workers:
        for b in w.stats.get("backends") or ():
            if isinstance(b, Mapping) and isinstance(b.get("url"), str):
                reports.setdefault(b["url"].rstrip("/"), []).append(b)
    out = []
    for e in entries:
        b = e.config
        seen = reports.get(b.base_url, [])
        health = [r["healthy"] for r in seen if isinstance(r.get("healthy"), bool)]
        row = {
            "url": b.url,
            "api": b.api,
            "healthy": all(health) if health else None,
            "in_flight": sum(_number(r.get("in_flight", 0)) for r in seen),
            "max_parallel": b.max_parallel,
        }
        if e.origin is not None:
            row["discovered_from"] = e.origin
        out.append(row)
    return out


def _with_slots(
    backends: list[dict[str, Any]],
    entries: Sequence[Entry],
    slots: GranterStats,
    workers: Sequence[WorkerSnapshot],
) -> None:
    """Overwrite the workers' view with the master's slot granter.

    ``in_flight`` is the slots granted (exact, daemon-wide), as before: it includes a slot a
    worker keeps leased for its next request, for up to two seconds after its last use. It is
    split into ``in_use`` (requests running) and ``leased_idle`` (kept unused), which add up
    to it (:meth:`chatd.stats.GranterStats.usage` says how, from the workers' reports).
    ``healthy`` is the granter's verdict once reported.
    """
    granted = {b.key: b for b in slots.backends}
    reports = {w.pid: w.stats.get("backends") for w in workers if w.pid is not None}
    usage = slots.usage(reports)
    for row, key in zip(backends, (e.key for e in entries), strict=True):
        b = granted.get(key)
        if b is not None:
            row["in_flight"] = b.in_flight
            row["in_use"], row["leased_idle"] = usage[key]
            row["max_parallel"] = b.max_parallel
            if b.healthy is not None:
                row["healthy"] = b.healthy


def _with_embed(
    backends: list[dict[str, Any]],
    entries: Sequence[Entry],
    slots: GranterStats,
    workers: Sequence[WorkerSnapshot],
) -> None:
    """Add each backend's embed slots from the master's embed granter: ``embed {in_flight,
    in_use, leased_idle, max_parallel}``, the chat figures' meanings (:func:`_with_slots`),
    split with the workers' ``embed_backends`` reports (``max_parallel`` is the backend's
    ``max_parallel_embed``). Health is the backend's, one for both classes."""
    granted = {b.key: b for b in slots.backends}
    reports = {w.pid: w.stats.get("embed_backends") for w in workers if w.pid is not None}
    usage = slots.usage(reports)
    for row, e in zip(backends, entries, strict=True):
        key, conf = e.key, e.config
        b = granted.get(key)
        in_use, idle = usage.get(key, (0, 0))
        row["embed"] = {
            "in_flight": 0 if b is None else b.in_flight,
            "in_use": in_use,
            "leased_idle": idle,
            "max_parallel": conf.max_parallel_embed if b is None else b.max_parallel,
        }


def _queue(slots: GranterStats) -> dict[str, Any]:
    """A granter's queue: ``{depth, max}``, and ``keys`` while some client has any."""
    queue: dict[str, Any] = {"depth": slots.queue_depth, "max": slots.max_queue}
    if slots.keys:  # absent rather than empty: the document stays as it was when idle
        queue["keys"] = [
            {"key": k.key, "queued": k.queued, "in_flight": k.in_flight} for k in slots.keys
        ]
    return queue


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
    slots: GranterStats | None = None,
    others: Sequence[WorkerSnapshot] = (),
    embed_slots: GranterStats | None = None,
    table: BackendTable | None = None,
    discovery: Sequence[Mapping[str, Any]] = (),
    fleet: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``chatctl status --json`` document (``spec/interfaces.md``), plus extra fields.

    Args:
        master: the ``master`` object, as is.
        workers: one snapshot per slot.
        cfg: for the backends and the queue limit.
        restarts_total: workers replaced since the master started.
        retired: counters (``messages_total``, ``errors_total``) of the workers that have
            exited, from their last report, so that the totals never go down.
        slots: the master's LLM slot granter: backends' ``in_flight`` (split into ``in_use``
            and ``leased_idle``) and ``healthy``, and the queue, come from it (without it,
            ``in_flight`` is the sum of the workers' reports, and there is no split). The
            queue then lists ``keys``, the busiest clients (at most 10, busiest first:
            ``{key, queued, in_flight}``, the key as the granter has it: a token's hash or an
            address), when some client has requests waiting or slots counted against it.
        others: the workers that serve no slot (a reload's new worker not ready yet, old
            ones draining): listed as ``other_workers``, and counted in the totals.
        embed_slots: the master's granter of the embed class (embeddings: slots and a queue
            of their own). With it, each backend gets ``embed {in_flight, in_use,
            leased_idle, max_parallel}`` and the document ``embed_queue {depth, max, keys}``,
            shaped as the chat ones; ``backends[].in_flight`` and friends and ``queue`` stay
            the chat class's, as they were.
        table: the backends of the current generation, a dns table's addresses included
            (:mod:`chatd.backendtable`); None: ``cfg``'s static tables. Its live entries are
            the ``backends`` rows.
        discovery: the dns tables' state (:meth:`chatd.master.discovery.Discovery.status`),
            shown as ``discovery`` when there is any.
        fleet: the fleet's slots (:meth:`chatd.master.fleet.Fleet.status`; None: not shared,
            the store is not Redis): ``fleet {host, ttl_s, error}``, and on each backend (and
            its ``embed``) ``fleet {in_flight, held, hosts, here_held, here_allowed}``: the
            slots in flight and held over every host (as of each host's last renewal), and
            those this host holds and may use.
    """
    rows = [_worker_row(w) for w in workers]
    other_rows = [_worker_row(w) for w in others]
    everyone = [*workers, *others]
    errors_by_code: dict[str, float] = {}
    for w in everyone:
        codes = w.stats.get("errors_by_code")
        if isinstance(codes, Mapping):
            for code, count in codes.items():
                errors_by_code[str(code)] = errors_by_code.get(str(code), 0) + _number(count)
    totals: dict[str, Any] = {k: sum(row[k] for row in rows + other_rows) for k in _COUNTERS}
    handoff = {
        key.removeprefix("handoff_").removesuffix("_total"): sum(
            _number(w.stats.get(key, 0)) for w in everyone
        )
        for key in proto.HANDOFF_KEYS
    }
    for key, value in (retired or {}).items():
        if key in proto.HANDOFF_KEYS:
            handoff[key.removeprefix("handoff_").removesuffix("_total")] += value
        else:
            totals[key] = totals.get(key, 0) + value
    totals["handoff"] = handoff
    totals.update(
        errors_by_code=errors_by_code,
        worker_restarts_total=restarts_total,
        msg_per_s=round(sum(w.msg_per_s for w in everyone), 1),
        latency_ms=_merge_latency(everyone, "latency"),
        ttft_ms=_merge_latency(everyone, "ttft"),
    )
    table = table if table is not None else BackendTable(cfg.llm.backends)
    entries = [e for e in table.entries if e.live]
    backends = _backends(entries, everyone)
    queue: dict[str, Any] = {"depth": 0, "max": cfg.llm.max_queue}
    if slots is not None:
        _with_slots(backends, entries, slots, everyone)
        queue = _queue(slots)
    doc: dict[str, Any] = {
        "master": dict(master),
        "workers": rows,
        "other_workers": other_rows,
        "backends": backends,
        "queue": queue,
        "totals": totals,
        "store": _store(everyone),
    }
    if embed_slots is not None:
        _with_embed(backends, entries, embed_slots, everyone)
        doc["embed_queue"] = _queue(embed_slots)
    if discovery:  # absent without a dns table: the document stays as it was
        doc["discovery"] = [dict(d) for d in discovery]
    if fleet is not None:  # absent unless the slots are shared (a Redis store)
        _with_fleet(doc, backends, entries, fleet)
    return doc


def _with_fleet(
    doc: dict[str, Any],
    backends: list[dict[str, Any]],
    entries: Sequence[Entry],
    fleet: Mapping[str, Any],
) -> None:
    """The fleet's figures on each backend row (see :func:`aggregate_status`)."""
    doc["fleet"] = {k: fleet.get(k) for k in ("host", "ttl_s", "error")}
    pools = {(p["class"], p["backend"]): p for p in fleet.get("pools") or ()}
    for row, e in zip(backends, entries, strict=True):
        for kind, target in (
            (proto.SLOT_CLASS_CHAT, row),
            (proto.SLOT_CLASS_EMBED, row.get("embed")),
        ):
            p = pools.get((kind, e.key))
            if p is not None and isinstance(target, dict):
                target["fleet"] = {
                    "in_flight": p["fleet_in_flight"],
                    "held": p["fleet_held"],
                    "hosts": p["hosts"],
                    "here_held": p["held"],
                    "here_allowed": p["allowed"],
                }


def _store(workers: Sequence[WorkerSnapshot]) -> dict[str, Any]:
    """The session store's health as the workers see it: ``healthy`` False while one of them
    failed its last operation, with the workers (slots) that did and the latest error."""
    failing = [w for w in workers if w.stats.get("store_healthy") is False]
    return {
        "healthy": not failing,
        "failing_workers": sorted(w.id for w in failing),
        "error": str(failing[0].stats.get("store_error") or "") if failing else "",
        "failures_total": sum(_number(w.stats.get("store_failures_total", 0)) for w in workers),
    }
