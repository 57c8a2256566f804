"""SQLite under contention: every worker writing at full speed, one SIGKILLed mid-write.

Run twice: with each worker writing the file itself, and through the host's store writer.

Two workers on one SQLite file, CLIENTS clients of :class:`chatd.client.ChatClient` in one event
loop sending with no pause (at most OUTSTANDING messages awaiting an answer each) against a fake
Ollama with no delay, so both workers' writers contend for the file's write lock all the time.
After KILL_AFTER s one serving worker is SIGKILLed (while writing: at this rate a writer is
always busy); the clients go on until WRITE_S, then quiet until every outbox is empty and every
acknowledged message is answered (bounded).

Checked afterwards, reading the file with ``sqlite3``:

1. every acknowledged message's row exists (in its session, with the seq of its ack);
2. every stored user message has exactly one final event, and seqs are contiguous;

and from what the clients received: ``database is locked`` never surfaced: no ``internal``
error, no error naming a lock; the workers met at the write gate (``store.lock_waits`` > 0:
one waited for the other's batch, chatd.store.sqlite_gate). The workers' ``store.busy_retries``
and ``lock_waits`` (``chatctl status --json``, polled before the kill and at the end) are
printed with the other figures (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatd.client import ChatClient
from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from tests.support import Chatd, running_chatd, t
from tests.tally import Tally, quiet, run_client

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

CLIENTS = 40
OUTSTANDING = 4  # messages a client has awaiting an answer at most
KILL_AFTER = 3.0  # seconds of writing before the kill
WRITE_S = 8.0  # seconds of writing in all
QUIET_S = 15.0  # bound on the wait for every answer afterwards
LEASE = "2"  # seconds (CHATD_TEST_LEASE): the killed worker's messages are taken over quickly


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(
        FakeOllama(["qwen2.5-coder:7b"], tokens=3, token_ms=0, first_token_ms=0)
    ) as f:
        yield f


def _busy_retries(d: Chatd, seen: dict[int, int], waits: dict[int, int]) -> None:
    """Record each worker's ``store.busy_retries`` and ``store.lock_waits`` (by pid: a
    replacement counts anew)."""
    st = d.status()
    for w in (st or {}).get("workers", []):
        store = w.get("store") or {}
        if "busy_retries" in store:
            seen[w["pid"]] = max(seen.get(w["pid"], 0), int(store["busy_retries"]))
            waits[w["pid"]] = max(waits.get(w["pid"], 0), int(store["lock_waits"]))


@pytest.mark.parametrize("writes", ["own", "host-writer"])
def test_sqlite_contention_with_a_worker_killed_mid_write(
    fake: FakeOllama, tmp_path: Path, writes: str
) -> None:
    """``own``: each worker writes the file itself (``sqlite_writer = false``): they meet at
    the write gate. ``host-writer`` (the default): the master's store writer does every
    worker's writes (chatd.store.sqlite_host): no worker waits for a lock or retries."""
    with running_chatd(
        tmp_path,
        fake.url,
        workers=2,
        env={"CHATD_TEST_LEASE": LEASE},
        limits={"messages_per_minute": 100000},
        backends=[{"url": fake.url, "max_parallel": 64}],
        sessions={"sqlite_writer": writes == "host-writer"},
    ) as d:
        tallies = [Tally() for _ in range(CLIENTS)]
        busy: dict[int, int] = {}
        waits: dict[int, int] = {}
        killed: list[int] = []

        async def main() -> list[ChatClient]:
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(run_client(d.url, stop, tl, outstanding=OUTSTANDING))
                for tl in tallies
            ]
            await asyncio.sleep(t(KILL_AFTER))
            await asyncio.to_thread(_busy_retries, d, busy, waits)
            st = await asyncio.to_thread(d.status)
            assert st is not None
            ready = [w["pid"] for w in st["workers"] if w["state"] == "ready"]
            os.kill(ready[0], signal.SIGKILL)
            killed.append(ready[0])
            await asyncio.sleep(t(WRITE_S - KILL_AFTER))
            stop.set()
            clients = await asyncio.gather(*tasks)
            await quiet(clients, tallies, QUIET_S)
            return clients

        clients = asyncio.run(main())
        _busy_retries(d, busy, waits)

    sessions = [c.session for c in clients]
    assert all(sessions) and len(set(sessions)) == CLIENTS
    with sqlite3.connect(d.db) as conn:
        rows = conn.execute("SELECT session, seq, kind, msg_id FROM events ORDER BY session, seq")
        logs: dict[str, list[tuple[int, str, str]]] = {}
        for session, seq, kind, msg_id in rows:
            logs.setdefault(session, []).append((seq, kind, msg_id))

    problems: list[str] = []
    acked = rows_found = stored_users = finals = 0
    for tl, s in zip(tallies, sessions, strict=True):
        assert s is not None
        log = logs.get(s, [])
        if [seq for seq, _, _ in log] != list(range(1, len(log) + 1)):
            problems.append(f"{s[:8]}: seqs not contiguous")
        users = {m: seq for seq, kind, m in log if kind == "user"}
        final = Counter(m for _, kind, m in log if kind != "user")
        stored_users += len(users)
        finals += sum(final.values())
        problems += [f"{s[:8]}/{m}: {final[m]} finals" for m in users if final[m] != 1]
        for m, seq in tl.acked.items():
            acked += 1
            if users.get(m) == seq:
                rows_found += 1
            else:
                problems.append(f"{s[:8]}/{m}: acked as seq {seq}, stored as {users.get(m)}")
    errors = [e for tl in tallies for e in tl.errors]
    codes = Counter(e.code for e in errors)
    locked = [e for e in errors if "lock" in e.message.lower()]
    figures = {
        "clients": CLIENTS,
        "workers_killed": len(killed),
        "acknowledged": acked,
        "rows_found": rows_found,
        "stored_user_messages": stored_users,
        "stored_finals": finals,
        "unanswered": sum(tl.unanswered for tl in tallies),
        "unacked_sent": sum(len(tl.sent - set(tl.acked)) for tl in tallies),
        "client_seq_gaps": sum(len(tl.gaps()) for tl in tallies),
        "error_codes": dict(codes),
        "busy_retries_by_worker": {str(pid): n for pid, n in sorted(busy.items())},
        "busy_retries_total": sum(busy.values()),
        "lock_waits_total": sum(waits.values()),
    }
    print(f"\nCONTENTION {json.dumps(figures)}")
    assert len(killed) == 1
    if writes == "own":
        # The two workers did meet at the write gate (one waited for the other's batch), so
        # the kill above could find one holding it: its death let the gate go.
        assert figures["lock_waits_total"] > 0, figures
    else:  # one writer: nobody to wait for
        assert figures["lock_waits_total"] == figures["busy_retries_total"] == 0, figures
    assert not problems, problems[:20]
    assert acked > 0 and rows_found == acked, figures
    assert codes["internal"] == 0 and not locked, [e for e in errors][:10]
    assert figures["unacked_sent"] == 0, figures
    # Every acknowledged message is answered in the store (above); the clients should have
    # received every answer too. Known server/protocol bug, intermittent under this load: a
    # message of the killed worker is taken over by the OTHER worker's sweep while its client
    # is connected elsewhere; the reply is stored (seq N) but not pushed, the client keeps
    # receiving later seqs live, so its last_seq passes N and a resume never replays N. Only
    # that signature is an expected failure (a strict xfail cannot express an intermittent one).
    if figures["unanswered"]:
        missed = [
            (m, seq)
            for tl, s in zip(tallies, sessions, strict=True)
            for m, seq in _stored_answer_seqs(tl, logs.get(s or "", []))
        ]
        gaps = {seq for tl in tallies for seq in tl.gaps()}
        assert all(seq in gaps for _, seq in missed), (figures, missed)
        pytest.xfail(
            f"BUG (reported): {len(missed)} stored replies never reached their client: taken "
            "over by a sweep on another worker, not pushed, and skipped by the resume because "
            f"the client's last_seq had passed their seq (seq gaps) {missed[:5]}"
        )


def _stored_answer_seqs(tl: Tally, log: list[tuple[int, str, str]]) -> list[tuple[str, int]]:
    """(msg_id, seq of its stored final) for the acknowledged messages this client never got."""
    final = {m: seq for seq, kind, m in log if kind != "user"}
    return [(m, final[m]) for m in tl.acked if not tl.answers[m] and m in final]
