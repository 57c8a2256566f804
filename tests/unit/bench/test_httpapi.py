"""The ``http`` and ``fairness`` scenarios' pure parts: a path's figures and both tables from
hand-made records, the fairness set-up (tokens, chatd's config keys, the fake's knobs), and
the command line."""

from __future__ import annotations

import math
from typing import Any

import pytest

from chatd import config_schema
from chatd.bench import cli, fairness, fairstats, httpapi, report
from chatd.bench.load import LoadResult, Record


def _result() -> LoadResult:
    """Window [1, 11): 100 answered (latency 2 ms + k µs, first token 1 ms), a 429, one
    lost; one message before the window and one after it, not counted."""
    recs: list[Record] = []
    for k in range(100):
        t = 1.0 + k * 0.1
        recs.append((t, t + 0.0001, None, t + 0.001, t + 0.002 + k * 1e-6, None))
    recs.append((5.0, 5.0, None, None, 5.001, "http_429"))
    recs.append((6.0, None, None, None, None, None))  # never sent: lost
    recs.append((0.5, 0.5, None, 0.501, 0.502, None))
    recs.append((11.5, 11.5, None, 11.501, 11.502, None))
    return LoadResult(records=recs, connections_opened=10, bad_reply=1)


def test_path_figures() -> None:
    cpu = {"worker 1/10": 2.0, "master": 0.1, "fake": 1.0, "client 1": 9.5, "client 2": 3.0}
    f = httpapi.figures(_result(), cpu, 42.0, warmup=1.0, duration=10.0)
    assert f["scheduled"] == 102 and f["sent"] == 101 and f["completed"] == 100
    assert f["errors"]["by_code"] == {"http_429": 1} and f["errors"]["lost"] == 1
    assert f["errors"]["total"] == 2 and f["bad_reply"] == 1
    lat, ttft = f["latency_ms"], f["ttft_ms"]
    assert lat["count"] == 100 and lat["p50"] == pytest.approx(2.049)
    assert lat["p999"] == pytest.approx(2.099) and lat["p99"] == pytest.approx(2.098)
    assert ttft["p50"] == pytest.approx(1.0) and ttft["p999"] == pytest.approx(1.0)
    assert f["send_lag_ms"]["p50"] == pytest.approx(0.1)
    assert f["replies_per_s"] == pytest.approx(10.0, abs=0.2)
    c = f["cpu"]
    assert c["chatd_pct_of_core"] == pytest.approx(21.0)
    assert c["client_max_pct_of_core"] == 95.0 and c["generator_saturated"] is True
    assert c["machine_busy_pct"] == 42.0 and c["machine_saturated"] is False
    assert f["connections"] == {"opened": 10, "failed": 0, "closed_by_server": 0}


def test_path_figures_without_answers() -> None:
    lost = LoadResult(records=[(1.0, 1.0, None, None, 1.1, "malformed_response")])
    f = httpapi.figures(lost, {}, None, warmup=0.5, duration=1.0)
    assert f["completed"] == 0 and f["latency_ms"] == {"count": 0} and "p999" not in f["ttft_ms"]
    assert f["errors"]["by_code"] == {"malformed_response": 1}
    assert f["cpu"]["generator_saturated"] is False and f["cpu"]["machine_busy_pct"] is None


def test_http_base_and_params() -> None:
    assert httpapi.http_base("ws://127.0.0.1:8000/ws") == "http://127.0.0.1:8000"
    assert httpapi.http_base("wss://h:443/ws?x=1") == "https://h:443"
    assert httpapi.http_base("http://h:1/") == "http://h:1"
    p = httpapi.HttpParams()
    assert (p.connections, p.rate, p.duration, p.paths) == (100, 1000.0, 20.0, httpapi.PATHS)
    assert p.warmup == 2.0 and httpapi.HttpParams(duration=1.0).warmup == 0.5
    with pytest.raises(ValueError):
        httpapi.run_http(None, p)
    with pytest.raises(ValueError):
        httpapi.run_http(None, httpapi.HttpParams(paths=("grpc",)), "http://h:1")


def test_http_markdown() -> None:
    f = httpapi.figures(_result(), {"client 1": 1.0}, 10.0, warmup=1.0, duration=10.0)
    r: dict[str, Any] = {
        "name": "http",
        "title": httpapi.TITLE,
        "params": {"connections": 100, "rate": 1000.0, "duration": 10.0, "warmup": 1.0},
        "procs": 2,
        "target": {"ws": None, "http": "http://h:1"},
        "paths": {"ollama": f, "openai": f},
        "skipped": {"ws": "no chatd"},
    }
    md = report.scenario_markdown(r)
    assert md.startswith(f"### {httpapi.TITLE}")
    assert "| POST /api/chat (NDJSON) | 101 | 100 | http_429 1, lost 1 | " in md
    assert "| 2.05 / 2.10 / 2.10 | 1.00 / 1.00 / 1.00 |" in md
    assert "| POST /v1/chat/completions (SSE) |" in md
    assert "/ws (WebSocket): skipped (no chatd)" in md
    assert "Replies with unexpected text: {'ollama': 1, 'openai': 1}" in md


def test_fairness_setup_uses_existing_config_keys() -> None:
    p = fairness.FairParams()
    tokens = fairness.client_tokens(p)
    assert len(tokens) == 6 == len(set(tokens)) and p.classes.count("light") == 5
    assert fairness.phase_tokens("round_robin", p) == tokens
    assert fairness.phase_tokens("fifo", p) == [tokens[0]] * 6
    schema = config_schema.schema()
    for section, keys in fairness.chatd_sections(p).items():
        for key in keys:
            assert key in schema[section], f"[{section}] {key}"
    # OwnChatd sets these from the params: they must exist too
    assert "max_queue" in schema["llm"] and "first_token_timeout" in schema["llm"]
    assert "max_parallel" in {f for _, f, _, _ in config_schema.iter_keys()}
    assert p.max_queue >= p.flood_in_flight + p.light
    assert p.max_queued_per_key >= p.flood_in_flight + p.light  # FIFO: one key holds them all
    knobs = fairness.fake_knobs(p)
    # the fake writes token i at i * token_ms, the done line at (tokens - 1) * token_ms
    assert knobs["first_token_ms"] == 0
    assert (knobs["tokens"] - 1) * knobs["token_ms"] == pytest.approx(1000 * p.reply_s)
    assert p.warmup == 5.0 and fairness.FairParams(duration=2.0).warmup == 0.5


def _phase(name: str, completions: dict[int, int]) -> dict[str, Any]:
    p = fairness.FairParams(duration=10.0)
    recs: list[fairstats.FairRecord] = [
        (c, 5.0 + 0.1 * k, 5.5 + 0.1 * k, 7.5 + 0.1 * k, None)
        for c, n in completions.items()
        for k in range(n)
    ]
    recs.append((1, 14.0, None, None, None))
    d = fairstats.demands(p.classes, p.reply_s, 2.0, p.flood_in_flight)
    f = fairstats.phase_figures(recs, p.classes, (5.0, 15.0), d)
    return f | {
        "phase": name,
        "keys": 6 if name == "round_robin" else 1,
        "bad_reply": 0,
        "backend": {"max_in_flight": 2},
        "queue_mid": {"depth": 48, "keys": [{"key": "a"}, {"key": "b"}]},
    }


def test_fairness_markdown() -> None:
    p = fairness.FairParams(duration=10.0)
    rr = _phase("round_robin", {0: 4, 1: 1, 2: 1, 3: 1, 4: 1, 5: 2})
    fifo = _phase("fifo", {0: 9, 1: 1})
    r = {
        "name": "fairness",
        "title": fairness.TITLE,
        "params": {
            **p.__dict__,
            "think_s": [1.0, 3.0],
            "warmup": p.warmup,
            "capacity_per_s": 1.0,
            "token_ms": p.token_ms,
        },
        "target": "own",
        "phases": {"round_robin": rr, "fifo": fifo},
        "throughput_ratio_rr_fifo": 1.0,
    }
    md = report.scenario_markdown(r)
    assert md.startswith(f"### {fairness.TITLE}")
    assert "| round robin (a key per client) | light (5) | 6 | 0.600 |" in md
    assert "| FIFO (one key) | flooder (1) | 9 | 0.900 | 0.50 / 0.50 | 2.50 / 2.50 | 0 |" in md
    assert "| FIFO (one key) | light (5) | 1 | 0.100 |" in md
    assert "pending" in md and "| 1, 1.00 / 1.00 |" in md
    assert f"| **Jain's index** (grants / fair grants while waiting) | {rr['jain']:.3f} |" in md
    assert f"| outcome: Jain over throughput / max-min fair share | {rr['jain_maxmin']:.3f} |" in md
    assert "| backend's most requests in flight | 2 | 2 |" in md
    assert "Throughput ratio round robin / FIFO: 1.000" in md
    assert "chatd's queue half-way (FIFO (one key)): depth 48, keys waiting 2" in md
    assert rr["jain_maxmin"] > fifo["jain_maxmin"]  # no overlapping waits: both jain 1


def test_command_line() -> None:
    a = cli.parse_args(["run", "fairness", "--duration", "20", "--flood", "10", "--phase", "fifo"])
    p = fairness.params_from(a)
    assert (p.duration, p.flood_in_flight, p.light, p.phases, p.slots) == (
        20.0,
        10,
        5,
        ("fifo",),
        2,
    )
    assert fairness.params_from(cli.parse_args(["run", "fairness"])).duration == 60.0
    a = cli.parse_args(["run", "http", "--paths", "ollama", "openai", "--target", "http://h:1"])
    assert a.target == "http://h:1" and a.paths == ["ollama", "openai"]
    hp = cli._http_params(a)
    assert hp.paths == ("ollama", "openai") and hp.duration == 20.0 and hp.procs == 2
    assert math.isclose(cli._http_params(cli.parse_args(["run", "http"])).rate, 1000.0)
    with pytest.raises(SystemExit):
        cli.parse_args(["run", "http", "--paths", "grpc"])
    with pytest.raises(SystemExit):
        cli.main(["run", "fairness", "--url", "ws://h:1/ws", "--control-socket", "/x"])
