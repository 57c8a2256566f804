"""The ``fairness`` scenario's pure figures on known inputs: Jain's index, max-min fair
shares, demands, and a phase's per-class and per-client aggregation (round robin against a
starving FIFO)."""

from __future__ import annotations

import math

import pytest

from chatd.bench import fairstats
from chatd.bench.fairstats import FairRecord, jain, maxmin_shares, phase_figures

CLASSES = ["flooder", "light", "light"]


def test_jain_known_values() -> None:
    assert jain([3.0, 3.0, 3.0]) == pytest.approx(1.0)
    assert jain([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)  # one of four served: 1/n
    assert jain([1.0, 1.0, 0.0, 0.0]) == pytest.approx(0.5)  # k of n served equally: k/n
    assert jain([1.0, 2.0]) == pytest.approx(9 / 10)
    assert jain([2.0, 4.0]) == pytest.approx(jain([1.0, 2.0]) or 0)  # scale-free
    assert jain([]) is None
    assert jain([0.0, 0.0]) is None
    with pytest.raises(ValueError):
        jain([1.0, -1.0])


def test_maxmin_shares_water_filling() -> None:
    assert maxmin_shares([0.1, 0.2], 1.0) == pytest.approx([0.1, 0.2])  # demands fit
    assert maxmin_shares([math.inf, 0.25, 0.25, 0.25, 0.25, 0.25], 1.0) == pytest.approx(
        [1 / 6] * 6
    )  # every demand above the equal share: all get it
    assert maxmin_shares([0.1, math.inf, math.inf], 1.0) == pytest.approx([0.1, 0.45, 0.45])
    assert maxmin_shares([math.inf, 0.1, 0.3], 0.6) == pytest.approx([0.25, 0.1, 0.25])
    assert maxmin_shares([math.inf, 0.1], 0.0) == [0.0, 0.0]
    assert maxmin_shares([], 1.0) == []
    shares = maxmin_shares([0.5, math.inf, 0.05, 0.3], 1.0)
    assert sum(shares) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        maxmin_shares([0.1], -1.0)


def test_demands() -> None:
    d = fairstats.demands(["flooder", "light"], reply_s=2.0, mean_think_s=2.0, flood_in_flight=50)
    assert d == pytest.approx([25.0, 0.25])
    with pytest.raises(ValueError):
        fairstats.demands(["light"], 0.0, 1.0, 1)


def _rec(client: int, sent: float, wait: float, reply: float = 1.0) -> FairRecord:
    return (client, sent, sent + wait, sent + wait + reply, None)


def test_phase_figures_per_class_and_client() -> None:
    """Window [10, 20): the flooder completes 4 replies in it, each light user 2; one
    flooder reply ends before the window, one after; a light 429 inside; requests still
    waiting at 20 are pending."""
    records: list[FairRecord] = [
        _rec(0, 0.0, 5.0),  # done at 6: before the window
        _rec(0, 2.0, 8.0),  # done at 11
        _rec(0, 3.0, 9.0),  # 13
        _rec(0, 4.0, 10.0),  # 15
        _rec(0, 5.0, 11.0),  # 17
        _rec(0, 10.0, 9.5),  # done at 20.5: after the window
        (0, 12.0, None, None, None),  # waiting at the end
        (0, 13.0, 19.0, None, None),  # streaming at the end
        _rec(1, 10.0, 0.5),  # light 1: done at 11.5
        _rec(1, 14.0, 1.5),  # 16.5
        _rec(2, 11.0, 1.0),  # light 2: 13
        _rec(2, 15.0, 2.0),  # 18
        (2, 18.5, None, 18.6, "http_429"),
        (2, 19.0, None, None, None),
    ]
    demands = fairstats.demands(CLASSES, reply_s=1.0, mean_think_s=2.0, flood_in_flight=50)
    f = phase_figures(records, CLASSES, (10.0, 20.0), demands)
    assert f["throughput_per_s"] == pytest.approx(0.8)
    fl, li = f["classes"]["flooder"], f["classes"]["light"]
    assert fl["clients"] == 1 and li["clients"] == 2
    assert fl["completed"] == 4 and fl["throughput_per_s"] == pytest.approx(0.4)
    assert fl["ttfb_ms"]["p50"] == 9000.0 and fl["ttfb_ms"]["max"] == 11000.0
    assert fl["total_ms"]["p50"] == 10000.0
    assert fl["pending_at_end"] == 2
    assert fl["pending_age_ms"] == {
        "count": 2,
        "mean": 7500.0,
        "p50": 7000.0,
        "p95": 8000.0,
        "p99": 8000.0,
        "max": 8000.0,
    }
    assert fl["errors"] == {}
    assert li["completed"] == 4 and li["errors"] == {"http_429": 1}
    assert li["ttfb_ms"]["p50"] == 1000.0 and li["ttfb_ms"]["max"] == 2000.0
    assert li["pending_at_end"] == 1 and li["pending_age_ms"]["max"] == 1000.0
    # Demands: flooder 50/s, light 1/3 each; the 0.8/s served: 0.2667 each (all above it).
    clients = f["clients"]
    assert [c["completed"] for c in clients] == [4, 2, 2]
    assert [c["fair_share_per_s"] for c in clients] == pytest.approx([0.8 / 3] * 3, abs=1e-4)
    assert [c["normalized"] for c in clients] == pytest.approx([1.5, 0.75, 0.75], abs=1e-3)
    assert f["jain_maxmin"] == pytest.approx(jain([1.5, 0.75, 0.75]), abs=1e-4)
    # Grants (first bytes) in [10, 20) and who was waiting at each (worked out by hand):
    # 10 {0,1}, 10.5 {0,1}, 12 {0,2} twice, 14 {0,1}, 15.5 {0,1,2}, 16 {0,2}, 17 {0,2},
    # 19 {0,2} (client 2's last request waits from 19), 19.5 {0,2}.
    assert [c["grants"] for c in clients] == [6, 2, 2]
    fair = [29 / 6, 11 / 6, 10 / 3]
    assert [c["fair_grants"] for c in clients] == pytest.approx(fair, abs=1e-4)
    ratios = [6 / fair[0], 2 / fair[1], 2 / fair[2]]
    assert [c["grant_ratio"] for c in clients] == pytest.approx(ratios, abs=1e-3)
    assert f["jain"] == pytest.approx(jain(ratios), abs=1e-4)


def test_grant_shares_counts_only_waiting_clients() -> None:
    """A client that never waits when a grant is made earns no fair share of it; one that
    never waits at all is left out of the index."""
    records: list[FairRecord] = [
        (0, 0.0, 1.0, 2.0, None),  # alone waiting at its grant: fair 1
        (0, 1.5, 3.0, 4.0, None),  # waits [1.5, 3]: at 3 client 1 waits too
        (1, 2.5, 3.0, 4.0, None),  # granted at the same instant
        (2, 9.0, 9.5, 9.6, None),  # granted after the window
    ]
    got, fair = fairstats.grant_shares(records, 3, (0.0, 5.0))
    assert got == [2, 1, 0]
    assert fair == pytest.approx([2.0, 1.0, 0.0])
    f = phase_figures(records, ["flooder", "light", "light"], (0.0, 5.0), [1.0, 1.0, 1.0])
    assert f["clients"][2]["grant_ratio"] is None
    assert f["jain"] == pytest.approx(1.0)


def test_round_robin_fair_against_a_starving_fifo() -> None:
    """Six clients, capacity 1/s for 60 s. Round robin: the clients take turns, each request
    waiting 1 s (J ≈ 1). FIFO: the flooder's 55 requests, queued at 0, are granted one a
    second from t=1; the five light users, waiting from t=2, get theirs at 56 (J ≈ 0.2)."""
    classes = ["flooder"] + ["light"] * 5
    demands = fairstats.demands(classes, reply_s=2.0, mean_think_s=2.0, flood_in_flight=50)
    rr = [_rec(k % 6, 0.5 * k, 1.0) for k in range(60)]
    fifo = [(0, 0.0, 1.0 + k, 2.0 + k, None) for k in range(55)]
    fifo += [(i, 2.0, 56.0, 57.0, None) for i in range(1, 6)]
    f_rr = phase_figures(rr, classes, (0.0, 60.0), demands)
    f_fifo = phase_figures(fifo, classes, (0.0, 60.0), demands)
    assert f_rr["throughput_per_s"] == f_fifo["throughput_per_s"] == 1.0
    assert f_rr["jain"] is not None and f_rr["jain"] > 0.99
    assert f_rr["jain_maxmin"] == pytest.approx(1.0)
    # fair grants: flooder 1 (alone at t=1) + 54/6 = 10, a light user 54/6 + 1/5 · 5 = 10
    assert [c["fair_grants"] for c in f_fifo["clients"]] == pytest.approx([10.0] * 6)
    x = [5.5, 0.1, 0.1, 0.1, 0.1, 0.1]
    assert f_fifo["jain"] == pytest.approx(jain(x), abs=1e-3)
    assert f_fifo["jain_maxmin"] == pytest.approx(jain(x), abs=1e-3)  # share 1/6 each
    assert f_fifo["jain"] is not None and f_fifo["jain"] < 0.25


def test_phase_figures_with_nothing_completed() -> None:
    f = phase_figures([(0, 1.0, None, None, None)], ["flooder"], (0.0, 5.0), [25.0])
    assert f["throughput_per_s"] == 0 and f["jain"] is None
    assert f["classes"]["flooder"]["ttfb_ms"] == {"count": 0}
    assert f["classes"]["flooder"]["pending_at_end"] == 1
    with pytest.raises(ValueError):
        phase_figures([], ["flooder"], (5.0, 5.0), [1.0])
