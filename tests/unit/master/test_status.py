"""chatd.master.status.aggregate_status: the `chatctl status --json` document from workers."""

from __future__ import annotations

from typing import Any

from chatd.config import BackendConfig, Config, LLMConfig
from chatd.master.slotgrant import Granter
from chatd.master.status import WorkerSnapshot, aggregate_status
from chatd.stats import Histogram

CFG = Config(
    llm=LLMConfig(
        backends=(BackendConfig(url="http://a:1"), BackendConfig(url="http://b:2", api="openai"))
    )
)


def snap(wid: int, **stats: Any) -> WorkerSnapshot:
    return WorkerSnapshot(
        id=wid,
        pid=100 + wid,
        generation=1,
        state="ready",
        uptime_s=1.23456,
        restarts=0,
        rss_bytes=1000,
        cpu_percent=1.234,
        last_heartbeat_s=0.5,
        stats={"t": "stats", **stats},
    )


def status(*workers: WorkerSnapshot, **kw: Any) -> dict[str, Any]:
    return aggregate_status(master={"pid": 1}, workers=workers, cfg=CFG, restarts_total=2, **kw)


def test_rows_and_totals() -> None:
    """Rows carry the master's facts and the reported counters; totals add them up."""
    st = status(
        snap(
            1, connections=2, messages_total=10, errors_total=1, errors_by_code={"llm_timeout": 1}
        ),
        snap(2, connections=3, messages_total=5, extra="kept", pid=999),
        retired={"messages_total": 7, "errors_total": 2},
    )
    one, two = st["workers"]
    assert one["uptime_s"] == 1.235 and one["cpu_percent"] == 1.2 and "t" not in one
    assert two["extra"] == "kept" and two["pid"] == 102  # the master's facts win
    totals = st["totals"]
    assert (totals["connections"], totals["messages_total"], totals["errors_total"]) == (5, 22, 3)
    assert totals["errors_by_code"] == {"llm_timeout": 1}
    assert totals["worker_restarts_total"] == 2
    assert st["queue"] == {"depth": 0, "max": 512}


def test_malformed_reports_count_as_zero() -> None:
    """A worker that reports nonsense cannot break status."""
    st = status(
        snap(1, connections="many", messages_total=True, errors_by_code=[1], latency_ms="fast"),
        snap(2, backends="none", latency_buckets=[["x", 1]], errors_by_code={"a": "b"}),
    )
    assert st["workers"][0]["connections"] == 0
    assert st["totals"]["latency_ms"] == {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    assert st["totals"]["errors_by_code"] == {"a": 0}


def test_latency_is_merged_from_histograms() -> None:
    """Workers' histograms merge exactly; bare percentiles give an upper bound."""
    fast, slow = Histogram(), Histogram()
    for _ in range(99):
        fast.observe(10.0)
    slow.observe(1000.0)
    st = status(
        snap(1, latency_buckets=sorted(fast.counts.items())),
        snap(2, latency_buckets=sorted(slow.counts.items())),
    )
    merged = Histogram()
    merged.merge(fast.counts)
    merged.merge(slow.counts)
    assert st["totals"]["latency_ms"]["p50"] == merged.percentile(50)
    assert st["totals"]["latency_ms"]["p99"] == merged.percentile(99)
    bound = status(snap(1, latency_ms={"p50": 5, "p95": 9, "p99": 20}), snap(2))
    assert bound["totals"]["latency_ms"] == {"p50": 5.0, "p95": 9.0, "p99": 20.0}


def test_backend_health_and_load() -> None:
    """A backend is unknown until reported, healthy only if every report says so."""
    st = status(
        snap(1, backends=[{"url": "http://a:1/", "healthy": True, "in_flight": 2}]),
        snap(2, backends=[{"url": "http://a:1", "healthy": False, "in_flight": 1}, "junk"]),
    )
    a, b = st["backends"]
    assert (a["healthy"], a["in_flight"], a["max_parallel"]) == (False, 3, 4)
    assert (b["url"], b["api"], b["healthy"], b["in_flight"]) == ("http://b:2", "openai", None, 0)


def test_other_workers_are_listed_and_counted() -> None:
    """Workers serving no slot (a reload's new one, old ones draining) appear as
    other_workers and count in the totals, so nothing dips during a reload."""
    draining = WorkerSnapshot(
        id=1,
        pid=99,
        generation=1,
        state="draining",
        uptime_s=9.0,
        restarts=0,
        rss_bytes=0,
        cpu_percent=0.0,
        last_heartbeat_s=0.1,
        msg_per_s=2.5,
        stats={"connections": 4, "messages_total": 40},
    )
    st = status(snap(1, connections=1, messages_total=10), others=[draining])
    assert [(w["pid"], w["state"]) for w in st["other_workers"]] == [(99, "draining")]
    assert st["totals"]["connections"] == 5 and st["totals"]["messages_total"] == 50
    assert st["totals"]["msg_per_s"] == 2.5 and st["other_workers"][0]["msg_per_s"] == 2.5


def test_slots_and_queue_come_from_the_master_granter() -> None:
    """With the master's granter: in_flight is what it granted, in_use what workers report,
    healthy its verdict once reported, and the queue is the daemon-wide one."""
    g = Granter([("http://a:1", 4), ("http://b:2", 4)], max_queue=7)
    g.acquire(101, 1, ["http://a:1"], 0.0)
    g.acquire(101, 2, ["http://a:1"], 0.0)
    g.report_health("http://a:1", True)
    used = [{"url": "http://a:1", "in_flight": 1, "held": 2, "healthy": False}]
    st = status(snap(1, backends=used), slots=g.statistics())
    a, b = st["backends"]
    assert (a["in_flight"], a["in_use"], a["healthy"], a["max_parallel"]) == (2, 1, True, 4)
    assert (b["in_flight"], b["healthy"]) == (0, None)  # no report yet: unknown
    assert st["queue"] == {"depth": 0, "max": 7}


def backends_of(st: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(in_flight, in_use, leased_idle) of each backend of a status document."""
    return [(b["in_flight"], b["in_use"], b["leased_idle"]) for b in st["backends"]]


def test_an_idle_leased_slot_is_not_in_use() -> None:
    """Right after a chat, the worker keeps its slot leased for its next message: the slot is
    still granted (in_flight 1) but nothing runs on it: 0 in use, 1 leased idle."""
    g = Granter([("http://a:1", 2), ("http://b:2", 2)], max_queue=7)
    g.acquire(101, 1, ["http://a:1"], 0.0)  # granted with a lease: nobody waits
    kept = [{"url": "http://a:1", "in_flight": 0, "held": 1}, {"url": "http://b:2"}]
    st = status(snap(1, backends=kept), slots=g.statistics())
    assert backends_of(st) == [(1, 0, 1), (0, 0, 0)]


def test_slots_granted_since_the_report_are_in_use() -> None:
    """A grant answers a request that waits for it: in use at once, before the worker's next
    report; without any report, every slot held counts in use."""
    g = Granter([("http://a:1", 4), ("http://b:2", 4)], max_queue=7)
    for rid in (1, 2):
        g.acquire(101, rid, ["http://a:1"], 0.0)
    g.acquire(102, 1, ["http://b:2"], 0.0)
    before = [{"url": "http://a:1", "in_flight": 0, "held": 0}]
    st = status(snap(1, backends=before), snap(2), slots=g.statistics())
    assert backends_of(st) == [(2, 2, 0), (1, 1, 0)]


def test_slots_given_back_since_the_report_leave_the_idle_ones_first() -> None:
    """What a worker gives back unasked is what it kept unused (its trim, a recall): a worker
    that reported 1 of 2 slots idle and then gave one back has nothing idle left."""
    g = Granter([("http://a:1", 4), ("http://b:2", 4)], max_queue=7)
    for rid in (1, 2):
        g.acquire(101, rid, ["http://a:1"], 0.0)
    report = [{"url": "http://a:1", "in_flight": 1, "held": 2}]
    st = status(snap(1, backends=report), slots=g.statistics())
    assert backends_of(st)[0] == (2, 1, 1)
    g.release(101, "http://a:1")
    st = status(snap(1, backends=report), slots=g.statistics())
    assert backends_of(st)[0] == (1, 1, 0)
    g.release(101, "http://a:1")
    st = status(snap(1, backends=report), slots=g.statistics())
    assert backends_of(st)[0] == (0, 0, 0)


def test_leased_idle_adds_up_over_workers_and_survives_nonsense() -> None:
    """Each worker's slots are split by its own report (a report never moves another
    worker's slots); malformed reports count as no report."""
    g = Granter([("http://a:1", 4), ("http://b:2", 4)], max_queue=7)
    g.acquire(101, 1, ["http://a:1"], 0.0)
    g.acquire(102, 1, ["http://a:1"], 0.0)
    g.acquire(103, 1, ["http://a:1"], 0.0)
    st = status(
        snap(1, backends=[{"url": "http://a:1", "in_flight": 0, "held": 1}]),
        snap(2, backends=[{"url": "http://a:1", "in_flight": 0, "held": 5}, "junk"]),
        snap(3, backends=[{"url": "http://a:1", "in_flight": "x", "held": True}]),
        slots=g.statistics(),
    )
    assert backends_of(st)[0] == (3, 1, 2)
