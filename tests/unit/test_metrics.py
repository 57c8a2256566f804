"""/metrics: the daemon-wide aggregate and its Prometheus text, as pure functions."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.master.slotgrant import Granter
from chatd.metrics import Retired, aggregate, escape_label, format_value, render
from chatd.stats import Histogram
from tests.promtext import parse


def report(messages: int, latencies_ms: list[float], **extra: Any) -> dict[str, Any]:
    """A worker's ``stats`` report, as chatd.worker.main sends it."""
    h = Histogram()
    for ms in latencies_ms:
        h.observe(ms)
    return {
        "t": "stats",
        "messages_total": messages,
        "replies_total": len(latencies_ms),
        "latency_buckets": sorted(h.counts.items()),
        "latency_sum_ms": h.total_ms,
        "ttft_buckets": sorted(h.counts.items()),
        "ttft_sum_ms": h.total_ms,
        **extra,
    }


def granter() -> Granter:
    g = Granter([("http://a:1", 3), ('http://we"ird\\', 1)], max_queue=4)
    g.acquire(1, 1, ["http://a:1"], 0.0)
    g.acquire(1, 2, ['http://we"ird\\'], 0.0)
    g.acquire(1, 3, ['http://we"ird\\'], 0.0)  # queued
    g.report_health("http://a:1", True)
    return g


def test_counters_are_summed_with_the_retired_workers_and_histograms_merged() -> None:
    retired = Retired()
    retired.fold(report(5, [3.0], errors_by_code={"busy": 2}, connections=9))
    live = [
        ("ready", report(10, [40.0], connections=3, errors_by_code={"busy": 1, "llm_error": 1})),
        ("draining", report(1, [2000.0], connections=1)),
    ]
    data = aggregate(live, retired, granter().statistics(), restarts_total=2)
    assert data["messages_total"] == 16 and data["replies_total"] == 3
    assert data["connections"] == 4  # a gauge: the live workers only
    assert data["errors_by_code"] == {"busy": 3, "llm_error": 1}
    assert data["workers"] == {"ready": 1, "draining": 1}
    fams = parse(render(data))
    assert fams["chatd_messages_total"].type == "counter"
    assert fams["chatd_messages_total"].value() == 16
    assert fams["chatd_connections"].value() == 4
    assert fams["chatd_errors_total"].value(code="busy") == 3
    assert fams["chatd_errors_total"].value(code="internal") == 0  # known codes start at 0
    assert fams["chatd_worker_restarts_total"].value() == 2
    assert fams["chatd_workers"].value(state="draining") == 1
    latency = fams["chatd_reply_latency_seconds"]
    assert latency.type == "histogram"
    buckets = {lab["le"]: v for n, lab, v in latency.samples if n.endswith("_bucket")}
    assert buckets["0.005"] == 1 and buckets["0.05"] == 2 and buckets["2.5"] == 3
    assert buckets["+Inf"] == 3
    (total,) = [v for n, _, v in latency.samples if n.endswith("_sum")]
    assert total == pytest.approx(2.043)
    assert "chatd_time_to_first_token_seconds" in fams


def test_slots_queue_and_backends_come_from_the_granter() -> None:
    used = [{"url": "http://a:1/", "in_flight": 1, "held": 2}]
    live = [("ready", {"backends": used}), ("ready", {"backends": used})]
    data = aggregate(live, Retired(), granter().statistics(), restarts_total=0)
    fams = parse(render(data))
    assert fams["chatd_backend_in_use"].value(backend="http://a:1") == 2  # workers' reports
    assert fams["chatd_queue_depth"].value() == 1
    assert fams["chatd_queue_max"].value() == 4
    assert fams["chatd_backend_in_flight"].value(backend="http://a:1") == 1
    assert fams["chatd_backend_in_flight"].value(backend='http://we"ird\\') == 1
    assert fams["chatd_backend_max_parallel"].value(backend="http://a:1") == 3
    assert fams["chatd_backend_healthy"].value(backend="http://a:1") == 1
    # Not reported yet: no sample, rather than a guess.
    assert [lab for _, lab, _ in fams["chatd_backend_healthy"].samples] == [
        {"backend": "http://a:1"}
    ]
    assert fams["chatd_slot_grants_total"].value() == 2
    assert fams["chatd_slot_refusals_total"].value(reason="busy") == 0


def test_cross_host_notices_are_summed_with_the_retired_workers() -> None:
    retired = Retired()
    retired.fold(report(0, [], notices_published_total=2, notices_lost_total=1))
    live = [("ready", report(0, [], notices_published_total=3, notices_received_total=4))]
    fams = parse(render(aggregate(live, retired, granter().statistics(), restarts_total=0)))
    notices = fams["chatd_stored_notices_total"]
    assert notices.type == "counter"
    assert notices.value(result="published") == 5
    assert notices.value(result="received") == 4
    assert notices.value(result="lost") == 1
    assert parse(render({}))["chatd_stored_notices_total"].value(result="lost") == 0  # SQLite


def test_the_store_writer_series_come_from_its_last_figures() -> None:
    """The master's snapshot of the SQLite store writer (its figures as it last sent them)
    becomes chatd_store_writer_*; none without a writer; a writer being restarted is down,
    with the figures of none yet; malformed figures count 0."""
    figures = {
        "commits": 120,
        "rows": 300,
        "commit_p50_ms": 0.09,
        "commit_p99_ms": 0.42,
        "busy_retries": 0,
        "lock_waits": 0,
        "checkpoints": 7,
        "checkpoint_restarts": 2,
        "checkpoint_failures": 1,
        "wal_pages": 812,
    }
    writer = {"pid": 4242, "path": "/var/lib/chatd/sessions.db", "restarts": 3, "store": figures}
    fams = parse(render({"store_writer": writer}))
    assert fams["chatd_store_writer_up"].value() == 1
    assert fams["chatd_store_writer_restarts_total"].type == "counter"
    assert fams["chatd_store_writer_restarts_total"].value() == 3
    assert fams["chatd_store_writer_commits_total"].value() == 120
    assert fams["chatd_store_writer_rows_total"].value() == 300
    assert fams["chatd_store_writer_checkpoints_total"].value() == 7
    assert fams["chatd_store_writer_checkpoint_restarts_total"].value() == 2
    assert fams["chatd_store_writer_checkpoint_failures_total"].value() == 1
    assert fams["chatd_store_writer_wal_pages"].value() == 812
    assert fams["chatd_store_writer_commit_median_seconds"].type == "gauge"
    assert fams["chatd_store_writer_commit_median_seconds"].value() == pytest.approx(0.00009)
    assert fams["chatd_store_writer_commit_p99_seconds"].value() == pytest.approx(0.00042)
    assert not any(name.startswith("chatd_store_writer") for name in parse(render({})))
    restarting = parse(render({"store_writer": {"pid": None, "restarts": 4, "store": {}}}))
    assert restarting["chatd_store_writer_up"].value() == 0
    assert restarting["chatd_store_writer_rows_total"].value() == 0
    junk = parse(render({"store_writer": {"pid": 1, "store": {"rows": "x"}, "restarts": []}}))
    assert junk["chatd_store_writer_rows_total"].value() == 0


def test_malformed_reports_count_as_zero_and_still_render() -> None:
    live = [("ready", {"messages_total": "x", "latency_buckets": "junk", "errors_by_code": 3})]
    data = aggregate(live, Retired(), Granter([], 0).statistics(), restarts_total=0)
    fams = parse(render(data))
    assert fams["chatd_messages_total"].value() == 0
    assert parse(render({}))["chatd_reply_latency_seconds"].type == "histogram"


def test_escaping_and_number_formats() -> None:
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert format_value(3) == "3" and format_value(2.0) == "2" and format_value(0.25) == "0.25"
    assert format_value(math.inf) == "+Inf" and format_value(-math.inf) == "-Inf"
    assert format_value(math.nan) == "NaN"


def _exported_buckets(data: dict[str, Any], name: str) -> dict[str, float]:
    fams = parse(render(data))
    return {lab["le"]: v for n, lab, v in fams[name].samples if n.endswith("_bucket")}


def test_a_reply_just_over_a_bucket_edge_is_not_counted_under_it() -> None:
    """5.1 ms is over le="0.005": the exported buckets count each observation exactly."""
    data = aggregate(
        [("ready", report(1, [5.1])), ("ready", report(1, [5.0, 10.4, 2600.0]))],
        Retired(),
        Granter([], 0).statistics(),
        restarts_total=0,
    )
    buckets = _exported_buckets(data, "chatd_reply_latency_seconds")
    assert buckets["0.005"] == 1  # 5.0 ms only: le means "<="
    assert buckets["0.01"] == 2 and buckets["0.025"] == 3
    assert buckets["2.5"] == 3 and buckets["5"] == 4 and buckets["+Inf"] == 4


_EDGES_MS = [1000 * float(Decimal(le)) for le in ("0.005", "0.01", "0.025", "0.5", "300")]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(
            st.one_of(
                st.floats(min_value=0, max_value=2e6, allow_nan=False),
                st.sampled_from(_EDGES_MS),
                st.sampled_from(_EDGES_MS).map(lambda e: math.nextafter(e, math.inf)),
                st.sampled_from(_EDGES_MS).map(lambda e: math.nextafter(e, 0)),
            ),
            max_size=20,
        ),
        min_size=1,
        max_size=3,
    )
)
def test_exported_buckets_are_exact_and_merge_across_workers(workers: list[list[float]]) -> None:
    """Whatever the workers observed, each le bucket of the merged /metrics counts exactly the
    observations <= le (compared exactly), and +Inf and _count count them all."""
    live = [("ready", report(len(ms), ms)) for ms in workers[1:]]
    retired = Retired()
    retired.fold(report(len(workers[0]), workers[0]))
    data = aggregate(live, retired, Granter([], 0).statistics(), restarts_total=0)
    everything = [v for ms in workers for v in ms]
    for le, n in _exported_buckets(data, "chatd_reply_latency_seconds").items():
        if le == "+Inf":
            assert n == len(everything)
        else:
            # The edge as the float nearest to le in ms (found by hypothesis: the float 0.1
            # is a hair above the decimal 0.1, yet it is the observation "0.1 ms" exactly).
            edge = float(Decimal(le) * 1000)
            assert n == sum(v <= edge for v in everything), le
