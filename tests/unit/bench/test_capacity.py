"""The pure parts of ``chatd-bench run capacity``: the measured costs from the run's readings,
the seed's tiers derived from them, the model's replies/s per slot from a ``real`` result,
the tables, the command line, and the seed report's section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chatd.bench import capacity, cli, report

MB = 2**20


def raw(**over: Any) -> dict[str, Any]:
    """Readings of a run: 1,000 users over 2 workers, 30 s at 10 msg/min (5,000 replies)."""
    r: dict[str, Any] = {
        "users": 1000,
        "workers": 2,
        "window_s": 30.0,
        "replies": 5000,
        "rss_before": {1: 38 * MB, 2: 40 * MB},
        "rss_idle": {1: 46 * MB, 2: 48 * MB},  # +16 MB: 16.38 KB a connection
        "rss_active": {1: 49 * MB, 2: 51 * MB},  # +22 MB: 22.53 KB
        "master_rss": 44 * MB,
        "idle_s": 5.0,
        "idle_cpu_s": {"workers": 0.04, "master": 0.01},  # 1 % of a core
        "cpu_s": {"workers": 5.4, "master": 0.15},
    }
    return r | over


def test_measured_costs() -> None:
    m = capacity.measured(raw())
    assert m["users"] == 1000 and m["workers"] == 2 and m["rate_per_s"] == pytest.approx(166.667)
    assert m["idle_kb_per_conn"] == 16.38
    assert m["active_kb_per_conn"] == 22.53
    assert m["workers_rss_mb"] == {"before": 78.0, "idle": 94.0, "active": 100.0}
    assert m["worker_base_mb"] == 39.0
    assert m["master_rss_mb"] == 44.0
    assert m["fixed_cores"] == {"workers": 0.008, "master": 0.002, "total": 0.01}
    assert m["window_cores"] == {"workers": 0.18, "master": 0.005}
    assert m["worker_cpu_us_per_msg"] == 1080.0  # 5.4 s / 5,000
    assert m["master_cpu_us_per_msg"] == 30.0
    # (5.55 s - 0.01 cores × 30 s) / 5,000 replies
    assert m["marginal_cpu_us_per_msg"] == 1050.0


def test_measured_costs_without_replies_or_a_hold() -> None:
    m = capacity.measured(raw(replies=0, idle_s=0.0))
    assert m["worker_cpu_us_per_msg"] is None and m["marginal_cpu_us_per_msg"] is None
    assert m["fixed_cores"]["total"] == 0.0
    # a fixed CPU above the window's (noise on a shared machine): marginal 0, not negative
    m = capacity.measured(raw(idle_cpu_s={"workers": 2.0, "master": 0.0}))
    assert m["marginal_cpu_us_per_msg"] == 0.0
    assert capacity.measured(raw(users=0))["active_kb_per_conn"] is None


def test_derive_the_seed_tiers() -> None:
    m = capacity.measured(raw())
    rows = capacity.derive(m, 10.0, 2.0)
    assert [r["tier"] for r in rows] == ["MVP", "Small", "Medium", "Large"]
    assert [r["users"] for r in rows] == [50, 200, 500, 1000]
    assert rows[-1]["users_text"] == "1,000+"
    mvp, large = rows[0], rows[-1]
    # cores = 2 × (0.01 + rate × 1,050 µs)
    assert mvp["rate_per_s"] == pytest.approx(8.333)
    assert mvp["cores_needed"] == pytest.approx(2 * (0.01 + 50 / 6 * 1050e-6), abs=1e-3)
    assert large["cores_needed"] == pytest.approx(2 * (0.01 + 1000 / 6 * 1050e-6), abs=1e-3)
    assert mvp["cores"] == mvp["workers"] == 1 and large["cores"] == 1
    # memory = 2 × (44 + 1 worker × 39 + users × 22.53 KB)
    assert mvp["memory_mb"] == pytest.approx(2 * (44 + 39 + 50 * 22.53 / 1024), abs=0.1)
    assert large["memory_mb"] == pytest.approx(2 * (44 + 39 + 1000 * 22.53 / 1024), abs=0.1)
    assert large["llm_replies_per_s"] == pytest.approx(166.667) and large["llm_slots"] is None
    assert mvp["seed"] == {
        "memory_mb": 512,
        "memory": "512 MB",
        "cores": "1-2",
        "note": "Comfortable",
    }
    assert large["seed"]["memory"] == "8 GB+" and large["seed"]["cores"] == "8+"


def test_derive_more_cores_more_workers_and_slots() -> None:
    m = capacity.measured(raw(cpu_s={"workers": 60.0, "master": 0.3}))  # ~12 ms a message
    rows = capacity.derive(m, 10.0, 2.0, per_slot=1.75)
    large = rows[-1]
    assert large["cores_needed"] == pytest.approx(2 * (0.01 + 1000 / 6 * 0.01200), abs=1e-2)
    assert large["cores"] == 5 and large["workers"] == 5  # 4.02 -> 5 whole cores
    assert large["memory_mb"] == pytest.approx(2 * (44 + 5 * 39 + 1000 * 22.53 / 1024), abs=0.1)
    assert large["llm_slots"] == pytest.approx(95.2, abs=0.1)  # 166.7 replies/s / 1.75
    # an exact whole number of cores is not rounded up
    exact = capacity.derive(
        {"fixed_cores": {"total": 1.0}, "marginal_cpu_us_per_msg": 0.0, "active_kb_per_conn": 0.0}
        | {"master_rss_mb": 10.0, "worker_base_mb": 20.0},
        10.0,
        1.0,
    )
    assert [r["cores"] for r in exact] == [1, 1, 1, 1]
    assert exact[0]["memory_mb"] == 30.0


def test_derive_with_a_figure_missing() -> None:
    m = capacity.measured(raw(replies=0))
    rows = capacity.derive(m, 10.0, 2.0)
    assert all(r["cores"] is None and r["memory_mb"] is None for r in rows)
    assert rows[0]["llm_replies_per_s"] == pytest.approx(8.333)


def test_window_covers_two_periods_of_a_user() -> None:
    assert capacity.CapacityParams(duration=30.0).window() == 30.0
    assert capacity.CapacityParams(duration=3.0).window() == 12.0  # 10 msg/min: 6 s a period
    assert capacity.CapacityParams(duration=3.0, msgs_per_min=60.0).window() == 3.0
    assert capacity.CapacityParams(users=600).rate == 100.0


REAL: dict[str, Any] = {
    "name": "real",
    "params": {"slots": 2, "max_tokens": 24},
    "model": {"name": "smollm2:135m"},
    "direct": {"capacity_per_s": 3.5},
    "chatd": {"throughput_per_s": 3.8},
}


def test_llm_per_slot_from_a_real_result() -> None:
    got = capacity.llm_per_slot(REAL | {"source": "r.json"})
    assert got == {
        "model": "smollm2:135m",
        "slots": 2,
        "max_tokens": 24,
        "replies_per_s": 3.5,
        "per_slot": 1.75,
        "how": "the model alone: direct, closed loop",
        "source": "r.json",
    }
    through = capacity.llm_per_slot(REAL | {"direct": None})
    assert through is not None and through["per_slot"] == 1.9 and "through chatd" in through["how"]
    assert capacity.llm_per_slot(None) is None
    assert capacity.llm_per_slot(REAL | {"direct": None, "chatd": {}}) is None
    assert capacity.llm_per_slot(REAL | {"params": {"slots": 0}}) is None


def test_read_real(tmp_path: Path) -> None:
    assert capacity.read_real(None) is None
    good = tmp_path / "real.json"
    good.write_text(json.dumps(REAL))
    doc = capacity.read_real(good)
    assert doc is not None and doc["source"] == str(good) and doc["name"] == "real"
    other = tmp_path / "max.json"
    other.write_text(json.dumps({"name": "max"}))
    for bad in (other, tmp_path / "missing.json"):
        with pytest.raises(SystemExit, match="--real-result"):
            capacity.read_real(bad)


def result(llm: dict[str, Any] | None = None, errors: int = 0) -> dict[str, Any]:
    """A capacity result as run_capacity returns it (what markdown reads)."""
    p = capacity.CapacityParams()
    m = capacity.measured(raw())
    per_slot = None if llm is None else llm["per_slot"]
    return {
        "name": "capacity",
        "title": capacity.TITLE,
        "params": {**p.__dict__, "window": p.window(), "rate": round(p.rate, 3)},
        "procs": 2,
        "load": {
            "scheduled": 5000,
            "answered": 5000 - errors,
            "reply_ms": {"count": 5000, "p50": 2.02, "p99": 7.24},
            "errors": {"by_code": {"busy": errors} if errors else {}, "lost": 0, "total": errors},
        },
        "measured": m,
        "tiers": capacity.derive(m, p.msgs_per_min, p.headroom, per_slot),
        "llm": llm,
        "memory": {"rss_peak_mb": 150.0, "rss_peak_per_process_mb": {}},
    }


def test_markdown_tables() -> None:
    md = capacity.markdown(result())
    assert md.startswith(f"### {capacity.TITLE}\n")
    assert "1,000 users" in md and "each sending 10 msg/min (open loop, 166.7 msg/s in all)" in md
    assert "chatd alone: the model's memory and cores are not in these figures" in md
    assert "5,000 of 5,000 messages answered, errors 0" in md and "failing load" not in md
    for row in (
        "| RSS per idle connection (workers) | 16.38 KB | – |",
        "| RSS per active connection (workers; after ~5 messages each) | 22.53 KB "
        "| ~5 MB per user (at 100) |",
        "| a worker's RSS before any connection | 39.0 MB | – |",
        "| the master's RSS | 44.0 MB | – |",
        "| chatd's fixed CPU (connections open, silent) | 1.00 % of a core (workers 0.80, "
        "master 0.20) | – |",
        "| worker CPU per message at 10 msg/min per user | 1,080 µs | – |",
        "| master CPU per message (its own cost: 0.50 % of a core) | 30 µs | – |",
        "| chatd CPU per message beyond the fixed CPU (marginal) | 1,050 µs | – |",
        "| CPU per user at 10 msg/min (marginal) | 0.018 % of a core | ~0.5 % (at 100) |",
        "| tier | users | msg/s | chatd cores (×2) | chatd memory (×2) | seed: memory "
        "| seed: cores | model replies/s needed | slots of the measured model (no headroom) |",
        "| MVP | 50 | 8.3 | 0.04 → 1 | 168 MB | 512 MB | 1-2 | 8.3 | – |",
        "| Large | 1,000+ | 166.7 | 0.37 → 1 | 210 MB | 8 GB+ | 8+ | 166.7 | – |",
    ):
        assert row in md, row
    assert "chatd cores = 2 × (fixed CPU + msg/s × marginal CPU per message)" in md
    assert "**The model's throughput is the separate limit**" in md
    assert "were not measured in this run" in md


def test_markdown_with_the_model_and_a_failing_load() -> None:
    llm = capacity.llm_per_slot(REAL | {"source": "/tmp/r/real.json"})
    md = capacity.markdown(result(llm, errors=3))
    assert "**the figures below are of a failing load**" in md
    r = result()
    r["load"] |= {"connect_failed": 2, "closed": 0, "bad_reply": 0}
    assert "(2 connections failed, 0 closed by the server, 0 bad replies) — **the figures" in (
        capacity.markdown(r)
    )
    assert "| Large | 1,000+ | 166.7 | 0.37 → 1 | 210 MB | 8 GB+ | 8+ | 166.7 | 95.2 |" in md
    assert (
        "The real local model (smollm2:135m, 24 tokens at most a reply) answered 3.50 "
        "replies/s with 2 slots, 1.75 per slot (the model alone: direct, closed loop; "
        "`/tmp/r/real.json`)" in md
    )


def test_the_seed_report_has_the_capacity_section() -> None:
    r = result()
    assert report.scenario_markdown(r) == capacity.markdown(r)
    meta = {
        "command": "t",
        "date_utc": "now",
        "host": "h",
        "cores": 2,
        "memory_gb": 1,
        "python": "3",
        "git": "",
        "target": "own",
    }
    doc = report.build([r], meta)
    md = report.markdown(doc)
    assert "## Capacity analysis\n\n### Capacity: the seed's server requirements" in md
    assert md.index("## Capacity analysis") < md.index("## Comparison with requirements")
    assert "| Memory <2GB | < 2,048 MB RSS | 150.0 MB | PASS |" in md
    assert "## Capacity analysis" not in report.markdown(report.build([], meta))


def test_command_line(tmp_path: Path) -> None:
    args = cli.parse_args(["run", "capacity"])
    p = capacity.params_from(args, args.duration)
    assert p == capacity.CapacityParams() and args.real_result is None
    real = str(tmp_path / "real.json")
    argv = ["run", "capacity", "--conns", "50", "--msgs-per-min", "60", "--headroom", "3"]
    args = cli.parse_args([*argv, "--real-result", real, "--duration", "4"])
    p = capacity.params_from(args, args.duration)
    assert (p.users, p.msgs_per_min, p.headroom, p.duration) == (50, 60.0, 3.0, 4.0)
    assert args.real_result == tmp_path / "real.json"
    seed = cli.parse_args(["seed-report", "--only", "capacity", "--headroom", "1.5"])
    assert capacity.params_from(seed, 3.0).headroom == 1.5
    for bad in (["--msgs-per-min", "0"], ["--headroom", "0.5"]):
        with pytest.raises(SystemExit):
            capacity.params_from(cli.parse_args(["run", "capacity", *bad]), None)
