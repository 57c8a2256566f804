"""The pure parts of chatd-bench's ``max`` and ``idle`` scenarios: the step search's decisions
on known step results, the rates it offers, KB per idle connection and the client-process
count for many connections; and the bare relay's protocol answers (no socket)."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest

from chatd.bench import idle, maxrate
from chatd.bench.bare_conn import Relay, _pieces, _Session


def step(
    rate: float,
    p99: float,
    errors: int = 0,
    lost: int = 0,
    answered: int | None = None,
    **extra: int,
) -> dict[str, Any]:
    """A step result as :func:`maxrate.run_step` returns it (only what the verdict reads)."""
    scheduled = int(rate)
    return {
        "rate": rate,
        "scheduled": scheduled,
        "answered": scheduled - errors - lost if answered is None else answered,
        "reply_ms": {"count": scheduled, "p50": p99 / 2, "p99": p99},
        "errors": {
            "by_code": {"llm_timeout": errors} if errors else {},
            "lost": lost,
            "total": errors + lost,
            "bad_reply": 0,
            "connect_failed": 0,
            "closed": 0,
        }
        | extra,
    }


def test_verdict_passes_a_clean_fast_step() -> None:
    assert maxrate.verdict(step(500, 12.0)) is None
    assert maxrate.verdict(step(500, 49.99)) is None


@pytest.mark.parametrize(
    ("s", "why"),
    [
        (step(500, 50.0), "p99 50.0 ms >= 50 ms"),
        (step(500, 196.4), "p99 196.4 ms >= 50 ms"),
        (step(500, 5.0, errors=2), "errors: llm_timeout 2"),
        (step(500, 5.0, lost=3), "errors: 3 lost"),
        (step(500, 5.0, bad_reply=1), "errors: 1 bad replies"),
        (step(500, 5.0, connect_failed=4), "errors: 4 connections failed"),
        (step(500, 5.0, closed=1), "errors: 1 connections closed by the server"),
        (step(500, 5.0, answered=0), "no reply measured"),
        (step(500, 5.0, answered=499), "not every message answered"),
    ],
)
def test_verdict_names_why_a_step_fails(s: dict[str, Any], why: str) -> None:
    assert maxrate.verdict(s) == why


def test_verdict_fails_a_step_without_latencies() -> None:
    s = step(500, 5.0, answered=0)
    s["reply_ms"] = {"count": 0}
    assert maxrate.verdict(s) == "no reply measured"


def test_search_stops_at_the_first_failing_step() -> None:
    known = {500.0: 8.0, 1000.0: 20.0, 1500.0: 61.0, 2000.0: 10.0}
    asked: list[float] = []

    def run(rate: float) -> dict[str, Any]:
        asked.append(rate)
        return step(rate, known[rate])

    r = maxrate.search([500.0, 1000.0, 1500.0, 2000.0], run)
    assert asked == [500.0, 1000.0, 1500.0, 1500.0]  # failed twice; 2000 is never offered
    assert r["sustained_rate"] == 1000.0
    assert r["at_sustained"]["reply_ms"]["p99"] == 20.0
    assert r["first_failing"]["rate"] == 1500.0
    assert r["first_failing"]["why"] == "p99 61.0 ms >= 50 ms"
    assert [s["ok"] for s in r["steps"]] == [True, True, False, False]
    assert [s["attempt"] for s in r["steps"]] == [1, 1, 1, 2]


def test_search_runs_a_failing_rate_again_once() -> None:
    """A stall of another process fails one step: the second attempt decides."""
    p99 = {500.0: [8.0], 1000.0: [70.0, 12.0], 1500.0: [80.0, 90.0]}

    def run(rate: float) -> dict[str, Any]:
        return step(rate, p99[rate].pop(0))

    r = maxrate.search([500.0, 1000.0, 1500.0], run)
    assert r["sustained_rate"] == 1000.0 and r["at_sustained"]["reply_ms"]["p99"] == 12.0
    assert r["first_failing"]["rate"] == 1500.0 and r["first_failing"]["attempt"] == 2
    assert (
        maxrate.search([500.0], lambda rate: step(rate, 70.0), attempts=1)["steps"][0]["attempt"]
        == 1
    )


def test_search_when_the_first_step_fails_or_none_does() -> None:
    r = maxrate.search([500.0, 1000.0], lambda rate: step(rate, 5.0, lost=1))
    assert r["sustained_rate"] is None and r["at_sustained"] is None
    assert r["first_failing"]["rate"] == 500.0 and len(r["steps"]) == 2
    r = maxrate.search([500.0, 1000.0], lambda rate: step(rate, 5.0))
    assert r["sustained_rate"] == 1000.0 and r["first_failing"] is None
    assert maxrate.search([], lambda rate: step(rate, 5.0))["sustained_rate"] is None


def test_rates() -> None:
    assert maxrate.rates(maxrate.MaxParams(start=500, step=500, max_rate=2000)) == [
        500.0,
        1000.0,
        1500.0,
        2000.0,
    ]
    assert maxrate.rates(maxrate.MaxParams(start=20, step=20, max_rate=50)) == [20.0, 40.0]
    assert maxrate.rates(maxrate.MaxParams(start=500, step=500, max_rate=100)) == []
    with pytest.raises(ValueError):
        maxrate.rates(maxrate.MaxParams(step=0))


def test_kb_per_idle_connection() -> None:
    mb = 2**20
    before = {1: 40 * mb, 2: 41 * mb}
    after = {1: 50 * mb, 2: 51 * mb}  # 20 MB more for 1,000 connections
    assert idle.kb_per_conn(before, after, 1000) == 20.48
    assert idle.kb_per_conn(before, after, 0) is None
    assert idle.kb_per_conn(before, {1: 50 * mb}, 1000) == 10.24  # a pid read once: left out
    assert idle.kb_per_conn({1: 10 * mb}, {1: 10 * mb - 4096}, 2) == -2.0  # shrank: negative


def test_client_processes_for_many_connections() -> None:
    assert idle.client_procs(1000, 2, 20000) == 2
    assert idle.client_procs(10000, 2, 20000) == 2
    assert idle.client_procs(10000, 2, 1024) == math.ceil(10000 / (1024 - idle.NOFILE_SPARE))
    assert idle.client_procs(1, 4, 1024) == 1  # never more than there are connections


def test_ndjson_pieces() -> None:
    line = orjson.dumps({"message": {"content": "he"}, "done": False})
    done = orjson.dumps({"message": {"content": ""}, "done": True, "done_reason": "length"})
    assert _pieces([line, b"", line]) == ("hehe", 2, None)
    assert _pieces([line, done]) == ("he", 1, "length")
    with pytest.raises(Exception, match="boom"):
        _pieces([b'{"error": "boom"}'])


def test_bare_relay_protocol_answers() -> None:
    relay, s = Relay("http://127.0.0.1:9", "m", "1/42"), _Session()

    def answer(frame: bytes) -> tuple[dict[str, Any], tuple[str, str] | None]:
        return relay._answer(s, frame)

    assert answer(b'{"type":"message","id":"a","text":"x"}')[0]["code"] == "bad_request"
    assert answer(b'{"type":"hello","session":"old"}')[0]["code"] == "unknown_session"
    welcome, job = answer(b'{"type":"hello"}')
    assert welcome["type"] == "welcome" and welcome["worker"] == "1/42" and job is None
    assert answer(b'{"type":"hello"}')[0]["code"] == "bad_request"  # a second hello
    assert answer(b'{"type":"ping"}')[0] == {"type": "pong"}
    assert answer(b"not json")[0]["code"] == "bad_request"
    assert answer(b'{"type":"message","id":"","text":"x"}')[0]["code"] == "bad_request"
    big = orjson.dumps({"type": "message", "id": "b", "text": "x" * 20000})
    assert answer(big)[0]["code"] == "too_large"
    ack, job = answer(b'{"type":"message","id":"m1","text":"hi"}')
    assert ack == {"type": "ack", "id": "m1", "seq": 1} and job == ("m1", "hi")
    assert answer(b'{"type":"message","id":"m2","text":"hi"}')[0]["seq"] == 2


def test_the_command_line_reaches_max_and_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatd.bench import cli, longrun

    seen: dict[str, Any] = {}
    monkeypatch.setattr(maxrate, "run_max", lambda *a: seen.setdefault("max", a))
    monkeypatch.setattr(idle, "run_idle", lambda *a: seen.setdefault("idle", a))
    args = cli.parse_args(["run", "max", "--duration", "2", "--step", "250", "--workers", "3"])
    longrun.run("max", "target", args, False, args.duration)  # type: ignore[arg-type]
    _, params, procs, _, bare_workers, direct, stored = seen["max"]
    assert (params.start, params.step, params.duration, params.connections) == (250, 250, 2, 100)
    assert (procs, bare_workers, direct, stored) == (2, 3, True, False)  # chatd's workers
    seen.clear()
    argv = ["run", "max", "--step", "250", "--start", "1500", "--no-direct", "--bare-store"]
    longrun.run("max", "target", cli.parse_args(argv), False, None)  # type: ignore[arg-type]
    _, params, _, _, _, direct, stored = seen["max"]
    assert (params.start, params.step, params.duration) == (1500, 250, 8)
    assert (direct, stored) == (False, True)
    args = cli.parse_args(["run", "idle", "--conns", "10000", "--url", "ws://h/ws"])
    longrun.run("idle", "target", args, False, None)  # type: ignore[arg-type]
    assert seen["idle"][1:] == (10000, 2, False, 2)  # a running chatd: 2 bare workers
