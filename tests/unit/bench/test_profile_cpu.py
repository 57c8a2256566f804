"""chatd-bench's CPU per message arithmetic and the py-spy profile summary, on known inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chatd.bench import pyspy, scenarios, server, stats


def test_per_message_us() -> None:
    assert stats.per_message_us(0.5, 1000) == 500.0  # 0.5 s over 1,000 replies
    assert stats.per_message_us(1.23456, 7) == 176365.7
    assert stats.per_message_us(0.0, 10) == 0.0
    assert stats.per_message_us(1.0, 0) is None


def test_cpu_per_reply_groups_the_processes() -> None:
    cpu = {
        "master": 0.02,
        "worker 1/100": 0.30,
        "worker 2/101": 0.20,
        "fake": 0.10,
        "client 7": 0.40,
        "client 8": 0.10,
        "py-spy": 9.0,  # not a group: ignored
    }
    assert stats.cpu_per_reply(cpu, 1000) == {
        "workers": 500.0,
        "master": 20.0,
        "backend": 100.0,
        "clients": 500.0,
    }
    # The direct baseline: no chatd process at all; the real model is keyed "model".
    assert stats.cpu_per_reply({"model": 2.0, "client 1": 0.1}, 4) == {
        "workers": None,
        "master": None,
        "backend": 500000.0,
        "clients": 25000.0,
    }
    assert stats.cpu_per_reply(cpu, 0)["workers"] is None


def test_scenario_cpu_figures_carry_the_per_reply_cost() -> None:
    cpu = {"master": 0.1, "worker 1/5": 1.0, "fake": 0.5, "client 9": 0.5}
    out = scenarios._cpu(cpu, 10.0, 2000)
    assert out["chatd_pct_of_core"] == 11.0  # (0.1 + 1.0) s over 10 s
    assert out["clients_pct_of_core"] == 5.0
    assert out["per_reply_us"] == {
        "workers": 500.0,
        "master": 50.0,
        "backend": 250.0,
        "clients": 250.0,
    }


def _doc() -> dict[str, Any]:
    """Two threads. Main: 3 samples under main -> run: two in handle (one of them in
    write below it), one idle in wait. Writer: one sample in commit."""
    frames = [
        {"name": "main", "file": "/x/chatd/cli.py", "line": 1},  # 0
        {"name": "run", "file": "/usr/lib/python3.11/asyncio/runners.py", "line": 2},  # 1
        {"name": "handle", "file": "/x/chatd/session.py", "line": 3},  # 2
        {"name": "write", "file": "/v/lib/python3.11/site-packages/aiohttp/w.py", "line": 4},
        {"name": "wait", "file": "/usr/lib/python3.11/threading.py", "line": 5},  # 4
        {"name": "commit", "file": "/x/chatd/store/sqlite.py", "line": 6},  # 5
    ]
    return {
        "shared": {"frames": frames},
        "profiles": [
            {
                "name": 'Thread 10 "MainThread"',
                "samples": [[0, 1, 2], [0, 1, 2, 3], [0, 1, 4], []],
                "weights": [0.01, 0.02, 0.5, 0.3],
            },
            {"name": 'Thread 11 "writer"', "samples": [[5]], "weights": [0.01]},
        ],
    }


def test_summarize_a_known_profile() -> None:
    s = pyspy.summarize(_doc(), top=10, is_idle=lambda f: f["name"] == "wait")
    assert s["sampled_s"] == 0.04  # 0.01 + 0.02 + 0.01; the wait and the empty stack dropped
    assert s["idle_dropped_s"] == 0.5
    # Outer frames: never a leaf, on (at least 90 % of) the thread's stacks; commit is a leaf.
    assert s["roots"] == {"MainThread": ["main (chatd/cli.py)", "run (asyncio/runners.py)"]}
    assert s["inclusive"] == [
        ["handle (chatd/session.py)", 75.0],
        ["write (aiohttp/w.py)", 50.0],
        ["commit (chatd/store/sqlite.py)", 25.0],
    ]
    assert s["self"] == [
        ["write (aiohttp/w.py)", 50.0],
        ["handle (chatd/session.py)", 25.0],
        ["commit (chatd/store/sqlite.py)", 25.0],
    ]
    assert s["threads"] == [["MainThread", 75.0], ["writer", 25.0]]
    assert dict(map(tuple, s["by_package"])) == {"aiohttp": 50.0, "chatd": 50.0}
    text = pyspy.format_summary(
        {"pid": 5, "file": "f.json", "rate_hz": 100, "duration_s": 1, "summary": s}
    )
    assert "75.0 %  handle (chatd/session.py)" in text
    assert "MainThread: 2 outer frames left out below, down to run (asyncio/runners.py)" in text


def test_summarize_drops_samples_waiting_on_a_source_line(tmp_path: Path) -> None:
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    time.sleep(1)\n    work()\n")
    frames = [
        {"name": "f", "file": str(src), "line": 2},
        {"name": "f", "file": str(src), "line": 3},
    ]
    doc = {
        "shared": {"frames": frames},
        "profiles": [{"name": "t", "samples": [[0], [1]], "weights": [1.0, 3.0]}],
    }
    s = pyspy.summarize(doc)
    assert s["idle_dropped_s"] == 1.0 and s["sampled_s"] == 3.0


def test_a_profile_file_read_back(tmp_path: Path) -> None:
    """``finish`` of a recorder that was never started says so; a file is summarized."""
    spy = pyspy.PySpy(1, tmp_path / "p.json", 0.2)
    assert spy.duration == 1
    out = spy.finish()
    assert out["error"] == "py-spy was never started" and out["summary"] is None
    assert "not recorded" in pyspy.format_summary(out)
    (tmp_path / "p.json").write_text(json.dumps(_doc()))
    assert pyspy.summarize(json.loads((tmp_path / "p.json").read_text()))["sampled_s"] > 0


@pytest.mark.parametrize(
    ("path", "short"),
    [
        ("/w/.venv/lib/python3.11/site-packages/aiohttp/client.py", "aiohttp/client.py"),
        ("/work/main/chatd/relay.py", "chatd/relay.py"),
        ("/usr/lib/python3.11/asyncio/events.py", "asyncio/events.py"),
        ("<frozen>", "<frozen>"),
    ],
)
def test_short_file(path: str, short: str) -> None:
    assert pyspy.short_file(path) == short


def test_the_store_writer_counts_with_the_workers() -> None:
    """The SQLite store's writer process does the workers' writes: its CPU is theirs in every
    figure (per reply, chatd's share of a core), and a status document names it."""
    status = {
        "master": {"pid": 10, "store_writer": {"pid": 11, "path": "/x.db", "restarts": 0}},
        "workers": [{"id": 1, "pid": 12}],
    }
    assert server.chatd_pids(status) == {"master": 10, "store writer/11": 11, "worker 1/12": 12}
    cpu = {"master": 0.1, "store writer/11": 0.5, "worker 1/12": 1.0, "client 9": 0.5}
    assert stats.cpu_per_reply(cpu, 1000)["workers"] == 1500.0
    assert scenarios._cpu(cpu, 10.0, 1000)["chatd_pct_of_core"] == 16.0
    assert [k for k in cpu if stats.serves(k)] == ["store writer/11", "worker 1/12"]
