"""A short smoke run of ``chatd-bench``: two scenarios against its own fake + chatd, and the
seed report written from their data. Checks structure and sane values, never timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatd.bench import report, scenarios
from chatd.bench.server import OwnChatd

pytestmark = [pytest.mark.system, pytest.mark.slow]


def test_two_scenarios_and_the_seed_report(tmp_path: Path) -> None:
    target = OwnChatd(workers=1)
    try:
        results = [
            scenarios.run_scenario(name, target, duration=2.0, procs=2)
            for name in ("baseline", "low")
        ]
    finally:
        target.stop()
    by = {r["name"]: r for r in results}
    low = by["low"]
    assert low["chatd"]["scheduled"] >= 2
    assert low["chatd"]["answered"] == low["chatd"]["scheduled"]
    assert low["chatd"]["errors"]["total"] == 0
    assert low["connections"]["opened"] == 10
    assert low["connections"]["stability_pct"] == 100.0
    lat = low["chatd"]["reply_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert low["chatd"]["ack_ms"]["p50"] <= lat["p50"]
    assert low["direct"]["reply_ms"]["count"] >= 2
    assert low["overhead"]["p50"] is not None and low["overhead"]["p50"] > 0
    assert low["memory"]["rss_peak_mb"] > 1
    assert by["baseline"]["chatd"]["answered"] >= 1  # 1 msg / 10 s: the first one

    paths = report.write(
        report.build(
            results,
            {
                "command": "test",
                "date_utc": "now",
                "host": "h",
                "cores": 2,
                "memory_gb": 1,
                "python": "3",
                "git": "",
                "target": "own",
            },
        ),
        tmp_path,
    )
    md = paths[0].read_text()
    for heading in (
        "### Test 1: Baseline Performance",
        "### Test 2: Low Load",
        "| Avg Response Time |",
        "| P95 Response Time |",
        "| P99 Response Time |",
        "| Throughput |",
        "| Memory Usage",
        "| CPU Usage",
        "| Error Rate |",
        "| Connection Stability |",
        "| direct to the backend |",
        "| overhead (chatd / direct) |",
        "### Response time distribution",
        "### Throughput characteristics",
        "## Comparison with requirements",
        "| Support 10 concurrent users | 10 | 10 open, 0 errors | PASS |",
        "| Error rate <1% |",
        "| Uptime 99%+ |",
    ):
        assert heading in md, heading
    data = json.loads(paths[1].read_text())
    assert set(data["scenarios"]) == {"baseline", "low"}
    assert len(data["requirements"]) == 8


def test_the_reload_scenario_counts_what_clients_see() -> None:
    """``chatd-bench run reload``, both modes side by side: with handoff no client sees a
    disconnect and the daemon counts every connection moved; with the old drain every client
    is closed at least once (1001) and resumes, and nothing goes unanswered in either."""
    from chatd.bench import reloads

    params = reloads.ReloadParams(clients=20, reloads=2, before=1.0, think=(0.05, 0.3))
    r = reloads.run_reload(None, params, workers=1)
    handoff, drain = r["runs"]["handoff"], r["runs"]["drain (handoff = false)"]
    assert (handoff["disconnects"], handoff["connections_changed"], handoff["errors"]) == (0, 0, 0)
    assert handoff["handoff"]["moved"] == 40 and handoff["handoff"]["fell_back"] == 0
    assert handoff["replies"]["during"] > 0
    assert drain["clients_disconnected"] == 20 and drain["connections_changed"] == 20
    assert drain["errors"] == 0 and drain["handoff"]["moved"] == 0
    assert "| handoff | 0 | 0 | 0 | 0 |" in reloads.markdown(r)
