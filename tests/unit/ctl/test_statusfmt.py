"""chatd.ctl.statusfmt: the table a sysadmin reads, and the healthy/degraded verdict."""

from __future__ import annotations

from typing import Any

from chatd.ctl.statusfmt import duration, format_status, is_healthy, problems


def doc(**overrides: Any) -> dict[str, Any]:
    worker = {
        "id": 1,
        "pid": 4250,
        "generation": 3,
        "state": "ready",
        "uptime_s": 302.0,
        "connections": 37,
        "msg_per_s": 60.24,
        "latency_ms": {"p50": 41.3, "p95": 120.0, "p99": 230.1},
        "rss_bytes": 48_100_000,
        "cpu_percent": 12.0,
        "restarts": 1,
        "last_heartbeat_s": 0.4,
    }
    data: dict[str, Any] = {
        "master": {
            "pid": 4242,
            "uptime_s": 7380.0,
            "generation": 3,
            "config": "/etc/chatd/chatd.toml",
            "bind": "0.0.0.0:8000",
            "state": "running",
            "tcp_migrate_req": 1,
            "version": "1.2.3",
            "last_reload": {"generation": 3, "ok": True, "message": "reloaded", "at": 0},
        },
        "workers": [worker],
        "other_workers": [{**worker, "pid": 4100, "generation": 2, "state": "draining"}],
        "backends": [
            {
                "url": "http://o:11434",
                "api": "ollama",
                "healthy": True,
                "in_flight": 2,
                "max_parallel": 4,
            }
        ],
        "queue": {"depth": 0, "max": 512},
        "totals": {"connections": 40, "msg_per_s": 60.2, "messages_total": 9000},
    }
    data.update(overrides)
    return data


def test_table() -> None:
    text = format_status(doc())
    lines = text.splitlines()
    assert lines[0].startswith("chatd running: master pid 4242, generation 3, up 2h03m")
    assert lines[0].endswith("1/1 workers ready")
    assert lines[1].startswith("chatd 1.2.3; config /etc/chatd/chatd.toml; ")
    header = next(line for line in lines if line.startswith("SLOT"))
    for column in (
        "PID",
        "GEN",
        "STATE",
        "UPTIME",
        "CONNS",
        "MSG/S",
        "P50 MS",
        "P99 MS",
        "RSS MB",
        "CPU%",
        "RESTARTS",
        "HEARTBEAT",
    ):
        assert column in header
    row = lines[lines.index(header) + 1].split()
    assert row[:7] == ["1", "4250", "3", "ready", "5m02s", "37", "60.2"]
    assert row[7:10] == ["41.3", "230.1", "48.1"]
    assert "draining (old)" in lines[lines.index(header) + 2]
    assert "backend http://o:11434 (ollama): healthy, 2/4 in flight" in text  # no split: as before
    assert "DEGRADED" not in text and is_healthy(doc())


def test_degraded_says_why() -> None:
    data = doc()
    data["workers"][0]["state"] = "crash-looping"
    data["backends"][0]["healthy"] = False
    assert problems(data) == ["worker slot 1 crash-looping", "backend http://o:11434 unhealthy"]
    assert "DEGRADED: worker slot 1 crash-looping" in format_status(data)
    assert not is_healthy(doc(workers=[]))


def test_durations() -> None:
    assert [duration(x) for x in (None, 4.25, 37, 302, 7380, 2 * 86400 + 3600)] == [
        "-",
        "4.2s",
        "37s",
        "5m02s",
        "2h03m",
        "2d01h",
    ]


def test_backend_line_shows_in_use_and_leased_idle_apart() -> None:
    """A slot a worker keeps leased while nothing runs is not load: the line says how many
    slots are in use and how many are leased but idle; a document without the split (an
    older master) keeps the old wording."""
    backend = {"url": "http://o:11434", "api": "ollama", "healthy": True, "max_parallel": 2}
    split = {**backend, "in_flight": 1, "in_use": 0, "leased_idle": 1}
    text = format_status(doc(backends=[split]))
    assert "backend http://o:11434 (ollama): healthy, 0/2 in use, 1 leased (idle)" in text
    assert "in flight" not in text
    old = format_status(doc(backends=[{**backend, "in_flight": 1}]))
    assert "backend http://o:11434 (ollama): healthy, 1/2 in flight" in old


def test_fleet_slots_are_shown_and_a_failing_renewal_is_a_problem() -> None:
    """With a Redis store each backend line says the fleet's figures next to this host's; a
    host that cannot renew its share grants nothing: degraded, with the reason."""
    fleet = {"in_flight": 4, "held": 4, "hosts": 2, "here_held": 1, "here_allowed": 1}
    backend = {**doc()["backends"][0], "fleet": fleet}
    backend["embed"] = {"in_flight": 0, "max_parallel": 1, "fleet": {**fleet, "in_flight": 0}}
    master_fleet = {"host": "h1:42:abcdef", "ttl_s": 2.0, "error": ""}
    data = doc(backends=[backend], fleet=master_fleet)
    text = format_status(data)
    line = next(x for x in text.splitlines() if x.startswith("backend "))
    assert "2/4 in flight (fleet: 4/4 in flight over 2 hosts, 1 held here)" in line
    assert line.endswith("; embed 0/1 in flight (fleet: 0/1 in flight over 2 hosts, 1 held here)")
    assert "LLM slots shared with the other hosts of the Redis store, as h1:42:abcdef" in text
    assert is_healthy(data)
    data["fleet"]["error"] = "no answer from the worker within 1s"
    assert problems(data) == ["fleet LLM slots not renewed (no answer from the worker within 1s)"]
    assert "(fleet:" not in format_status(doc())


def test_the_store_writer_line() -> None:
    """The SQLite store's writer: its pid and file; a restarting one stands out; none, no line."""
    base = doc()
    assert "store writer" not in format_status(base)
    base["master"]["store_writer"] = {"pid": 4251, "path": "/var/lib/chatd/s.db", "restarts": 0}
    assert "store writer pid 4251 for /var/lib/chatd/s.db" in format_status(base).splitlines()
    base["master"]["store_writer"]["store"] = {
        "commits": 1200,
        "commit_p50_ms": 0.123,
        "commit_p99_ms": 1.5,
        "wal_pages": 812,
        "checkpoints": 31,
    }
    assert (
        "store writer pid 4251 for /var/lib/chatd/s.db: 1200 commits, commit p50/p99 "
        "0.12/1.50 ms, WAL 812 pages, 31 checkpoints"
    ) in format_status(base).splitlines()
    base["master"]["store_writer"] = {"pid": None, "path": "/var/lib/chatd/s.db", "restarts": 2}
    assert (
        "store writer NOT RUNNING (restarting) for /var/lib/chatd/s.db, 2 restarts"
        in format_status(base).splitlines()
    )
    assert "the session store's writer is not running" in " ".join(problems(base))
