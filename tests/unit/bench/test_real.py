"""The ``real`` scenario's pure parts on known inputs: decode rate, the queue timeline, the
figures and the table from hand-made observations, the command line."""

from __future__ import annotations

import math

import pytest

from chatd.bench import cli, realmodel, realreport
from chatd.bench.realdirect import tokens_per_s
from chatd.bench.realmodel import Msg, RealParams


def test_tokens_per_s() -> None:
    assert tokens_per_s(11, 1.0, 1.5) == 20.0  # 10 tokens after the first in 0.5 s
    assert tokens_per_s(1, 1.0, 2.0) is None
    assert tokens_per_s(None, 1.0, 2.0) is None
    assert tokens_per_s(5, None, 2.0) is None
    assert tokens_per_s(5, 2.0, 2.0) is None


def test_queue_timeline() -> None:
    series = [[0.1, 0, 1, 1], [0.6, 2, 2, 2], [1.2, 3, 2, 1], [9.0, 99, 9, 9]]
    answers = [(0.5, None), (0.7, "busy"), (1.5, None), (1.6, None), (5.0, None)]
    tl = realreport.queue_timeline(series, answers, duration=2.0, bins=2)
    assert tl[0] == {
        "t_s": 0.0,
        "depth_max": 2,
        "granted_max": 2,
        "in_use_mean": 1.5,
        "replies": 1.0,
        "busy": 1.0,
    }
    assert tl[1]["depth_max"] == 3 and tl[1]["replies"] == 2.0 and tl[1]["busy"] == 0.0
    empty = realreport.queue_timeline([], [], duration=1.0, bins=1)[0]
    assert math.isnan(empty["depth_max"]) and empty["replies"] == 0.0


def _msgs() -> list[Msg]:
    stats = {"ttft_ms": 50.0, "tokens": 11}
    return [
        # Not queued: acked at once, first token 60 ms after the send.
        Msg(0.0, "a", sent=0.0, ack=0.005, first=0.06, done=0.56, stats=stats),
        # Queued (position 1) for 0.85 s, then answered.
        Msg(0.5, "b", 0.5, 0.505, queued=0.506, position=1, first=1.4, done=1.9, stats=stats),
        # The queue was full.
        Msg(0.6, "c", sent=0.6, ack=0.605, done=0.61, error="busy"),
    ]


def test_figures_and_markdown_from_known_observations() -> None:
    p = RealParams(duration=2.0, slots=1, max_queue=1, connections=2)
    load = {
        "messages": _msgs(),
        "series": [[0.0, 0, 1, 1], [1.0, 1, 1, 1]],
        "cpu_s": {"master": 0.01, "worker 1/9": 0.2, "model": 1.0, "client 3": 0.02},
        "elapsed_s": 2.5,
    }
    model = {"url": "http://m", "name": "m", "started_here": True, "pid": 1, "start_s": 0.5}
    direct = {
        "concurrency": 1,
        "capacity_per_s": 2.0,
        "ttft_ms": {"count": 1, "p50": 40.0},
        "reply_ms": {"count": 1, "p50": 400.0},
        "tokens_per_s": {"count": 1, "p50": 30.0},
    }
    r = realreport.figures(p, 4.0, model, load, direct)
    assert r["name"] == "real" and r["params"]["rate"] == 4.0 and not r["params"]["rate_given"]
    c, q = r["chatd"], r["queue"]
    assert c["scheduled"] == 3 and c["answered"] == 2
    assert c["errors"]["by_code"] == {"busy": 1} and q["busy"] == 1
    assert q["messages_queued"] == 1 and q["max_position"] == 1
    assert q["depth_max"] == 1 and q["in_use_mean"] == 1.0
    # time queued = (first - ack) - backend TTFT: 5 ms and 845 ms.
    assert q["time_queued_ms"]["count"] == 2
    assert q["time_queued_ms"]["max"] == pytest.approx(845.0)
    assert r["unqueued_ttft_ms"]["count"] == 1
    assert r["unqueued_ttft_ms"]["max"] == pytest.approx(60.0)
    assert r["backend_ttft_ms"]["p50"] == 50.0
    assert r["tokens_per_s"]["p50"] == pytest.approx(20.0)  # 10 tokens in 0.5 s
    # Two replies in the window: µs of CPU per reply.
    assert c["replies_in_window"] == 2
    assert r["cpu"]["per_reply_us"] == {
        "workers": 100000.0,
        "master": 5000.0,
        "backend": 500000.0,
        "clients": 10000.0,
    }
    md = realreport.markdown(r)
    for text in (
        "2 × the direct capacity of 2.00 replies/s",
        "| time queued (ack → request to the model, estimate) |",
        "| direct to the model: TTFT (1 concurrent, closed loop) | 40.0 |",
        "`busy` (queue full): 1",
        "| t (s) | queue depth (max) |",
        "CPU per reply (µs): chatd workers 100,000",
    ):
        assert text in md, text
    # report.scenario_markdown hands the real scenario over.
    from chatd.bench import report

    assert report.scenario_markdown(r) == md


def test_command_line() -> None:
    args = cli.parse_args(["run", "real", "--duration", "5", "--slots", "3", "--rate", "2"])
    p = realmodel.params_from(args)
    assert (p.duration, p.slots, p.rate, p.max_queue, p.model_threads) == (5.0, 3, 2.0, 8, 1)
    assert realmodel.params_from(cli.parse_args(["run", "real"])).duration == 30.0
    with pytest.raises(SystemExit, match="needs --rate"):
        realmodel.params_from(cli.parse_args(["run", "real", "--no-direct"]))
