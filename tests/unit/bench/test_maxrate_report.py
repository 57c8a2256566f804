"""The pure parts of ``max`` added for issue #13: the bounds of the chatd / bare ratio when
each sustained rate is known only to the step, their wording, the table with the CPU per
message of every step, and the stage breakdown of chatd's slowest replies at its sustained
rate; and the command line's ``--step``/``--start``."""

from __future__ import annotations

from typing import Any

import pytest

from chatd.bench import cli, maxrate, server


@pytest.mark.parametrize(
    ("args", "want"),
    [
        # chatd 2,000 (2,500 failed), bare 2,500 (3,000 failed): docs/benchmarks.md's run
        ((2000.0, 2500.0, 2500.0, 3000.0), (0.667, 1.0)),
        # steps of 250 narrow it
        ((2000.0, 2250.0, 2500.0, 2750.0), (0.727, 0.9)),
        ((1500.0, 1750.0, 1500.0, 1750.0), (0.857, 1.167)),
        # chatd failed its first step: it sustains somewhere in [0, 250)
        ((None, 250.0, 2500.0, 2750.0), (0.0, 0.1)),
        # the bare relay passed every step up to the cap: no lower bound
        ((2000.0, 2250.0, 20000.0, None), (None, 0.113)),
        # chatd passed every step: no upper bound
        ((20000.0, None, 2500.0, 2750.0), (7.273, None)),
        # the bare relay failed its first step: it may sustain almost nothing
        ((2000.0, 2250.0, None, 250.0), (8.0, None)),
        ((None, 250.0, None, 250.0), (0.0, None)),
    ],
)
def test_ratio_interval(
    args: tuple[float | None, ...], want: tuple[float | None, float | None]
) -> None:
    assert maxrate.ratio_interval(*args) == want


def test_the_interval_holds_the_point_ratio_and_every_true_ratio() -> None:
    """Brute force: any true rates in [sustained, failing) give a ratio inside the bounds."""
    c_s, c_f, b_s, b_f = 2000.0, 2250.0, 2500.0, 2750.0
    low, high = maxrate.ratio_interval(c_s, c_f, b_s, b_f)
    assert low is not None and high is not None
    assert low <= c_s / b_s <= high
    for i in range(50):
        for j in range(50):
            c = c_s + (c_f - c_s) * i / 50
            b = b_s + (b_f - b_s) * j / 50
            assert low - 1e-3 <= c / b <= high + 1e-3


def _target(sustained: float | None, failing: float | None) -> dict[str, Any]:
    return {
        "sustained_rate": sustained,
        "first_failing": None if failing is None else {"rate": failing},
    }


def test_intervals_of_the_searched_targets() -> None:
    targets = {
        "chatd": _target(2000.0, 2250.0),
        "bare": _target(2500.0, 2750.0),
        "direct": _target(4500.0, None),
    }
    assert maxrate.intervals(targets) == {
        "chatd/bare": {"low": 0.727, "high": 0.9},
        "chatd/direct": {"low": None, "high": 0.5},
    }
    assert maxrate.intervals({"chatd": _target(2000.0, 2250.0)}) == {}
    assert maxrate.failing_rate(_target(1.0, None)) is None


def test_interval_text() -> None:
    assert maxrate.interval_text({"low": 0.727, "high": 0.9}, "bare relay") == (
        "between 0.73 and 0.90"
    )
    assert maxrate.interval_text({"low": 7.0, "high": None}, "bare relay").startswith(
        "at least 7.00 (no upper bound"
    )
    assert maxrate.interval_text({"low": None, "high": 0.11}, "bare relay") == (
        "at most 0.11 (no lower bound: the bare relay passed every step)"
    )
    assert maxrate.interval_text({"low": None, "high": None}, "x").startswith("unbounded")
    assert maxrate.interval_text(None, "x") == "–"


SLOW = {
    "fraction": 0.01,
    "n": 20,
    "of": 2000,
    "reply_ms": 31.3,
    "send_lag_ms": 0.56,
    "commit_ms": 4.07,
    "queue_ms": 2.01,
    "first_token_ms": 9.11,
    "stream_ms": 0.07,
    "rest_ms": 15.48,
    "all": {
        "reply_ms": 5.7,
        "send_lag_ms": 0.18,
        "commit_ms": 1.06,
        "queue_ms": 0.33,
        "first_token_ms": 1.51,
        "stream_ms": 0.05,
        "rest_ms": 2.57,
    },
}


def _step(
    rate: float, p99: float, ok: bool, cpu: float | None, master: float | None
) -> dict[str, Any]:
    return {
        "rate": rate,
        "achieved_per_s": rate,
        "scheduled": int(rate),
        "answered": int(rate),
        "reply_ms": {"count": int(rate), "p50": p99 / 4, "p99": p99},
        "errors": {"total": 0, "by_code": {}, "lost": 0},
        "worker_cpu_us_per_msg": cpu,
        "master_cpu_us_per_msg": master,
        "fake_cpu_us_per_msg": 190.0,
        "clients_pct_of_core": 25.0,
        "slowest": SLOW if ok and master is not None else None,
        "ok": ok,
        "why": None if ok else f"p99 {p99:,.1f} ms >= 50 ms",
        "attempt": 1,
    }


def _result(chatd_first_fails: bool = False) -> dict[str, Any]:
    c_steps = [
        _step(1500.0, 28.0, not chatd_first_fails, 513.0, 2.0),
        _step(1750.0, 644.0, False, 381.0, 48.0),
    ]
    b_steps = [_step(1500.0, 13.0, True, 284.0, None), _step(1750.0, 613.0, False, 264.0, None)]
    targets = {
        "chatd": {
            "sustained_rate": None if chatd_first_fails else 1500.0,
            "at_sustained": None if chatd_first_fails else c_steps[0],
            "first_failing": c_steps[-1],
            "steps": c_steps,
        },
        "bare": {
            "sustained_rate": 1500.0,
            "at_sustained": b_steps[0],
            "first_failing": b_steps[-1],
            "steps": b_steps,
        },
    }
    return {
        "name": "max",
        "title": maxrate.TITLE,
        "params": {
            "connections": 100,
            "start": 1500.0,
            "step": 250.0,
            "max_rate": 20000.0,
            "duration": 3.0,
            "warmup": 1.0,
        },
        "procs": 2,
        "workers": {"chatd": 2, "bare": 2},
        "targets": targets,
        "ratios": {"chatd/bare": None if chatd_first_fails else 1.0, "chatd/direct": None},
        "ratio_intervals": maxrate.intervals(targets),
    }


def test_markdown_shows_the_interval_the_cpu_per_step_and_the_slowest() -> None:
    md = maxrate.markdown(_result())
    assert (
        "- chatd / bare relay: 1.00 (sustained / sustained); the true ratio lies between "
        "0.86 and 1.17" in md
    )
    assert "With steps of 250 msg/s a sustained rate is known only to the step" in md
    assert "chatd / direct" not in md  # direct was not searched
    assert "| worker CPU / msg | master CPU / msg | fake CPU / msg |" in md
    assert "| chatd | 1,500 | 1,500.0 | 7.00 / 28.00 | 0 | 513 µs | 2 µs | 190 µs |" in md
    assert "| bare relay | 1,750 | 1,750.0 | 153.25 / 613.00 | 0 | 264 µs | – |" in md
    assert "- chatd at its sustained rate (1,500 msg/s):\n  - Where the time went" in md
    assert "slowest 1 % (20 of 2000 replies, 31.30 ms): client send lag 0.56, commit 4.07" in md


def test_markdown_when_chatd_sustained_no_step() -> None:
    md = maxrate.markdown(_result(chatd_first_fails=True))
    assert "chatd sustained no step: no stage breakdown" in md
    assert "the true ratio lies between 0.00 and 1.17" in md
    r = _result()
    r["targets"]["chatd"]["at_sustained"]["slowest"] = None
    assert "- chatd at its sustained rate (1,500 msg/s): its replies reported no stages" in (
        maxrate.markdown(r)
    )


def test_markdown_of_an_older_result_without_intervals() -> None:
    r = _result()
    del r["ratio_intervals"]
    for t in r["targets"].values():
        for s in t["steps"]:
            del s["master_cpu_us_per_msg"]
    md = maxrate.markdown(r)
    assert "- chatd / bare relay: 1.00 (sustained / sustained); the true ratio lies –" in md
    assert "known only to the step" not in md


def test_step_down_to_250_and_a_start() -> None:
    args = cli.parse_args(["run", "max", "--step", "250", "--start", "1500"])
    assert args.step == 250.0 and args.start == 1500.0
    assert cli.parse_args(["run", "max"]).step == 500.0
    assert cli.parse_args(["run", "max"]).start is None
    p = maxrate.MaxParams(start=1500.0, step=250.0, max_rate=2500.0)
    assert maxrate.rates(p) == [1500.0, 1750.0, 2000.0, 2250.0, 2500.0]
    for bad in ("0", "-250", "x", "inf"):
        with pytest.raises(SystemExit):
            cli.parse_args(["run", "max", "--step", bad])


class _Stub:
    url, fake_url, fake_pid = "ws://x/ws", "http://fake", None

    def worker_pids(self) -> list[int]:
        return [1, 2]

    def status(self) -> dict[str, Any]:
        return {"master": {"pid": 1, "store_writer": {"pid": 3}}, "workers": []}


@pytest.mark.parametrize(
    ("direct", "stored", "fake", "kinds"),
    [
        (True, False, "http://fake", ["chatd", "bare", "direct"]),
        (False, False, "http://fake", ["chatd", "bare"]),
        (True, True, "http://fake", ["chatd", "bare", "stored", "direct"]),
        (True, True, None, ["chatd"]),
    ],
)
def test_run_max_searches_the_targets_asked_for(
    monkeypatch: pytest.MonkeyPatch,
    direct: bool,
    stored: bool,
    fake: str | None,
    kinds: list[str],
) -> None:
    searched: list[str] = []
    sustained = {"chatd": 2000.0, "bare": 2500.0, "stored": 2250.0, "direct": 4500.0}

    def search_one(kind: str, *_: object) -> dict[str, Any]:
        searched.append(kind)
        return _target(sustained[kind], sustained[kind] + 250.0) | {"steps": []}

    monkeypatch.setattr(maxrate, "_search_one", search_one)
    monkeypatch.setattr(server, "fake_config", lambda *a, **k: None)
    stub = _Stub()
    stub.fake_url = fake  # type: ignore[assignment]
    p = maxrate.MaxParams(step=250.0)
    r = maxrate.run_max(stub, p, direct=direct, stored=stored)  # type: ignore[arg-type]
    assert searched == kinds and list(r["targets"]) == kinds
    assert r["ratios"]["chatd/bare"] == (0.8 if "bare" in kinds else None)
    assert r["ratios"].get("chatd/stored") == (0.889 if "stored" in kinds else None)
    assert ("chatd/stored" in r["ratios"]) == ("stored" in kinds)
    assert r.get("stored_writes") == ("writer" if "stored" in kinds else None)
    want = {"chatd/bare": {"low": 0.727, "high": 0.9}} if "bare" in kinds else {}
    if "stored" in kinds:
        want["chatd/stored"] = {"low": 0.8, "high": 1.0}  # 2,000 / 2,500, 2,250 / 2,250
    if "direct" in kinds:
        want["chatd/direct"] = {"low": 0.421, "high": 0.5}  # 2,000 / 4,750
    assert r["ratio_intervals"] == want


def test_markdown_with_the_bare_relay_and_store() -> None:
    r = _result()
    r["targets"]["stored"] = r["targets"]["bare"]
    r["workers"]["stored"] = 2
    r["stored_writes"] = "own"
    r["ratios"]["chatd/stored"] = 1.0
    r["ratio_intervals"] = maxrate.intervals(r["targets"])
    md = maxrate.markdown(r)
    assert ", bare relay + store 2 workers (each worker writing)" in md
    assert "| bare relay + store (2 workers) | 1,500 msg/s |" in md
    assert (
        "- chatd / bare relay + store: 1.00 (sustained / sustained); the true ratio lies "
        "between 0.86 and 1.17" in md
    )
