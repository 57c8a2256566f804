"""A session store outage under load: visible to operators, clear to clients, survived.

Two stores, two faults, one real chatd each: the SQLite file's disk fills up (a 4 MiB tmpfs),
and the Redis server is SIGKILLed and started again. While the store fails:

- a message is answered ``store_unavailable`` carrying its ``id``, and never acknowledged
  (no ack without a commit: every acknowledged id is in the store afterwards);
- ``chatctl status`` exits 1 naming the store, ``/readyz`` answers 503 saying why,
  ``chatd_store_up`` is 0 and ``chatd_errors_total{code="store_unavailable"}`` counts;
- the master and its workers stay up (same pids).

When the store is back (space freed, Redis restarted), chatd sees it by itself (no client
traffic needed: the workers probe an unavailable store every second), and the client's resend
of the same id is acknowledged and answered.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread, expected_reply
from tests.conftest import DiskFiller, RedisServer
from tests.support import BIN, Chatd, Client, http_get, running_chatd, t, wait_for

pytestmark = pytest.mark.system
TOKENS = 4


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama(["qwen2.5-coder:7b"], tokens=TOKENS)) as f:
        yield f


def metrics(d: Chatd) -> str:
    status, _, body = http_get(f"{d.http}/metrics")
    assert status == 200
    return body.decode()


def sample(text: str, series: str) -> float:
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else -1.0


def chatctl_status(d: Chatd) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "chatctl"), "--socket", d.socket, "status"],
        capture_output=True,
        text=True,
        timeout=t(10),
    )


def send(c: Client, msg_id: str) -> dict[str, Any]:
    """Send message ``msg_id``; its first answer: the ack, or an error naming it."""
    c.send({"type": "message", "id": msg_id, "text": f"message {msg_id} " + "x" * 2000})
    frames = c.until(lambda f: f.get("id") == msg_id and f["type"] in ("ack", "error"))
    return frames[-1]


def outage(d: Chatd, break_store: Callable[[], None], mend_store: Callable[[], None]) -> set[str]:
    """Chat, break the store, check what everyone sees, mend it, check the recovery; returns
    the ids acknowledged."""
    pids = d.worker_pids()
    master = d.proc.pid  # type: ignore[union-attr]
    c = Client(d.url)
    session = c.hello()["session"]
    acked: set[str] = set()
    reply = c.ask("before", "hello there")[-1]
    assert reply["type"] == "reply"
    acked.add("before")
    assert sample(metrics(d), "chatd_store_up") == 1

    break_store()
    # Within a few messages one fails (Redis: the first; a full disk: once the WAL must grow).
    error: dict[str, Any] | None = None
    for i in range(400):
        answer = send(c, f"m{i}")
        if answer["type"] == "ack":
            acked.add(f"m{i}")
            continue
        error = answer
        break
    assert error is not None, "the store never failed"
    failed_id = error["id"]
    assert error["code"] == "store_unavailable" and error["retryable"] is True
    assert "same id" in error["message"] and "seq" not in error

    # Operators see it: status, /readyz, /metrics.
    r = wait_for(lambda: (r := chatctl_status(d)).returncode == 1 and r, 10, "status degraded")
    assert "session store" in r.stdout.lower(), r.stdout

    # Every worker: the one that wrote first, then the others' probes (every 5 s).
    def failing() -> set[int]:
        st = d.status()
        return set((st or {}).get("store", {}).get("failing_workers") or [])

    wait_for(lambda: failing() == {1, 2}, 15, "every worker seeing the store down")
    status, _, body = http_get(f"{d.http}/readyz")
    assert status == 503 and b"session store" in body, body
    text = metrics(d)
    assert sample(text, "chatd_store_up") == 0
    # The counts come with each worker's next report (every second): a report sent between
    # the store's failure (health already down) and the error frame's count lacks them.
    wait_for(
        lambda: (
            sample(now := metrics(d), 'chatd_errors_total{code="store_unavailable"}') >= 1
            and sample(now, "chatd_store_failures_total") >= 1
        ),
        5,
        "the failure and the refused message counted in /metrics",
    )

    mend_store()
    # Seen by itself: no client traffic until it is.
    wait_for(lambda: not failing(), 20, "every worker seeing the store back")
    assert http_get(f"{d.http}/readyz")[0] == 200
    wait_for(lambda: sample(metrics(d), "chatd_store_up") == 1, 10, "chatd_store_up 1 again")
    wait_for(lambda: chatctl_status(d).returncode == 0, 10, "status healthy again")
    # The client sends the refused message again, same id: acknowledged and answered.
    c.send({"type": "message", "id": failed_id, "text": "once more"})
    frames = c.until(lambda f: f.get("id") == failed_id and f["type"] == "reply", timeout=30)
    assert any(f["type"] == "ack" for f in frames)
    assert frames[-1]["text"] == expected_reply("once more", TOKENS)
    acked.add(failed_id)
    c.close()
    assert d.worker_pids() == pids and d.proc.pid == master  # type: ignore[union-attr]
    assert d.proc.poll() is None  # type: ignore[union-attr]
    return {f"{session}/{m}" for m in acked}


def test_sqlite_disk_full(tmp_path: Path, small_disk: Path, fake: FakeOllama) -> None:
    db = small_disk / "sessions.db"
    with running_chatd(
        tmp_path,
        fake.url,
        workers=2,
        sessions={"store": f"sqlite://{db}"},
        limits={"messages_per_minute": 100000},
    ) as d:
        filler = DiskFiller(small_disk)
        acked = outage(d, filler.start, filler.stop)
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT session, msg_id FROM events WHERE kind = 'user'")
            stored = {f"{s}/{m}" for s, m in rows}
        assert acked <= stored, sorted(acked - stored)[:5]


def test_redis_killed_and_restarted(
    tmp_path: Path, start_redis: Callable[..., RedisServer], fake: FakeOllama
) -> None:
    # appendfsync always: with everysec (the default) Redis postpones its AOF writes while the
    # last second's fsync is still running (a busy disk: `pytest -n 2`, the whole suite) and
    # answers meanwhile, so a SIGKILL then loses writes it acknowledged: the session's first
    # exchange, even its creation. The resend then gets store_unavailable (unknown session), or
    # seqs the connection was sent already (dropped as duplicates), and never its reply.
    server = start_redis("--appendfsync", "always")
    with running_chatd(
        tmp_path,
        fake.url,
        workers=2,
        sessions={"store": server.url},
        limits={"messages_per_minute": 100000},
    ) as d:
        acked = outage(d, server.kill, server.start)
        r = redis.Redis(port=server.port, decode_responses=True)
        stored: set[str] = set()
        for key in r.scan_iter("chatd:s:*:log"):  # chatd:s:{SESSION}:log, a stream
            session = key[len("chatd:s:{") : -len("}:log")]
            for _, fields in r.xrange(key):
                if fields.get("k") == "user":
                    stored.add(f"{session}/{fields.get('m')}")
        r.close()
        assert stored, "no stream found: the key layout changed?"
        assert acked <= stored, sorted(acked - stored)[:5]
