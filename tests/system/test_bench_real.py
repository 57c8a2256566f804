"""``chatd-bench run real``, shortened: the real SmolLM2 model (started by the scenario itself,
as ``tests/system/test_real_model.py`` starts it), one LLM slot and a queue of 3 in chatd,
far more offered than the model answers. Checks structure and sane values (the queue was
used, the overflow got ``busy``, nothing lost), never timings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest

from chatd.bench import realmodel, report
from chatd.bench.realmodel import RealParams

pytestmark = [pytest.mark.system, pytest.mark.slow]


def test_the_real_scenario_shows_the_queue_at_work(tmp_path: Path) -> None:
    p = RealParams(
        duration=2.0,
        slots=1,
        max_queue=3,
        connections=4,
        rate=40.0,  # 80 messages in 2 s for one slot of a CPU model: most find the queue full
        max_tokens=16,
        direct_s=1.0,
        workers=1,
    )
    # py-spy needs ptrace rights over the worker (root here; not a plain user under Yama 1).
    profile = tmp_path if os.geteuid() == 0 else None
    r = realmodel.run(p, profile=profile)
    json.dumps(r)  # JSON-ready

    c, q, d = r["chatd"], r["queue"], r["direct"]
    assert c["scheduled"] == 80
    assert c["errors"]["lost"] == 0
    assert set(c["errors"]["by_code"]) <= {"busy"}
    assert c["answered"] >= 1
    assert c["answered"] + q["busy"] == c["scheduled"]
    assert q["busy"] > 0  # the queue overflowed
    assert q["messages_queued"] > 0  # concurrency above the slots: messages waited
    assert 1 <= q["max_position"] <= p.max_queue
    assert 1 <= q["depth_max"] <= p.max_queue
    assert q["series"] and all(0 <= s[3] <= p.slots for s in q["series"])
    assert 1 <= q["time_queued_ms"]["count"] <= c["answered"]  # (a reply may be empty)
    assert r["backend_ttft_ms"]["count"] == c["answered"]
    assert c["ack_ms"]["count"] == c["scheduled"]
    assert d["concurrency"] == 1 and d["replies"] >= 1 and d["ttft_ms"]["count"] >= 1
    assert d["capacity_per_s"] > 0 and not d["errors"]
    if c["replies_in_window"]:
        per = r["cpu"]["per_reply_us"]
        assert per["workers"] > 0 and per["backend"] > 0
    assert r["model"]["started_here"] and r["model"]["name"]
    model = psutil.Process(r["model"]["pid"]) if psutil.pid_exists(r["model"]["pid"]) else None
    assert model is None or model.status() == psutil.STATUS_ZOMBIE  # stopped at the end

    md = report.scenario_markdown(r)
    assert "| first token (from the intended send; queue included) |" in md
    assert "| direct to the model: TTFT (1 concurrent, closed loop) |" in md
    if profile is not None:
        prof = r["profile"]
        assert prof["error"] is None, prof["error"]
        assert Path(prof["file"]).is_file() and prof["summary"]["sampled_s"] >= 0
