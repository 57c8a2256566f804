"""Zero loss under faults: workers SIGKILLed under load, every acknowledged message answered once.

Two workers, CLIENTS clients of :class:`chatd.client.ChatClient` in one event loop sending
continuously (at most OUTSTANDING messages awaiting an answer each), and a serving worker
SIGKILLed every KILL_EVERY seconds for CHAOS_S seconds (pids from ``chatctl status --json``).
Then quiet, until every outbox is empty and every acknowledged message is answered (bounded).

Checked, from the store (the SQLite file or Redis, read directly; on one Redis server, a
3-master Cluster and a Sentinel-managed master):

1. every stored user message has exactly one final event (reply or error);
2. each session's seqs are 1..N, contiguous;

and from what the clients received:

3. no stored event (ack, reply, final error) was delivered twice, and seqs came in order;
4. every acknowledged message got exactly one answer (reply or final error);
5. every message the client sent was acknowledged (none lost before the ack either);

and 6. the master's pid never changed; 7. the messages of the killed workers were released at
once (the master's ``owner_gone``, ``chatd.master.takeover``), not only after their lease.
The figures (acknowledged, replies, takeovers, leases released, duplicates, lost) are printed
per store (``pytest -s`` shows them).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatd.client import ChatClient
from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from tests.conftest import redis_client
from tests.support import Chatd, fake_config, running_chatd, t
from tests.tally import Tally, quiet, run_client

pytestmark = [pytest.mark.system, pytest.mark.timeout(300)]

CLIENTS = 50
OUTSTANDING = 2  # messages a client has awaiting an answer at most
SEND_PAUSE = (0.1, 0.4)  # seconds between two sends of a client
KILL_EVERY = 2.0
CHAOS_S = 20.0  # 10 kills: each test kept under ~30 s of the suite's 10 minutes
QUIET_S = 90.0  # bound on the wait for every answer after the chaos


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    # 10 tokens 30 ms apart: a reply takes ~0.3 s, so kills often land mid-generation.
    with FakeOllamaThread(
        FakeOllama(["qwen2.5-coder:7b"], tokens=10, token_ms=30, first_token_ms=20)
    ) as f:
        yield f


def _killer(d: Chatd, pids: list[int], takeovers: dict[int, int], victim: str) -> None:
    """In a thread: SIGKILL a ready worker (``victim`` "worker") or the SQLite store's writer
    process ("writer") every KILL_EVERY s for CHAOS_S s."""
    end = time.monotonic() + t(CHAOS_S)
    while time.monotonic() < end:
        time.sleep(KILL_EVERY)
        st = d.status()
        if st is None:
            continue
        for w in st["workers"]:
            takeovers[w["pid"]] = max(takeovers.get(w["pid"], 0), w.get("takeovers_total", 0))
        if victim == "writer":
            writer = st["master"]["store_writer"]
            ready = [writer["pid"]] if writer["pid"] is not None else []
        else:
            ready = [w["pid"] for w in st["workers"] if w["state"] == "ready"]
        if ready:
            pid = random.choice(ready)
            os.kill(pid, signal.SIGKILL)
            pids.append(pid)


def _store_logs_sqlite(db: Path) -> dict[str, list[tuple[int, str, str]]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT session, seq, kind, msg_id FROM events ORDER BY session, seq")
        logs: dict[str, list[tuple[int, str, str]]] = {}
        for session, seq, kind, msg_id in rows:
            logs.setdefault(session, []).append((seq, kind, msg_id))
    return logs


def _store_logs_redis(url: str, sessions: list[str]) -> dict[str, list[tuple[int, str, str]]]:
    raw = redis_client(url)  # one server, a Cluster or the Sentinels' master
    logs = {}
    try:
        for s in sessions:
            entries = raw.xrange(f"chatd:s:{{{s}}}:log")
            logs[s] = [(int(i.partition("-")[0]), f["k"], f["m"]) for i, f in entries]
    finally:
        raw.close()
    return logs


def _chaos(d: Chatd, store: str, redis_url: str | None, victim: str = "worker") -> dict[str, Any]:
    master = d.status()
    assert master is not None
    master_pid = master["master"]["pid"]
    tallies = [Tally() for _ in range(CLIENTS)]
    killed: list[int] = []
    takeovers: dict[int, int] = {}

    async def main() -> list[ChatClient]:
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(
                run_client(d.url, stop, tl, outstanding=OUTSTANDING, pause=SEND_PAUSE)
            )
            for tl in tallies
        ]
        await asyncio.to_thread(_killer, d, killed, takeovers, victim)
        stop.set()
        clients = await asyncio.gather(*tasks)
        await quiet(clients, tallies, QUIET_S)
        return clients

    clients = asyncio.run(main())
    st = d.status()
    assert st is not None
    for w in st["workers"]:
        takeovers[w["pid"]] = max(takeovers.get(w["pid"], 0), w.get("takeovers_total", 0))
    # The log counts every takeover, also of workers killed before a status poll saw it.
    logged = sum(int(n) for n in re.findall(r"takeover: (\d+) unanswered", d.log()))
    released = sum(int(n) for n in re.findall(r"worker died: its (\d+) leases released", d.log()))

    sessions = [c.session for c in clients if c.session]
    assert len(sessions) == CLIENTS
    logs = _store_logs_sqlite(d.db) if redis_url is None else _store_logs_redis(redis_url, sessions)
    # 1-2. From the store.
    stored_users = finals = 0
    problems: list[str] = []
    for s in sessions:
        log = logs.get(s, [])
        if [seq for seq, _, _ in log] != list(range(1, len(log) + 1)):
            problems.append(f"session {s[:8]}: seqs not contiguous")
        kinds = Counter((kind == "user", m) for _, kind, m in log)
        for is_user, m in kinds:
            if is_user:
                stored_users += 1
                answers = kinds.get((False, m), 0)
                finals += answers
                if answers != 1:
                    problems.append(f"{s[:8]}/{m}: {answers} final events")
    # 3-5. From the clients.
    duplicates = lost = acked = replies = unsent = 0
    for tl in tallies:
        duplicates += len(tl.seqs) - len(set(tl.seqs))
        if tl.seqs != sorted(tl.seqs):
            problems.append("seqs delivered out of order")
        acked += len(tl.acked)
        replies += sum(tl.answers.values())
        duplicates += sum(n - 1 for n in tl.answers.values() if n > 1)
        lost += tl.unanswered
        unsent += len(tl.sent - set(tl.acked))
    final_status = d.status()
    assert final_status is not None
    figures = {
        "store": store,
        "clients": CLIENTS,
        f"{victim}s_killed": len(killed),
        "acknowledged": acked,
        "stored_user_messages": stored_users,
        "replies_or_final_errors": replies,
        "stored_finals": finals,
        "takeovers_status": sum(takeovers.values()),
        "takeovers_logged": logged,
        "leases_released_at_once": released,
        "duplicates": duplicates,
        "lost": lost + unsent,
    }
    print(f"\nCHAOS {json.dumps(figures)}")
    assert final_status["master"]["pid"] == master_pid, "the master was replaced"
    assert len(killed) >= int(CHAOS_S / KILL_EVERY) - 2
    assert not problems, problems[:20]
    assert duplicates == 0 and lost == 0 and unsent == 0, figures
    assert acked == stored_users == replies == finals, figures
    if victim == "worker":
        assert logged > 0, "no message was taken over: the kills never hit a generation?"
        assert released > 0, "no lease of a killed worker was released: all waited to lapse"
    else:  # the workers lived on, each writer replaced by the master
        assert {w["pid"] for w in final_status["workers"]} == {w["pid"] for w in master["workers"]}
        writer = final_status["master"]["store_writer"]
        assert writer["restarts"] == len(killed) and writer["pid"] not in killed, writer
        assert "commits" in writer["store"], writer  # the new writer reports its figures
    return figures


@pytest.mark.parametrize("victim", ["worker", "writer"])
def test_chaos_sqlite(fake: FakeOllama, tmp_path: Path, victim: str) -> None:
    """``worker``: a serving worker SIGKILLed every KILL_EVERY s. ``writer``: the SQLite
    store's writer process (chatd.store.sqlite_host) instead, under the same load: the master
    replaces it, the workers connect again (the writes in flight fail: a user message is then
    sent again by its client, a reply is generated again once its lease lapsed) and the same
    bars hold: no acknowledged message lost, none answered twice, no worker restarted."""
    with running_chatd(
        tmp_path,
        fake.url,
        workers=2,
        limits={"messages_per_minute": 600},
    ) as d:
        _chaos(d, "sqlite", None, victim=victim)


@pytest.mark.parametrize("kind", ["redis", "redis-cluster", "redis-sentinel"])
def test_chaos_redis(
    fake: FakeOllama, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """The same bars on one Redis server, a 3-master Cluster and a Sentinel-managed master
    (issue #14: the store's scripts are Cluster-safe, Sentinel is followed)."""
    fixture = {"redis": "redis_url", "redis-cluster": "redis_cluster_url"}
    url = request.getfixturevalue(fixture.get(kind, "redis_sentinel_url"))
    with running_chatd(
        tmp_path,
        fake.url,
        workers=2,
        sessions={"store": url},
        limits={"messages_per_minute": 600},
    ) as d:
        _chaos(d, kind, url)


def test_takeover_after_sigkill_reaches_the_resumed_client(
    fake: FakeOllama, tmp_path: Path
) -> None:
    """One worker, SIGKILLed mid-reply: the client resumes on its replacement, which the master
    has release the dead worker's lease as soon as it is ready; the message is generated again
    there and answered live, exactly once; the replacement counts the takeover in ``chatctl
    status --json`` (``takeovers_total``)."""
    with running_chatd(tmp_path, fake.url, workers=1) as d:
        fake_config(fake.url, token_ms=200, tokens=20)
        tally = Tally()

        async def main() -> None:
            async with ChatClient(d.url, on_event=tally, initial_delay=0.05) as client:
                msg_id = await client.send("slow one")
                await tally.wait(lambda: msg_id in tally.acked, 10)
                await asyncio.sleep(0.5)  # mid-generation
                os.kill(int(client.worker.split("/")[1]), signal.SIGKILL)
                await tally.wait(lambda: tally.answers[msg_id] > 0, 30)
                await asyncio.sleep(0.5)  # nothing more may come

        try:
            asyncio.run(main())
        finally:
            fake_config(fake.url, token_ms=30, tokens=10)
        assert dict(tally.answers) == {next(iter(tally.acked)): 1}
        assert len(tally.seqs) == len(set(tally.seqs)) == 2
        st = d.status()
        assert st is not None and st["workers"][0]["takeovers_total"] == 1
