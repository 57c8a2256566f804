"""``GET /metrics``: the whole daemon's figures in the Prometheus text format (version 0.0.4).

Only the master sees every worker, and whichever worker a scrape lands on must answer for
the whole daemon. So the answering worker asks the master over its link
(``metrics_request {rid}`` -> ``metrics {rid, data}``): the master sums the workers' last
``stats`` reports, the exited workers' counters and its own figures
(:mod:`chatd.metrics_aggregate`); the worker renders ``data`` with :func:`render`, through
:class:`chatd.metrics_text.Exposition`. Both sides are pure.

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

from collections.abc import Mapping
from typing import Any

from chatd import metrics_fleet, metrics_http, metrics_stages
from chatd.metrics_aggregate import NOTICE_RESULTS, Retired, aggregate, number
from chatd.metrics_text import Exposition, escape_label, format_value
from chatd.proto.control import HANDOFF_RESULTS

__all__ = ["CONTENT_TYPE", "Retired", "aggregate", "escape_label", "format_value", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


FINAL_ERROR_CODES = (
    *("busy", "llm_timeout", "llm_unavailable", "llm_error", "internal"),
    "store_unavailable",
)
"""Codes of the errors answering a message: always exported, 0 until they happen. All but
``store_unavailable`` end the message; that one says it was not stored (the client resends)."""


def render(data: Mapping[str, Any]) -> str:
    """The ``/metrics`` body for the figures of :func:`aggregate` (missing ones count 0)."""
    out = Exposition()
    n = number
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
    _store_writer(out, data.get("store_writer"))
    return "\n".join(out.lines) + "\n"


_WRITER_COUNTERS = (
    ("commits", "Batches the SQLite store's writer committed (since it started)."),
    ("rows", "Events the SQLite store's writer committed (since it started)."),
    ("checkpoints", "WAL checkpoints the SQLite store's writer ran (since it started)."),
    ("checkpoint_restarts", "Checkpoints that started the WAL over (since it started)."),
    ("checkpoint_failures", "Checkpoints that failed (since it started)."),
)


def _store_writer(out: Exposition, writer: Any) -> None:
    """The SQLite store writer's series (``store_writer``: the master's
    :meth:`chatd.master.storewriter.StoreWriter.snapshot`, its figures as the writer last
    sent them, every second); none without a writer (Redis, or ``sqlite_writer = false``)."""
    if not isinstance(writer, Mapping):
        return
    store = writer.get("store")
    fig: Mapping[str, Any] = store if isinstance(store, Mapping) else {}
    n = number
    out.single(
        "chatd_store_writer_up",
        "gauge",
        "1 while the SQLite store's writer process runs, 0 while the master restarts it.",
        1.0 if writer.get("pid") else 0.0,
    )
    out.single(
        "chatd_store_writer_restarts_total",
        "counter",
        "Times the master started the SQLite store's writer again after it died.",
        n(writer.get("restarts")),
    )
    for key, help_text in _WRITER_COUNTERS:
        out.single(f"chatd_store_writer_{key}_total", "counter", help_text, n(fig.get(key)))
    # Two gauges, not one with a quantile label: promtool allows that label on summaries only,
    # and the writer keeps percentiles of its recent commits, no sum or count (not a summary).
    for name, key, which in (
        ("median", "commit_p50_ms", "The median"),
        ("p99", "commit_p99_ms", "The 99th percentile"),
    ):
        out.single(
            f"chatd_store_writer_commit_{name}_seconds",
            "gauge",
            f"{which} of the SQLite store writer's commit time over its recent batches.",
            n(fig.get(key)) / 1000.0,
        )
    out.single(
        "chatd_store_writer_wal_pages",
        "gauge",
        "Pages in the SQLite file's WAL at the writer's last checkpoint.",
        n(fig.get("wal_pages")),
    )


def _discovery(out: Exposition, tables: Any) -> None:
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


def _embed(out: Exposition, data: Mapping[str, Any]) -> None:
    """The embed class's slot series: the chat ones' twins, named ``chatd_embed_*`` (figures
    from ``aggregate(...)["embed"]``; missing ones count 0)."""
    n = number
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
    out: Exposition,
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
            out.sample(name, number(k.get(field_)), {"key": str(k.get("key") or "none")})
        out.sample(name, number(other.get(field_)), {"key": "other"})
