"""The pure parts of ``chatd-bench run closed`` (issue #13's closed-loop rate): the ratios
chatd / bare relay, the goal's status, the errors and CPU groups of a target, the table, the
command line's options, and the parsing of a reply's stages the closed loop keeps."""

from __future__ import annotations

from typing import Any

import pytest

from chatd.bench import cli, closed, longrun, report
from chatd.bench.load import parse_stages


def _target(
    rate: float,
    p50: float,
    p99: float,
    workers_us: float | None,
    master_us: float | None = None,
    errors: dict[str, Any] | None = None,
) -> dict[str, Any]:
    e = {"by_code": {}, "lost": 0, "bad_reply": 0, "connect_failed": 0, "closed": 0, "total": 0}
    e |= errors or {}
    return {
        "connections": 100,
        "opened": 100,
        "replies_in_window": int(rate * 5),
        "replies_per_s": rate,
        "sent": int(rate * 5),
        "answered": int(rate * 5) - e["lost"],
        "reply_ms": {"count": int(rate * 5), "p50": p50, "p99": p99},
        "errors": e,
        "cpu_us_per_reply": {
            "workers": workers_us,
            "master": master_us,
            "backend": 180.0,
            "clients": 150.0,
        },
        "pct_of_core": {"workers": 120.0, "master": None, "backend": 40.0, "clients": 35.5},
        "slowest": None,
    }


def _result(chatd: dict[str, Any], bare: dict[str, Any] | None) -> dict[str, Any]:
    targets = {"chatd": chatd} | ({"bare": bare} if bare is not None else {})
    r = closed.ratios(targets)
    return {
        "name": "closed",
        "title": closed.TITLE,
        "params": {"connections": 100, "duration": 5.0, "warmup": 1.0, "drain": 5.0, "tokens": 8},
        "procs": 2,
        "workers": {"chatd": 2} | ({"bare": 2} if bare is not None else {}),
        "targets": targets,
        "ratios": r,
        "goal": closed.goal(targets, r["rate"]),
    }


def test_ratios_of_chatd_to_the_bare_relay() -> None:
    targets = {
        "chatd": _target(1800.0, 50.0, 90.0, 540.0, 3.0),
        "bare": _target(2400.0, 40.0, 60.0, 360.0),
    }
    assert closed.ratios(targets) == {
        "rate": 0.75,
        "worker_cpu_per_reply": 1.5,
        "reply_p50": 1.25,
        "reply_p99": 1.5,
    }
    # a side missing, a figure unknown, or nothing on the bare relay's side: None, never a crash
    assert set(closed.ratios({"chatd": targets["chatd"]}).values()) == {None}
    zero = _target(0.0, 40.0, 60.0, None)
    zero["reply_ms"] = {"count": 0}
    assert closed.ratios({"chatd": targets["chatd"], "bare": zero}) == {
        "rate": None,
        "worker_cpu_per_reply": None,
        "reply_p50": None,
        "reply_p99": None,
    }


@pytest.mark.parametrize(
    ("chatd_errors", "bare_errors", "ratio", "status"),
    [
        (0, 0, 0.95, "meets"),
        (0, 0, 0.9, "meets"),  # the goal is "at least 0.9"
        (0, 0, 0.899, "MISSES"),
        (1, 0, 0.95, "MISSES"),  # a wrong or missing reply fails chatd whatever its rate
        (0, 1, 0.5, None),  # a failing reference decides nothing
        (0, 0, None, None),
    ],
)
def test_goal(chatd_errors: int, bare_errors: int, ratio: float | None, status: str | None) -> None:
    targets = {
        "chatd": _target(1.0, 1.0, 1.0, 1.0, errors={"total": chatd_errors}),
        "bare": _target(1.0, 1.0, 1.0, 1.0, errors={"total": bare_errors}),
    }
    g = closed.goal(targets, ratio)
    assert g["status"] == status and g["rate_ratio_at_least"] == 0.9
    assert (g["why"] is None) == (status == "meets")


def test_errors_of_a_target_count_every_kind() -> None:
    summary = {"errors": {"by_code": {"llm_error": 2}, "lost": 1, "total": 3}}
    e = closed.errors_of(summary, bad_reply=4, connect_failed=1, closed=1)
    assert e == {
        "by_code": {"llm_error": 2},
        "lost": 1,
        "bad_reply": 4,
        "connect_failed": 1,
        "closed": 1,
        "total": 9,
    }


def test_group_seconds() -> None:
    cpu = {"master": 0.1, "worker 1/10": 2.0, "worker 2/11": 1.5, "fake": 0.5, "client 7": 0.25}
    assert closed.group_seconds(cpu) == {
        "workers": 3.5,
        "master": 0.1,
        "backend": 0.5,
        "clients": 0.25,
    }
    assert closed.group_seconds({"worker 1/10": 1.0}) == {
        "workers": 1.0,
        "master": None,
        "backend": None,
        "clients": None,
    }


def test_markdown_has_a_row_per_target_and_the_ratios() -> None:
    r = _result(_target(1800.0, 50.0, 90.0, 540.0, 3.0), _target(2400.0, 40.0, 60.0, 360.0))
    md = report.scenario_markdown(r)
    assert md.startswith(f"### {closed.TITLE}\n")
    assert "- 100 connections, each sending its next message as soon as the reply" in md
    assert "5 s measured after 1 s warm-up per target" in md
    assert "chatd 2 workers, bare relay 2 workers" in md
    assert (
        "| chatd (2 workers) | 1,800.0 | 50.00 / 90.00 | 540 µs | 3 µs | 180 µs | 36 % "
        "| 9,000 / 9,000 | 0 / 0 |"
    ) in md
    assert "| bare relay (2 workers) | 2,400.0 | 40.00 / 60.00 | 360 µs | – | 180 µs |" in md
    assert (
        "- chatd / bare relay: closed-loop rate **0.75** (issue #13's goal ≥ 0.9: MISSES, "
        "0.75 < 0.9); workers' CPU per reply 1.50×; reply p50 1.25×, p99 1.50×"
    ) in md
    assert "errors:" not in md and "where the time went" not in md


def test_markdown_names_the_errors_and_the_slowest_replies() -> None:
    bad = {"by_code": {"llm_error": 2}, "lost": 3, "bad_reply": 1, "total": 6}
    r = _result(_target(1800.0, 50.0, 90.0, 540.0, errors=bad), _target(2400.0, 40.0, 60.0, 360.0))
    r["targets"]["chatd"]["slowest"] = {
        "fraction": 0.01,
        "n": 9,
        "of": 900,
        **dict.fromkeys(("reply_ms", "send_lag_ms", "commit_ms", "queue_ms"), 1.0),
        **dict.fromkeys(("first_token_ms", "stream_ms", "rest_ms"), 1.0),
        "all": dict.fromkeys(
            (
                "reply_ms",
                "send_lag_ms",
                "commit_ms",
                "queue_ms",
                "first_token_ms",
                "stream_ms",
                "rest_ms",
            ),
            0.5,
        ),
    }
    md = closed.markdown(r)
    assert "| 3 / 3 |" in md  # errors other than lost / lost
    assert "- chatd's errors: llm_error 2, 3 lost, 1 bad replies" in md
    assert "goal ≥ 0.9: MISSES, chatd had errors" in md
    assert "- chatd: where the time went, mean ms" in md and "slowest 1 % (9 of 900" in md


def test_the_bare_relay_with_a_store_is_a_second_reference() -> None:
    """``ratios_stored`` divides by the bare relay + store; the table has its row, the run's
    description how it writes, and a line of its ratios (the goal stays the bare relay's)."""
    r = _result(_target(1800.0, 50.0, 90.0, 540.0, 3.0), _target(2400.0, 40.0, 60.0, 360.0))
    r["targets"]["stored"] = _target(2000.0, 45.0, 75.0, 600.0)
    r["workers"]["stored"] = 2
    r["stored_writes"] = "writer"
    r["ratios_stored"] = closed.ratios(r["targets"], "stored")
    assert r["ratios_stored"] == {
        "rate": 0.9,
        "worker_cpu_per_reply": 0.9,
        "reply_p50": 1.111,
        "reply_p99": 1.2,
    }
    md = closed.markdown(r)
    assert ", bare relay + store 2 workers (one store writer)" in md
    assert "| bare relay + store (2 workers) | 2,000.0 | 45.00 / 75.00 | 600 µs |" in md
    assert (
        "- chatd / bare relay + store (the same promises kept, nothing else): closed-loop rate "
        "0.90; workers' CPU per reply 0.90×; reply p50 1.11×, p99 1.20×"
    ) in md
    assert "goal ≥ 0.9: MISSES, 0.75 < 0.9" in md


def test_markdown_without_the_bare_relay() -> None:
    md = closed.markdown(_result(_target(1800.0, 50.0, 90.0, 540.0), None))
    assert "| chatd (2 workers) |" in md and "bare relay (" not in md
    assert "- no bare relay: the fake Ollama's URL is unknown (--fake-url)" in md


def test_the_command_line_reaches_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Any, ...]] = []
    monkeypatch.setattr(closed, "run_closed", lambda *a: seen.append(a))
    args = cli.parse_args(["run", "closed", "--workers", "3"])
    longrun.run("closed", "target", args, False, args.duration)  # type: ignore[arg-type]
    _, params, procs, _, bare_workers, stored = seen.pop()
    assert params == closed.ClosedParams(connections=100, duration=10.0)
    assert (procs, bare_workers, stored) == (2, 3, False)  # as many workers as the own chatd
    args = cli.parse_args(["run", "closed", "--bare-store"])
    longrun.run("closed", "target", args, False, args.duration)  # type: ignore[arg-type]
    assert seen.pop()[-1] is True  # the bare relay + store measured too
    argv = ["run", "closed", "--conns", "20", "--duration", "2", "--url", "ws://h/ws"]
    args = cli.parse_args([*argv, "--control-socket", "/s", "--procs", "1"])
    longrun.run("closed", "target", args, False, args.duration)  # type: ignore[arg-type]
    _, params, procs, _, bare_workers, _ = seen.pop()
    assert (params.connections, params.duration, procs, bare_workers) == (20, 2.0, 1, 2)
    args = cli.parse_args(["run", "closed", "--bare-workers", "4"])
    longrun.run("closed", "target", args, False, None)  # type: ignore[arg-type]
    assert seen.pop()[4] == 4
    for bad in (["--conns", "0"], ["--duration", "0"], ["--duration", "inf"]):
        args = cli.parse_args(["run", "closed", *bad])
        with pytest.raises(SystemExit):
            closed.params_from(args, args.duration)


def test_parse_stages() -> None:
    stages = {"commit_ms": 1, "queue_ms": 0.5, "first_token_ms": 2, "stream_ms": 0.25}
    assert parse_stages({"ttft_ms": 1.0, "stages": stages}) == (1.0, 0.5, 2.0, 0.25)
    assert parse_stages({"ttft_ms": 1.0}) is None  # the bare relay's replies, a takeover's
    assert parse_stages({"stages": {"commit_ms": "x"}}) is None
    assert parse_stages(None) is None
