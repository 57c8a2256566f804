"""``chatd-bench run capacity`` end to end with tiny parameters: its own fake + chatd, 20 users,
a ``run real`` result given. Checks structure and sane values, never timings."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from chatd.bench import cli

pytestmark = [pytest.mark.system, pytest.mark.slow]


def test_capacity_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real = tmp_path / "real.json"
    real.write_text(
        json.dumps(
            {
                "name": "real",
                "params": {"slots": 2, "max_tokens": 24},
                "model": {"name": "smollm2:135m"},
                "direct": {"capacity_per_s": 3.0},
                "chatd": {"throughput_per_s": 3.1},
            }
        )
    )
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    out = tmp_path / "out"
    argv = ["run", "capacity", "--workers", "1", "--conns", "20", "--msgs-per-min", "60"]
    argv += ["--duration", "2", "--procs", "1", "--no-progress"]
    argv += ["--real-result", str(real), "--out", str(out)]
    assert cli.main(argv) == 0
    md = capsys.readouterr().out
    assert (out / "capacity.md").read_text().strip() == md.strip()
    r = json.loads((out / "capacity.json").read_text())
    assert r["name"] == "capacity" and r["params"]["window"] == 2.0

    load = r["load"]
    assert load["scheduled"] >= 20 and load["answered"] == load["scheduled"]
    assert load["errors"]["total"] == 0 and load["connect_failed"] == 0
    m = r["measured"]
    assert m["users"] == 20 and m["workers"] == 1 and m["replies"] >= 20
    assert m["connections_seen_by_chatd"] == 20
    assert m["worker_base_mb"] > 1 and m["master_rss_mb"] > 1
    assert isinstance(m["idle_kb_per_conn"], float) and isinstance(m["active_kb_per_conn"], float)
    assert m["worker_cpu_us_per_msg"] is not None and m["worker_cpu_us_per_msg"] >= 0
    assert m["marginal_cpu_us_per_msg"] is not None and m["marginal_cpu_us_per_msg"] >= 0
    assert r["llm"]["per_slot"] == 1.5
    tiers = {t["tier"]: t for t in r["tiers"]}
    assert list(tiers) == ["MVP", "Small", "Medium", "Large"]
    large = tiers["Large"]
    assert large["cores"] is not None and large["cores"] >= 1
    assert large["memory_mb"] is not None and large["memory_mb"] > tiers["MVP"]["memory_mb"]
    assert large["llm_slots"] == pytest.approx(1000 / 1.5, abs=0.1)  # 60 msg/min a user
    for text in (
        "### Capacity: the seed's server requirements",
        "| RSS per active connection (workers;",
        "| MVP | 50 | 50.0 |",
        "| Large | 1,000+ | 1,000.0 |",
        "**The model's throughput is the separate limit**",
        "1.50 per slot",
    ):
        assert text in md, text
    # everything the run started is gone (the clients, chatd, the fake)
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not [pid for pid in left if psutil.pid_exists(pid)]
