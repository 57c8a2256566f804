"""``GET /metrics``: the whole daemon's figures in the Prometheus text format (version 0.0.4).

Only the master sees every worker, and whichever worker a scrape lands on must answer for
the whole daemon. So the answering worker asks the master over its link
(``metrics_request {rid}`` -> ``metrics {rid, data}``): the master sums the workers' last
``stats`` reports (sent every second, so figures are up to a second old), adds the counters
of the workers that have exited (:class:`Retired`, so counters never go down) and its own
figures (slots, queue, restarts) with :func:`aggregate`; the worker renders ``data`` with
:func:`render`. Both functions are pure.

Slot classes: the series of the slots and their queue (``chatd_queue_*``, ``chatd_backend_*``
but ``healthy``, ``chatd_slot_*``, ``chatd_key_*``) are those of the chat class, as they were
before classes existed (dashboards and alerts depend on them); the embed class has the same
series named ``chatd_embed_*`` (``chatd_embed_queue_depth``, ``chatd_embed_backend_in_use``,
...). A backend's health is one for both classes.

Why not ``prometheus_client``: its registries live in one process; its multiprocess mode
shares values through mmap files in a directory that must be wiped at start and cleaned of
dead workers, puts a file write on the hot path of every observation, and still could not
show the master's own figures (slots, queue, restarts), which live in no worker. The
exposition format is small, so it is written here by hand: ``# HELP``/``# TYPE`` lines, label
values escaped, histograms as cumulative ``_bucket{le}`` (ending with ``+Inf``), ``_sum`` and
``_count``, in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from chatd import metrics_fleet, metrics_http, metrics_stages
from chatd.metrics_http import HttpFigures
from chatd.metrics_stages import StageFigures
from chatd.proto.control import HANDOFF_KEYS, HANDOFF_RESULTS
from chatd.stats import EXACT_EDGES_MS, GranterStats, Histogram, backend_keys

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BOUNDS_MS = EXACT_EDGES_MS
"""``le`` bounds of the latency histograms, in ms (exported in seconds): Prometheus' defaults,
extended to the minutes a model load or a long reply can take. They are bucket edges of
:class:`chatd.stats.Histogram`, so each ``le`` bucket counts exactly the observations <= it."""

FINAL_ERROR_CODES = (
    *("busy", "llm_timeout", "llm_unavailable", "llm_error", "internal"),
    "store_unavailable",
)
"""Codes of the errors answering a message: always exported, 0 until they happen. All but
``store_unavailable`` end the message; that one says it was not stored (the client resends)."""

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


def _number(value: Any) -> float:
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
        counters[key] = counters.get(key, 0) + _number(stats.get(key, 0))
    codes = stats.get("errors_by_code")
    if isinstance(codes, Mapping):
        for code, n in codes.items():
            errors[str(code)] = errors.get(str(code), 0) + _number(n)
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
        connections += _number(stats.get("connections", 0))
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
        in_use[key] = in_use.get(key, 0) + _number(b.get("in_flight", 0))


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


def escape_label(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote, newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, ``+Inf``/``-Inf``/``NaN`` spelled out."""
    if isinstance(value, int) or (math.isfinite(value) and value == int(value)):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Text:
    """The exposition being written (:class:`chatd.metrics_http.Writer`): a family's HELP and
    TYPE lines come once, before its first sample."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._families: set[str] = set()

    def family(self, name: str, kind: str, help_text: str) -> None:
        if name in self._families:
            return
        self._families.add(name)
        escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines.append(f"# HELP {name} {escaped}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        if labels:
            inner = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            name = f"{name}{{{inner}}}"
        self.lines.append(f"{name} {format_value(value)}")

    def single(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text)
        self.sample(name, value)

    def histogram(
        self, name: str, help_text: str, wire: Any, labels: Mapping[str, str] | None = None
    ) -> None:
        """A histogram in seconds from the wire form ``{"counts"|"buckets": [[bucket, n]...],
        "sum_ms"}``; ``labels`` for one of several series of the family."""
        wire = wire if isinstance(wire, Mapping) else {}
        h = Histogram.from_wire(wire.get("counts", wire.get("buckets")), wire.get("sum_ms"))
        self.family(name, "histogram", help_text)
        base = dict(labels or {})
        for bound_ms, n in h.cumulative(LATENCY_BOUNDS_MS):
            self.sample(f"{name}_bucket", n, {**base, "le": format_value(bound_ms / 1000.0)})
        self.sample(f"{name}_bucket", h.count, {**base, "le": "+Inf"})
        self.sample(f"{name}_sum", h.total_ms / 1000.0, base)
        self.sample(f"{name}_count", h.count, base)


def render(data: Mapping[str, Any]) -> str:
    """The ``/metrics`` body for the figures of :func:`aggregate` (missing ones count 0)."""
    out = _Text()
    n = _number
    out.family("chatd_workers", "gauge", "Worker processes, by state.")
    for state, count in sorted((data.get("workers") or {}).items()):
        out.sample("chatd_workers", n(count), {"state": str(state)})
    out.single(
        "chatd_connections", "gauge", "Open WebSocket connections.", n(data.get("connections"))
    )
    out.single(
        "chatd_store_up",
        "gauge",
        "1 when every worker's session store works, 0 while one fails (its last operation).",
        n(data.get("store_up", 1)),
    )
    for key, help_text in (
        ("connections_total", "WebSocket connections accepted."),
        ("messages_total", "User messages accepted (stored and acknowledged; not duplicates)."),
        ("replies_total", "Replies stored (complete or cancelled)."),
        ("bad_frames_total", "Client frames refused as malformed."),
        (
            "slow_closes_total",
            "Connections closed (1008) for leaving more than max_outbound_bytes unread.",
        ),
        ("store_failures_total", "Session store operations that failed (reads and writes)."),
    ):
        out.single(f"chatd_{key}", "counter", help_text, n(data.get(key)))
    for name, key, results, help_text in (
        (
            "chatd_ws_handoffs_total",
            "handoff",
            HANDOFF_RESULTS,
            "Open WebSockets handed between workers at reloads, recycles and scale-downs: "
            "moved (by the old worker), adopted (by the new one), fell_back (closed with 1001 "
            "instead), deferred (not idle when offered: tried again), aborted, refused (by the "
            "new one).",
        ),
        (
            "chatd_stored_notices_total",
            "notices",
            NOTICE_RESULTS,
            "Notices of replies stored with no client of their session on the worker that "
            "stored them, through Redis to the workers of every host watching the session (the "
            "cross-host live handoff): published, received (by a watcher), lost (not "
            "published: the client gets the reply at its next resume). 0 with SQLite.",
        ),
    ):  # counters by result, reported by workers as ``<key>_<result>_total``
        out.family(name, "counter", help_text)
        for result in results:
            out.sample(name, n(data.get(f"{key}_{result}_total")), {"result": result})
    out.family(
        "chatd_errors_total",
        "counter",
        "Messages answered with an error, by code (store_unavailable: not stored, resent).",
    )
    errors = {code: 0.0 for code in FINAL_ERROR_CODES}
    errors.update({str(k): n(v) for k, v in (data.get("errors_by_code") or {}).items()})
    for code, count in sorted(errors.items()):
        out.sample("chatd_errors_total", count, {"code": code})
    out.histogram(
        "chatd_time_to_first_token_seconds",
        "From the request to the backend to its first token.",
        data.get("ttft"),
    )
    out.histogram(
        "chatd_reply_latency_seconds",
        "From the message accepted to its reply stored.",
        data.get("latency"),
    )
    queue = data.get("queue") or {}
    out.single(
        "chatd_queue_depth", "gauge", "Messages waiting for an LLM slot.", n(queue.get("depth"))
    )
    out.single(
        "chatd_queue_max",
        "gauge",
        "Messages that may wait for a slot ([llm] max_queue).",
        n(queue.get("max")),
    )
    _keys(out, data)
    backends = [b for b in data.get("backends") or () if isinstance(b, Mapping)]
    for key, kind, help_text in (
        (
            "in_flight",
            "gauge",
            "Slots of the backend granted to workers: requests in flight, and for up to 2 s "
            "after its last use a slot a worker keeps leased for its next request.",
        ),
        (
            "in_use",
            "gauge",
            "Requests running on the backend, as the workers last reported (up to 1 s old).",
        ),
        ("max_parallel", "gauge", "Slots of the backend, all workers together."),
        ("healthy", "gauge", "1 if the latest health check of the backend passed, else 0."),
    ):
        out.family(f"chatd_backend_{key}", kind, help_text)
        for b in backends:
            value = b.get(key)
            if key == "healthy":
                if not isinstance(value, bool):
                    continue  # not checked yet: no sample rather than a guess
                value = int(value)
            out.sample(f"chatd_backend_{key}", n(value), {"backend": str(b.get("backend"))})
    slots = data.get("slots") or {}
    out.single(
        "chatd_slot_grants_total", "counter", "LLM slots granted.", n(slots.get("granted_total"))
    )
    out.family(
        "chatd_slot_refusals_total",
        "counter",
        "LLM slot requests refused, by reason (key_busy: the client's max_queued_per_key).",
    )
    for reason in ("busy", "key_busy", "unavailable"):
        out.sample(
            "chatd_slot_refusals_total", n(slots.get(f"refused_{reason}_total")), {"reason": reason}
        )
    _discovery(out, data.get("discovery"))
    embed = data.get("embed")
    _embed(out, embed if isinstance(embed, Mapping) else {})
    out.family(
        "chatd_worker_resident_memory_bytes", "gauge", "RSS of each worker (sampled every second)."
    )
    for m in data.get("memory") or ():
        if isinstance(m, Mapping):
            labels = {"slot": str(m.get("slot")), "generation": str(m.get("generation"))}
            out.sample("chatd_worker_resident_memory_bytes", n(m.get("rss")), labels)
    out.single(
        "chatd_worker_memory_limit_bytes",
        "gauge",
        "[server] max_worker_rss_mb in bytes: a worker above it is recycled (0 = off).",
        n(data.get("memory_limit")),
    )
    out.single(
        "chatd_worker_restarts_total",
        "counter",
        "Workers replaced since the master started.",
        n(data.get("worker_restarts_total")),
    )
    metrics_http.render(out, data.get("http"))
    metrics_stages.render(out, data.get("stages"))
    metrics_fleet.render(out, data.get("fleet"))
    return "\n".join(out.lines) + "\n"


def _discovery(out: _Text, tables: Any) -> None:
    """The dns tables' series (``discovery``: :meth:`chatd.master.discovery.Discovery.status`,
    added by the master), labelled by the table's URL; none without a dns table."""
    rows = [d for d in tables or () if isinstance(d, Mapping) and isinstance(d.get("url"), str)]
    if not rows:
        return
    out.family(
        "chatd_backend_addresses",
        "gauge",
        'Addresses of a discover = "dns" backend table, each a backend (absent before the '
        "first answer).",
    )
    for d in rows:
        if isinstance(d.get("addresses"), list):
            out.sample("chatd_backend_addresses", len(d["addresses"]), {"table": d["url"]})
    out.family(
        "chatd_backend_resolution_failing",
        "gauge",
        '1 while the name of a discover = "dns" backend table cannot be resolved (its last '
        "addresses are kept), else 0.",
    )
    for d in rows:
        failing = int(bool(d.get("error")))
        out.sample("chatd_backend_resolution_failing", failing, {"table": d["url"]})


def _embed(out: _Text, data: Mapping[str, Any]) -> None:
    """The embed class's slot series: the chat ones' twins, named ``chatd_embed_*`` (figures
    from ``aggregate(...)["embed"]``; missing ones count 0)."""
    n = _number
    queue = data.get("queue") or {}
    out.single(
        "chatd_embed_queue_depth",
        "gauge",
        "Embedding requests waiting for an embed slot.",
        n(queue.get("depth")),
    )
    out.single(
        "chatd_embed_queue_max",
        "gauge",
        "Embedding requests that may wait for an embed slot ([llm] max_queue, a queue of its own).",
        n(queue.get("max")),
    )
    _keys(
        out,
        data,
        "chatd_embed_key_",
        (
            "Embedding requests of the client waiting for an embed slot (the busiest clients).",
            "Embed slots counted against the client: granted to it, not leased.",
        ),
    )
    backends = [b for b in data.get("backends") or () if isinstance(b, Mapping)]
    for key, help_text in (
        (
            "in_flight",
            "Embed slots of the backend granted to workers: requests in flight, and for up to "
            "2 s after its last use a slot a worker keeps leased for its next request.",
        ),
        (
            "in_use",
            "Embedding requests running on the backend, as the workers last reported (up to "
            "1 s old).",
        ),
        ("max_parallel", "Embed slots of the backend, all workers together (max_parallel_embed)."),
    ):
        name = f"chatd_embed_backend_{key}"
        out.family(name, "gauge", help_text)
        for b in backends:
            out.sample(name, n(b.get(key)), {"backend": str(b.get("backend"))})
    slots = data.get("slots") or {}
    out.single(
        "chatd_embed_slot_grants_total",
        "counter",
        "Embed slots granted.",
        n(slots.get("granted_total")),
    )
    out.family(
        "chatd_embed_slot_refusals_total",
        "counter",
        "Embed slot requests refused, by reason (key_busy: the client's max_queued_per_key).",
    )
    for reason in ("busy", "key_busy", "unavailable"):
        out.sample(
            "chatd_embed_slot_refusals_total",
            n(slots.get(f"refused_{reason}_total")),
            {"reason": reason},
        )


def _keys(
    out: _Text,
    data: Mapping[str, Any],
    prefix: str = "chatd_key_",
    helps: tuple[str, str] = (
        "Messages of the client waiting for an LLM slot (the busiest clients).",
        "LLM slots counted against the client: granted to it, not leased.",
    ),
) -> None:
    """``chatd_key_queued`` and ``chatd_key_in_flight`` (or ``prefix`` + ``queued``,
    ``in_flight``, with the help texts ``helps``): the busiest clients (at most 10) by key (a
    token's hash or an address, as the granter has it; ``none`` for the empty key of
    takeovers), and ``key="other"`` summing the rest, so at most 11 series each."""
    rows = [k for k in data.get("keys") or () if isinstance(k, Mapping)][:10]
    other = data.get("keys_other")
    other = other if isinstance(other, Mapping) else {}
    for field_, help_text in zip(("queued", "in_flight"), helps, strict=True):
        name = f"{prefix}{field_}"
        out.family(name, "gauge", help_text)
        for k in rows:
            out.sample(name, _number(k.get(field_)), {"key": str(k.get("key") or "none")})
        out.sample(name, _number(other.get(field_)), {"key": "other"})
