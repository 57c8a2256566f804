"""What a worker reports to the master every second: the ``stats`` message.

The master keeps each worker's last report: ``chatctl status`` and ``/metrics`` are built from
them (:mod:`chatd.master.status`, :mod:`chatd.metrics`). Counters only grow; histograms are
sent as bucket counts so the master can merge them.
"""

from __future__ import annotations

from typing import Any

from chatd.config import Config
from chatd.store.base import Store
from chatd.worker.generation import Hub
from chatd.worker.session import WorkerState
from chatd.worker.slots import MasterSlots


def stats_message(
    cfg: Config,
    state: WorkerState,
    hub: Hub,
    store: Store,
    slots: MasterSlots,
    embed_slots: MasterSlots | None = None,
) -> dict[str, Any]:
    """The ``stats`` message a worker sends to the master every second: its counters, latency
    histograms, store and backends as it sees them (read by ``chatctl status`` and /metrics).
    ``slots`` are the chat class's (``queue_depth``, ``backends``); ``embed_slots``, the embed
    class's, add ``embed_queue_depth`` and ``embed_backends`` (``{url, in_flight, held}``).
    The backends are the slots' (a dns table's addresses: :mod:`chatd.backendtable`): the live
    ones, and the retired ones still holding slots (draining). With a Redis store, the
    cross-host notices of stored replies: ``notices_published_total``,
    ``notices_received_total``, ``notices_lost_total``."""
    stats = hub.stats
    figures = store.statistics()
    shown = [
        i
        for i in range(len(slots.backends))
        if slots.live[i] or slots.held[i] or (embed_slots is not None and embed_slots.held[i])
    ]
    report: dict[str, Any] = {
        "t": "stats",
        "connections": len(state.connections),
        "connections_total": state.connections_total,
        "messages_total": stats.messages_total,
        "replies_total": stats.replies_total,
        "takeovers_total": stats.takeovers_total,
        "errors_total": sum(stats.errors_by_code.values()),
        "errors_by_code": dict(stats.errors_by_code),
        "bad_frames_total": state.bad_frames_total,
        "slow_closes_total": state.budget.overflows,
        "outbound_bytes": state.budget.total,
        "in_flight": hub.in_flight,
        "queue_depth": slots.queue_depth,
        "latency_ms": stats.latency.summary(),
        "latency_buckets": sorted(stats.latency.counts.items()),
        "latency_sum_ms": stats.latency.total_ms,
        "ttft_ms": stats.ttft.summary(),
        "ttft_buckets": sorted(stats.ttft.counts.items()),
        "ttft_sum_ms": stats.ttft.total_ms,
        "store": {
            "commits": figures.commits,
            "commit_p50_ms": figures.commit_p50_ms,
            "commit_p99_ms": figures.commit_p99_ms,
            "busy_retries": figures.busy_retries,
            "lock_waits": figures.lock_waits,
        },
        # The store's health (chatctl status, /metrics: chatd_store_up).
        "store_healthy": store.health.healthy,
        "store_failures_total": store.health.failures_total,
        "store_error": store.health.last_error,
        "backends": [
            {
                "url": slots.backends[i].url,
                "healthy": slots.healthy[i],
                "in_flight": slots.in_flight[i],
                "held": slots.held[i],  # in use, or leased and kept unused
            }
            for i in shown
        ],
        "draining": state.draining,
    }
    notices = hub.notices  # across hosts (a Redis store): chatd.store.redis_notify
    if notices is not None:
        report["notices_published_total"] = notices.published_total
        report["notices_received_total"] = notices.received_total
        report["notices_lost_total"] = notices.lost_total
    if embed_slots is not None:
        report["embed_queue_depth"] = embed_slots.queue_depth
        report["embed_backends"] = [
            {
                "url": embed_slots.backends[i].url,
                "in_flight": embed_slots.in_flight[i],
                "held": embed_slots.held[i],
            }
            for i in shown
        ]
    return report
