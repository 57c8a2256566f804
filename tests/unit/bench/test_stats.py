"""chatd.bench.stats on known inputs: percentiles, summaries, histograms, rates, schedules
and the coordinated-omission-free latency (a server stall shows in every queued message)."""

from __future__ import annotations

import itertools
import math

import pytest

from chatd.bench import stats


def test_percentile_nearest_rank() -> None:
    v = [float(x) for x in range(1, 101)]  # 1..100
    assert stats.percentile(v, 50) == 50.0
    assert stats.percentile(v, 95) == 95.0
    assert stats.percentile(v, 99) == 99.0
    assert stats.percentile(v, 100) == 100.0
    assert stats.percentile([7.0], 99) == 7.0
    assert math.isnan(stats.percentile([], 50))
    with pytest.raises(ValueError):
        stats.percentile(v, 0)


def test_summary() -> None:
    s = stats.summary([4.0, 1.0, 3.0, 2.0])
    assert s == {"count": 4, "mean": 2.5, "p50": 2.0, "p95": 4.0, "p99": 4.0, "max": 4.0}
    assert stats.summary([]) == {"count": 0}


def test_latency_from_intended_send_time() -> None:
    assert stats.latencies_from_intended([1.0, 2.0], [1.5, None]) == [500.0, None]
    with pytest.raises(ValueError):
        stats.latencies_from_intended([1.0], [])


def test_a_stall_shows_in_every_queued_message() -> None:
    """1 msg every 10 ms for 1 s; the server answers in 1 ms but stalls from t=0.5 to 0.7:
    every message intended in the stall is answered at 0.701, charged its wait."""
    intended = [k * 0.01 for k in range(100)]
    done = []
    for t in intended:
        done.append(0.701 if 0.5 <= t < 0.7 else t + 0.001)
    lat = stats.latencies_from_intended(intended, done)
    stalled = [x for t, x in zip(intended, lat, strict=True) if 0.5 <= t < 0.7]
    assert len(stalled) == 20
    assert all(x is not None and x > 1.0 for x in stalled)  # every one of them, not just one
    assert stalled[0] == pytest.approx(201.0)
    assert stalled[-1] == pytest.approx(11.0, abs=1e-6)
    s = stats.summary(x for x in lat if x is not None)
    # 20 % of the messages waited: p95 and p99 show the stall, the median does not.
    assert s["p50"] == pytest.approx(1.0)
    assert s["p95"] > 50
    assert s["p99"] > 150
    # Timed from the actual send of a closed-loop client, only one sample would be slow:
    closed_loop = sorted([1.0] * 99 + [201.0])
    assert stats.percentile(closed_loop, 95) == 1.0


def test_histogram_buckets() -> None:
    h = stats.histogram([50, 100, 150, 250, 400, 999, 1000, 5000], stats.SEED_BUCKETS_MS)
    assert h == [
        ("<100", 1),
        ("100-200", 2),
        ("200-300", 1),
        ("300-500", 1),
        ("500-1000", 1),
        (">=1000", 2),
    ]
    with pytest.raises(ValueError):
        stats.histogram([1.0], [2.0, 1.0])


def test_rates_and_ratios() -> None:
    assert stats.rate(30, 3.0) == 10.0
    assert stats.rate(5, 0.0) == 0.0
    assert stats.ratio(6.0, 2.0) == 3.0
    assert stats.ratio(1.0, 0.0) is None
    assert stats.ratio(math.nan, 1.0) is None
    assert stats.share_pct(999, 1000) == pytest.approx(99.9)
    assert stats.share_pct(0, 0) == 100.0


def test_uniform_schedule_is_open_loop_at_the_total_rate() -> None:
    times = sorted(t for i in range(4) for t in stats.uniform_schedule(i, 4, 100.0, 0.0, 1.0))
    assert len(times) == 100
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(times)}
    assert gaps == {0.01}
    assert stats.uniform_schedule(0, 1, 0.1, 0.0, 3.0) == [0.0]


def test_timeline() -> None:
    tl = stats.timeline([(0.1, 5.0), (0.9, 7.0), (1.5, 100.0), (9.0, 1.0)], 2.0)
    assert [b["count"] for b in tl] == [2.0, 1.0]
    assert tl[0]["p50"] == 5.0 and tl[0]["max"] == 7.0
    assert tl[1]["p99"] == 100.0


def test_throughput_counts_the_replies_of_the_window_not_its_edge() -> None:
    """1,000 msg/s for 2 s (no warm-up), replies 25-34 ms after their send: the replies
    received inside the window miss those of the last ~30 ms of sends (~985/s); the
    throughput counts the window shifted by the median latency: the rate kept up with."""
    from chatd.bench import scenarios

    records = []
    for i in range(2000):
        t = i / 1000.0
        records.append((t, t, t + 0.001, t + 0.02, t + 0.025 + (i % 10) / 1000.0, None))
    s = scenarios.summarize(records, 0.0, 2.0)  # type: ignore[arg-type]
    assert s["scheduled"] == 2000 and s["answered"] == 2000
    assert 1960 <= s["replies_in_window"] <= 1980
    assert 995.0 <= s["throughput_per_s"] <= 1000.0  # within the jitter at both ends


def test_slowest_stages_attributes_the_slowest_replies_time() -> None:
    from chatd.bench.stats import slowest_stages

    # 100 replies of 10 ms spent in the stream, and 1 of 100 ms spent in the queue.
    records = [(float(i), float(i), None, None, i + 0.010, None) for i in range(100)]
    stages: list[tuple[float, float, float, float] | None] = [(1.0, 0.0, 1.0, 7.0)] * 100
    records.append((100.0, 100.0, None, None, 100.1, None))
    stages.append((1.0, 90.0, 1.0, 7.0))
    records.append((101.0, 101.0, None, None, 101.5, None))  # said no stages: not counted
    stages.append(None)
    records.append((102.0, 102.0, None, None, None, None))  # lost
    stages.append((1.0, 1.0, 1.0, 1.0))
    s = slowest_stages(records, stages, 0.0, 200.0)
    assert s is not None and (s["n"], s["of"]) == (2, 101)  # 1 % of 101, rounded up
    assert s["queue_ms"] == 45.0  # the 100 ms reply and one 10 ms one
    assert s["all"]["stream_ms"] == 7.0
    assert s["all"]["send_lag_ms"] == 0.0
    assert s["all"]["rest_ms"] == pytest.approx(s["all"]["reply_ms"] - 9.0 - s["all"]["queue_ms"])
    assert slowest_stages(records, [None] * len(records), 0.0, 200.0) is None
    assert slowest_stages(records, stages, 500.0, 600.0) is None  # nothing in the window
