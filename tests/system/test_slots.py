"""Daemon-wide LLM slots: the master grants them to every worker (spec: max_parallel, queued, busy).

A real chatd with 2 workers in front of the fake Ollama, whose ``/_fake/stats`` counts the
generation requests in flight: the proof that the cap is daemon-wide is its ``max_in_flight``.
Each client runs in its own thread and timestamps the frames it receives.
"""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread, expected_reply
from tests.support import Chatd, Client, fake_config, fake_stats, running_chatd, t, wait_for

pytestmark = pytest.mark.system

MAX_PARALLEL = 3
CLIENTS = 20
KNOBS = {"first_token_ms": 0, "token_ms": 0, "tokens": 5, "hang": False}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama(["qwen2.5-coder:7b"], tokens=5)) as f:
        yield f


@pytest.fixture(autouse=True)
def reset_fake(fake: FakeOllama) -> None:
    fake_config(fake.url, **KNOBS, reset_stats=True)


def start(tmp: Path, fake: FakeOllama, max_queue: int) -> Any:
    return running_chatd(
        tmp,
        fake.url,
        workers=2,
        backends=[{"url": fake.url, "max_parallel": MAX_PARALLEL}],
        llm={"max_queue": max_queue, "first_token_timeout": 10.0, "idle_timeout": 10.0},
        limits={"messages_per_minute": 600},
    )


@dataclass
class Conversation:
    """One client's connection, its one message, and every frame it got (with arrival times)."""

    index: int
    worker: str = ""
    session: str = ""
    frames: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any]:
        return self.frames[-1][1]

    def queued(self) -> list[tuple[float, int]]:
        return [(at, f["position"]) for at, f in self.frames if f["type"] == "queued"]


def converse(d: Chatd, count: int, timeout: float = 60) -> list[Conversation]:
    """``count`` clients connect, then send one message each at the same instant (a barrier);
    each reads until its reply or final error."""
    barrier = threading.Barrier(count)

    def one(i: int) -> Conversation:
        conv = Conversation(i)
        c = Client(d.url)
        try:
            welcome = c.hello()
            conv.worker, conv.session = welcome["worker"], welcome["session"]
            barrier.wait(t(20))
            msg_id = f"m{i}"
            c.send({"type": "message", "id": msg_id, "text": f"question number {i}"})
            deadline = time.monotonic() + t(timeout)
            while True:
                frame = c.recv(max(0.1, deadline - time.monotonic()) / t(1))
                conv.frames.append((time.monotonic(), frame))
                if frame.get("id") == msg_id and frame["type"] in ("reply", "error"):
                    return conv
        finally:
            c.close()

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def backend_row(d: Chatd) -> dict[str, Any]:
    st = d.status()
    assert st is not None
    return {**st["backends"][0], "queue": st["queue"]}


def test_cap_is_daemon_wide_fifo_with_positions(tmp_path: Path, fake: FakeOllama) -> None:
    """20 clients on 2 workers, max_parallel 3: never more than 3 requests at the backend, and
    3 reached; every message answered; waiters told their position, at most once a second."""
    fake_config(fake.url, token_ms=50, tokens=10)  # ~0.5 s per reply: ~3.5 s for all 20
    with start(tmp_path, fake, max_queue=64) as d:
        convs = converse(d, CLIENTS)
        stats = fake_stats(fake.url)
        assert stats["max_in_flight"] == MAX_PARALLEL, stats
        assert stats["requests_total"] == CLIENTS
        assert len({c.worker for c in convs}) == 2, "SO_REUSEPORT used only one worker"
        for c in convs:
            assert c.final["type"] == "reply", c.final
            assert c.final["text"] == expected_reply(f"question number {c.index}", 10)
            assert c.frames[0][1]["type"] == "ack"
        waited = [c.queued() for c in convs if c.queued()]
        assert len(waited) >= CLIENTS - MAX_PARALLEL - 2, "too few clients were queued"
        for queued in waited:
            positions = [p for _, p in queued]
            assert all(1 <= p <= CLIENTS - MAX_PARALLEL for p in positions), positions
            assert positions == sorted(positions, reverse=True), positions  # only forward
            assert len(set(positions)) == len(positions), positions  # sent on change only
            gaps = [b[0] - a[0] for a, b in itertools.pairwise(queued)]
            assert all(g > 0.8 for g in gaps), gaps  # at most once a second (client clock)
        assert any(len(q) >= 2 for q in waited), "no waiter got a position update"
        wait_for(lambda: backend_row(d)["in_flight"] == 0, 5, "in_flight back to 0")
        row = backend_row(d)
        assert row["healthy"] is True and row["max_parallel"] == MAX_PARALLEL
        assert row["queue"] == {"depth": 0, "max": 64}


def test_full_queue_answers_busy_at_once(tmp_path: Path, fake: FakeOllama) -> None:
    """max_queue 4: of 20 simultaneous messages, 3 run, 4 wait, the rest get a stored,
    retryable ``busy`` error with its seq."""
    fake_config(fake.url, token_ms=100, tokens=10)  # ~1 s per reply
    with start(tmp_path, fake, max_queue=4) as d:
        convs = converse(d, CLIENTS)
        busy = [c for c in convs if c.final["type"] == "error"]
        replies = [c for c in convs if c.final["type"] == "reply"]
        assert len(busy) + len(replies) == CLIENTS
        assert busy, "no busy error with 20 messages for 3 slots and 4 places"
        assert len(replies) >= MAX_PARALLEL + 4
        for c in busy:
            err = c.final
            assert err["code"] == "busy" and err["retryable"] is True, err
            assert err["seq"] == 2 and "queue is full" in err["message"]
            assert not c.queued()
            at_ack = c.frames[0][0]
            assert c.frames[-1][0] - at_ack < t(0.5), "busy was not answered at once"
        with sqlite3.connect(d.db) as conn:
            kinds = conn.execute(
                "SELECT kind FROM events WHERE session = ? ORDER BY seq", (busy[0].session,)
            ).fetchall()
        assert kinds == [("user",), ("error",)]
        assert fake_stats(fake.url)["max_in_flight"] == MAX_PARALLEL


def test_killed_worker_slots_are_taken_back(tmp_path: Path, fake: FakeOllama) -> None:
    """SIGKILL a worker holding slots: the master takes them back and grants them to the
    waiters left; the dead worker's acknowledged messages are taken over at once by the other
    worker (its leases released: owner_gone), so they wait in the queue too; once idle,
    in_flight is 0 again and messages still flow."""
    fake_config(fake.url, hang=True)
    with start(tmp_path, fake, max_queue=64) as d:
        clients: list[tuple[Client, str]] = []
        try:
            for i in range(8):  # 3 hold the slots, 5 wait; SO_REUSEPORT spreads them
                c = Client(d.url)
                worker = c.hello()["worker"]
                c.send({"type": "message", "id": f"k{i}", "text": f"hold {i}"})
                assert c.recv()["type"] == "ack"
                clients.append((c, worker))

            def holder() -> int | None:
                st = d.status()
                if st is None or st["backends"][0]["in_flight"] != MAX_PARALLEL:
                    return None
                for w in st["workers"]:
                    held = sum(b.get("in_flight", 0) for b in w.get("backends", []))
                    others = [c for c, name in clients if not name.endswith(f"/{w['pid']}")]
                    if held and others:  # the other worker has clients that can go on
                        return int(w["pid"])
                return None

            pid = wait_for(holder, 10, "a worker holding slots")
            assert backend_row(d)["queue"]["depth"] == 8 - MAX_PARALLEL
            os.kill(pid, signal.SIGKILL)
            survivors = [c for c, name in clients if not name.endswith(f"/{pid}")]
            # Its slots come back; its messages are taken over by the other worker at once, so
            # every one of the 8 is generating or waiting again.
            wait_for(
                lambda: (
                    backend_row(d)["in_flight"] == MAX_PARALLEL
                    and backend_row(d)["queue"]["depth"] == len(clients) - MAX_PARALLEL
                ),
                10,
                "the dead worker's slots granted again and its messages queued again",
            )
            assert "leases released" in d.log()
            fake_config(fake.url, hang=False)
            for c in survivors:
                final = c.until(lambda f: f["type"] in ("reply", "error") and "seq" in f)[-1]
                assert final["type"] == "reply", final
            wait_for(lambda: backend_row(d)["in_flight"] == 0, 10, "in_flight back to 0")
            assert backend_row(d)["queue"]["depth"] == 0
            fresh = Client(d.url)
            fresh.hello()
            assert fresh.ask("after", "still flowing")[-1]["type"] == "reply"
            fresh.close()
            assert f"(pid {pid}) held" in d.log() and "LLM slots: taken back" in d.log()
        finally:
            fake_config(fake.url, hang=False)
            for c, _ in clients:
                c.close()
