"""The session store's contracts (``chatd/store/base.py``), then each store's own promises.

The contract tests use only the ``Store`` protocol, through two fixtures: ``make_store`` builds
unopened stores that share one backing storage (several instances = several worker processes,
or several hosts on one Redis), ``store`` is one of them. Both run every contract test on each
``backend``: "sqlite" (a file in the test's tmp dir), "redis" (the run's shared redis-server
from tests/conftest.py; tests keep apart by their random session ids), "redis-cluster" (the
run's 3-master Redis Cluster) and "redis-sentinel" (the run's master + replica + 3 Sentinels,
with ``min_replicas_acks = 1``: every write waits for the replica). Every test runs its own
event loop with ``asyncio.run`` (no pytest-asyncio).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from chatd.config import SessionsConfig
from chatd.errors import StoreError
from chatd.store import Appended, Event, SqliteStore, Store, open_store
from chatd.store.redis import RedisStore
from tests.conftest import flush_redis

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
MakeStore = Callable[..., Store]
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(params=["sqlite", "sqlite-writer", "redis", "redis-cluster", "redis-sentinel"])
def backend(request: pytest.FixtureRequest) -> str:
    """Which store the contract tests run on."""
    return str(request.param)


@pytest.fixture
def make_store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> MakeStore:
    """``make_store(ttl=3600)``: a new unopened store on the test's shared storage (emptied
    first for the tests marked ``sweeps``: they claim across every session)."""
    if backend.startswith("redis"):
        # Each skips, loudly, without redis-server.
        fixture = {"redis": "redis_url", "redis-cluster": "redis_cluster_url"}
        url = request.getfixturevalue(fixture.get(backend, "redis_sentinel_url"))
        if request.node.get_closest_marker("sweeps"):
            flush_redis(url)
        acks = int(backend == "redis-sentinel")
        return lambda ttl=3600: RedisStore(url, ttl, min_replicas_acks=acks)
    # A missing parent directory on purpose: the store must create it.
    path = str(tmp_path / "var" / "sessions.db")
    # sqlite-writer: the writes through a host writer process (chatd.store.sqlite_host).
    writer = request.getfixturevalue("store_writer")(path) if backend == "sqlite-writer" else None

    def make(ttl: int = 3600) -> Store:
        return SqliteStore(path, ttl, writer=writer)

    return make


@pytest.fixture
def store(make_store: MakeStore) -> Store:
    return make_store()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def opened(*stores: Store) -> AsyncIterator[None]:
    for s in stores:
        await s.open()
    try:
        yield
    finally:
        for s in stores:
            await s.close()


def seqs(events: list[Event]) -> list[int]:
    return [e.seq for e in events]


# -- contracts, on the Store protocol only ----------------------------------------------------


def test_append_user_is_idempotent(store: Store) -> None:
    async def main() -> None:
        async with opened(store):
            s = await store.create_session("owner")
            first = await store.append_user(s, "m1", "hello", "model-a")
            again = await store.append_user(s, "m1", "something else", "model-b")
            assert (first.seq, first.duplicate) == (1, False)
            assert (again.seq, again.duplicate) == (1, True)
            info = await store.get_session(s)
            assert info is not None and info.last_seq == 1 and info.owner == "owner"
            [ev] = await store.events_after(s, 0)
            assert (ev.kind, ev.msg_id, ev.text, dict(ev.meta)) == (
                "user", "m1", "hello", {"model": "model-a"},
            )  # fmt: skip
            other = await store.create_session("owner")  # msg ids are per session
            assert (await store.append_user(other, "m1", "hi", "m")).duplicate is False

    run(main())


def test_append_final_at_most_once(store: Store) -> None:
    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            await store.append_user(s, "m1", "q", "m")
            reply = await store.append_final(s, "m1", "reply", "a", {"done_reason": "stop"})
            dup = await store.append_final(s, "m1", "error", "x", {"code": "llm_error"})
            dup2 = await store.append_final(s, "m1", "reply", "b", {"done_reason": "stop"})
            assert (reply.seq, reply.duplicate) == (2, False)
            assert (dup.seq, dup.duplicate) == (dup2.seq, dup2.duplicate) == (2, True)
            events = await store.events_after(s, 0)
            assert [(e.kind, e.text) for e in events] == [("user", "q"), ("reply", "a")]
            assert dict(events[1].meta) == {"done_reason": "stop"} and events[1].ts > 0

    run(main())


def test_dedupe_holds_across_instances(make_store: MakeStore) -> None:
    a, b = make_store(), make_store()

    async def main() -> None:
        async with opened(a, b):
            s = await a.create_session("")
            got = await asyncio.gather(*(st.append_user(s, "same", "q", "m") for st in (a, b) * 5))
            assert {r.seq for r in got} == {1}
            assert sum(not r.duplicate for r in got) == 1
            finals = await asyncio.gather(
                *(st.append_final(s, "same", "reply", "r", {}) for st in (a, b) * 5)
            )
            assert {r.seq for r in finals} == {2}
            assert sum(not r.duplicate for r in finals) == 1

    run(main())


def test_texts_round_trip_exactly(store: Store) -> None:
    odd = ["nul \x00 inside", 'é 😀 "q" \\ \n\t', "\\u0000 literally", "x" * 100_000, " "]
    meta = {"done_reason": "stop", "stats": {"tokens": 3, "s": "\x00é"}}

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            # Several in one batch, so a NUL in one row must not spoil its batch-mates.
            await asyncio.gather(
                *(store.append_user(s, f"id{i}", t, "m") for i, t in enumerate(odd))
            )
            await store.append_user(s, "id\x00nul", "q", "m")
            assert (await store.append_user(s, "id\x00nul", "q", "m")).duplicate
            await store.append_final(s, "id0", "reply", odd[0], meta)
            events = await store.events_after(s, 0)
            assert sorted(e.text for e in events if e.kind == "user") == sorted([*odd, "q"])
            assert "id\x00nul" in {e.msg_id for e in events}
            assert dict(events[-1].meta) == meta and events[-1].text == odd[0]
            assert [e.text for e in await store.history(s, 1)] == [odd[0], odd[0]]

    run(main())


def test_session_ids_are_unguessable(store: Store) -> None:
    async def main() -> None:
        async with opened(store):
            ids = await asyncio.gather(*(store.create_session("o") for _ in range(500)))
            assert len(set(ids)) == 500
            assert all(re.fullmatch(r"[A-Za-z0-9_-]{22,}", i) for i in ids)
            info = await store.get_session(ids[0])
            assert info is not None and (info.session, info.owner, info.last_seq) == (
                ids[0], "o", 0,
            )  # fmt: skip
            assert await store.get_session("no-such-session") is None

    run(main())


def test_unknown_session_fails_alone(store: Store) -> None:
    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            calls = [store.append_user(s, f"m{i}", "q", "m") for i in range(40)]
            calls.insert(17, store.append_user("no-such-session", "x", "q", "m"))
            calls.insert(30, store.append_final("no-such-session", "x", "reply", "r", {}))
            got = await asyncio.gather(*calls, return_exceptions=True)
            errors = [i for i, r in enumerate(got) if isinstance(r, BaseException)]
            assert errors == [17, 30]
            assert all(isinstance(got[i], StoreError) for i in errors)
            assert seqs(await store.events_after(s, 0)) == list(range(1, 41))

    run(main())


def test_seqs_contiguous_under_concurrency(make_store: MakeStore) -> None:
    """200 concurrent appends over 20 sessions from 2 instances: seqs 1..n, no gap or repeat."""
    a, b = make_store(), make_store()

    async def main() -> None:
        async with opened(a, b):
            sessions = [await a.create_session("") for _ in range(20)]
            calls = []
            for i in range(200):
                st, s = (a, b)[i % 2], sessions[i % 20]
                calls.append(st.append_user(s, f"m{i}", f"text {i}", "m"))
            got = await asyncio.gather(*calls)
            assert not any(r.duplicate for r in got)
            for s in sessions:
                events = await b.events_after(s, 0)
                assert seqs(events) == list(range(1, 11))
                info = await a.get_session(s)
                assert info is not None and info.last_seq == 10

    run(main())


def test_events_after_orders_and_filters(store: Store) -> None:
    async def main() -> None:
        async with opened(store):
            s, other = await store.create_session(""), await store.create_session("")
            await store.append_user(s, "a", "q1", "m")
            await store.append_user(other, "z", "elsewhere", "m")
            await store.append_final(s, "a", "reply", "r1", {"done_reason": "stop"})
            await store.append_user(s, "b", "q2", "m")
            await store.append_final(s, "b", "error", "failed", {"code": "x", "retryable": True})
            await store.append_user(s, "c", "q3", "m")
            events = await store.events_after(s, 0)
            assert [(e.seq, e.kind, e.msg_id) for e in events] == [
                (1, "user", "a"), (2, "reply", "a"), (3, "user", "b"),
                (4, "error", "b"), (5, "user", "c"),
            ]  # fmt: skip
            assert dict(events[3].meta) == {"code": "x", "retryable": True}
            assert seqs(await store.events_after(s, 3)) == [4, 5]
            assert await store.events_after(s, 5) == []
            assert await store.events_after("no-such-session", 0) == []

    run(main())


def test_history_returns_answered_turns(store: Store) -> None:
    """A turn is a user event with a reply; errored and unanswered messages are not turns."""

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            for mid in ("1", "2", "3", "4", "5"):
                await store.append_user(s, mid, f"q{mid}", "m")
                if mid == "2":
                    await store.append_final(s, mid, "error", "e", {"code": "x"})
                elif mid != "4":  # 4 stays unanswered
                    await store.append_final(s, mid, "reply", f"r{mid}", {})
            # Two messages in flight, answered in the opposite order.
            await store.append_user(s, "6", "q6", "m")
            await store.append_user(s, "7", "q7", "m")
            await store.append_final(s, "7", "reply", "r7", {})
            await store.append_final(s, "6", "reply", "r6", {})

            def texts(evs: list[Event]) -> list[str]:
                return [e.text for e in evs]

            assert texts(await store.history(s, 2)) == ["q6", "r6", "q7", "r7"]
            assert texts(await store.history(s, 3)) == ["q5", "r5", "q6", "r6", "q7", "r7"]
            every = ["q1", "r1", "q3", "r3", "q5", "r5", "q6", "r6", "q7", "r7"]
            assert texts(await store.history(s, 100)) == every
            assert await store.history(s, 0) == []
            assert await store.history("no-such-session", 5) == []

    run(main())


def test_unanswered(store: Store) -> None:
    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            assert await store.unanswered(s) == []
            for mid in "abcd":
                await store.append_user(s, mid, mid, "m")
            await store.append_final(s, "a", "reply", "r", {})
            await store.append_final(s, "c", "error", "e", {})
            pending = await store.unanswered(s)
            assert [(e.msg_id, e.kind, e.seq) for e in pending] == [
                ("b", "user", 2),
                ("d", "user", 4),
            ]

    run(main())


@pytest.mark.sweeps
def test_lease_held_by_the_appender_until_it_lapses(make_store: MakeStore) -> None:
    """Contract 6: a new message is leased to its appender; nobody claims it before it lapses,
    then exactly one claimer does; the final releases it; a duplicate changes nothing."""
    a, b = make_store(), make_store()

    async def main() -> None:
        async with opened(a, b):
            assert a.owner != b.owner
            s = await a.create_session("")
            await a.append_user(s, "m1", "q1", "model-x", lease_s=30)
            await a.append_user(s, "m2", "q2", "m", lease_s=0.2)
            await b.append_user(s, "m2", "again", "m", lease_s=30)  # a duplicate: no lease
            assert await b.claim(s, 30, 10) == [] and await b.claim(None, 30, 100) == []
            await asyncio.sleep(0.35)
            got = await asyncio.gather(*(st.claim(s, 30, 10) for st in (a, b, a, b)))
            assert sum(len(g) for g in got) == 1  # atomic: one claimer only
            [ev] = [e for g in got for e in g]
            assert (ev.session, ev.seq, ev.kind, ev.msg_id, ev.text) == (s, 2, "user", "m2", "q2")
            assert await a.claim(s, 30, 10) == await b.claim(s, 30, 10) == []  # held again
            # The final (by anyone) releases: nothing left to claim even once it would lapse.
            await a.append_final(s, "m1", "reply", "r", {})
            await a.append_final(s, "m2", "error", "e", {"code": "internal"})
            assert await a.renew(s, ["m1", "m2"], 30) == set()
            assert await b.renew(s, ["m1", "m2"], 30) == set()

    run(main())


def test_renew_keeps_only_the_owners_leases(make_store: MakeStore) -> None:
    a, b = make_store(), make_store()

    async def main() -> None:
        async with opened(a, b):
            s = await a.create_session("")
            for mid in ("x", "y"):
                await a.append_user(s, mid, mid, "m", lease_s=0.3)
            assert await b.renew(s, ["x", "y"], 30) == set()  # not b's
            assert await a.renew(s, ["x", "y", "nope"], 0.3) == {"x", "y"}
            # Renewed in the same tick: one round trip; x is extended, y handed over (0 s).
            held = await asyncio.gather(a.renew(s, ["x"], 30), a.renew(s, ["y"], 0))
            assert held == [{"x"}, {"y"}]
            await asyncio.sleep(0.05)
            [ev] = await b.claim(s, 30, 10)  # y lapsed at once; x is still a's
            assert ev.msg_id == "y"
            assert await a.renew(s, ["x", "y"], 30) == {"x"}  # y is b's now: a must stop
            assert await b.renew(s, ["y"], 30) == {"y"}

    run(main())


@pytest.mark.sweeps
def test_release_lapses_only_the_dead_owners_held_leases(make_store: MakeStore) -> None:
    """``release(owner)``: that owner's held leases lapse at once (the next claim, anyone's,
    takes them); other owners' leases, answered messages and leases claimed since are left."""
    a, b, c = make_store(), make_store(), make_store()

    async def main() -> None:
        async with opened(a, b, c):
            s1, s2 = await a.create_session(""), await b.create_session("")
            await a.append_user(s1, "x", "x", "m", lease_s=30)
            await a.append_user(s1, "v", "v", "m", lease_s=0.01)  # lapsed already: not counted
            await a.append_user(s2, "y", "y", "m", lease_s=30)
            await a.append_user(s2, "z", "z", "m", lease_s=30)
            await a.append_final(s2, "z", "reply", "r", {})  # answered: no lease left
            await b.append_user(s2, "w", "w", "m", lease_s=30)  # b's: untouched
            await asyncio.sleep(0.05)
            assert await c.release(a.owner) == 2
            got = await c.claim(None, 30, 100)
            assert sorted((e.session, e.msg_id) for e in got) == sorted(
                [(s1, "x"), (s1, "v"), (s2, "y")]
            )
            assert await c.release(a.owner) == 0  # c's leases now
            assert await a.renew(s1, ["x"], 30) == set()  # a (were it alive) must stop
            assert await b.renew(s2, ["w"], 30) == {"w"}
            assert await c.release("nobody") == 0

    run(main())


@pytest.mark.sweeps
def test_sweep_claims_across_sessions_with_a_limit(make_store: MakeStore) -> None:
    """``claim(None, ...)``: lapsed messages of every session, up to ``limit`` per call, each
    once; answered ones never."""
    a, b = make_store(), make_store()

    async def main() -> None:
        async with opened(a, b):
            sessions = [await a.create_session("") for _ in range(3)]
            for s in sessions:
                for mid in ("p", "q"):
                    await a.append_user(s, mid, f"{s}{mid}", "m", lease_s=0.1)
            await a.append_final(sessions[0], "p", "reply", "r", {})
            await asyncio.sleep(0.25)
            first = await b.claim(None, 30, 3)
            rest = await a.claim(None, 30, 100)
            mine = {(e.session, e.msg_id) for e in first + rest if e.session in sessions}
            assert len(first) <= 3 and len(mine) == 5
            assert (sessions[0], "p") not in mine
            assert all(e.text == f"{e.session}{e.msg_id}" for e in first + rest)
            assert await b.claim(None, 30, 100) == []

    run(main())


def test_ttl_expiry(make_store: MakeStore, backend: str) -> None:
    store = make_store(ttl=1)
    # SQLite deletes in expire(); Redis has already deleted by key TTL, so expire() finds none.
    deleted = 1 if backend.startswith("sqlite") else 0

    async def main() -> None:
        async with opened(store):
            idle, busy = await store.create_session(""), await store.create_session("")
            await store.append_user(idle, "m", "q", "m")
            await asyncio.sleep(0.6)
            await store.append_user(busy, "m", "q", "m")  # an append counts as activity
            await asyncio.sleep(0.6)
            assert await store.get_session(idle) is None  # invisible before expire()
            assert await store.get_session(busy) is not None
            with pytest.raises(StoreError):
                await store.append_user(idle, "m2", "q", "m")
            assert await store.expire() == deleted
            assert await store.events_after(idle, 0) == []
            assert seqs(await store.events_after(busy, 0)) == [1]
            assert await store.expire() == 0

    run(main())


def test_a_session_another_instance_expired_is_refused_by_one_that_knew_it(
    make_store: MakeStore,
) -> None:
    """The SQLite store plans a batch from what its own commits told it of a session; another
    instance that expired the session (or wrote to it) makes the file refuse that plan, and
    the batch is planned again from a read: an error for the expired session, never a write."""
    a, b = make_store(ttl=1), make_store(ttl=1)

    async def main() -> None:
        async with opened(a, b):
            s = await a.create_session("")
            assert (await a.append_user(s, "m1", "q", "m")).seq == 1  # a knows s at seq 1
            assert (await b.append_user(s, "m2", "q", "m")).seq == 2  # b moved it on
            assert (await a.append_user(s, "m3", "q", "m")).seq == 3  # a re-read it
            assert await a.append_user(s, "m1", "q", "m") == Appended(1, True)  # a duplicate
            await asyncio.sleep(1.2)
            await b.expire()
            with pytest.raises(StoreError):
                await a.append_user(s, "m4", "q", "m")
            assert await b.events_after(s, 0) == []

    run(main())


def test_close_flushes_pending_appends(make_store: MakeStore) -> None:
    store, fresh = make_store(), make_store()

    async def main() -> None:
        async with opened(fresh):
            await store.open()
            s = await store.create_session("")
            tasks = [
                asyncio.create_task(store.append_user(s, f"m{i}", "q", "m")) for i in range(100)
            ]
            await asyncio.sleep(0)  # every task has queued its append, none has committed yet
            await store.close()
            assert all(t.done() and not t.cancelled() for t in tasks)
            assert sorted(t.result().seq for t in tasks) == list(range(1, 101))
            assert seqs(await fresh.events_after(s, 0)) == list(range(1, 101))
            with pytest.raises(StoreError):
                await store.append_user(s, "late", "q", "m")

    run(main())


def test_statistics_count(store: Store) -> None:
    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            await asyncio.gather(*(store.append_user(s, f"m{i}", "q", "m") for i in range(50)))
            await store.append_user(s, "m0", "q", "m")  # a duplicate stores no row
            stats = store.statistics()
            assert stats.rows == 50
            assert 1 <= stats.commits <= 52
            assert 0 < stats.commit_p50_ms <= stats.commit_p99_ms
            assert stats.busy_retries >= 0

    run(main())


def test_cancelled_caller_does_not_break_the_store(store: Store) -> None:
    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            task = asyncio.create_task(store.append_user(s, "m1", "q", "m"))
            await asyncio.sleep(0)
            task.cancel()
            # The cancelled append may or may not have committed; a retry tells which, once.
            retry = await store.append_user(s, "m1", "q", "m")
            assert retry.seq == 1
            assert (await store.append_user(s, "m2", "q", "m")).seq == 2

    run(main())


def test_two_instances_share_one_session(make_store: MakeStore) -> None:
    """Two instances (two worker processes, or two hosts on one Redis) append concurrently to
    the same session: distinct contiguous seqs, each message once."""
    a, b = make_store(), make_store()

    async def main() -> None:
        async with opened(a, b):
            s = await a.create_session("")
            calls = [(a, b)[i % 2].append_user(s, f"m{i}", "q", "m") for i in range(400)]
            got = await asyncio.gather(*calls)
            assert sorted(r.seq for r in got) == list(range(1, 401))
            events = await a.events_after(s, 0)
            assert seqs(events) == list(range(1, 401))
            assert {e.msg_id for e in events} == {f"m{i}" for i in range(400)}
            assert [r.seq for r in got] == [
                next(e.seq for e in events if e.msg_id == f"m{i}") for i in range(400)
            ]

    run(main())


def test_history_looks_past_errors_and_pairs_early_finals(store: Store) -> None:
    """Turns far back (behind many errored messages) are found; a final stored before its user
    event (never done by the worker, but allowed) still pairs with it."""

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            await store.append_user(s, "old", "q-old", "m")
            await store.append_final(s, "old", "reply", "r-old", {})
            for i in range(60):
                await store.append_user(s, f"e{i}", "q", "m")
                await store.append_final(s, f"e{i}", "error", "e", {"code": "x"})
            await store.append_user(s, "new", "q-new", "m")
            await store.append_final(s, "new", "reply", "r-new", {})
            await store.append_user(s, "pending", "q-pending", "m")
            assert [e.text for e in await store.history(s, 2)] == [
                "q-old",
                "r-old",
                "q-new",
                "r-new",
            ]
            t = await store.create_session("")
            await store.append_final(t, "x", "reply", "r-x", {})  # before its user event
            await store.append_user(t, "y", "q-y", "m")
            await store.append_final(t, "y", "reply", "r-y", {})
            await store.append_user(t, "x", "q-x", "m")
            assert [e.text for e in await store.history(t, 1)] == ["q-x", "r-x"]
            assert [e.text for e in await store.history(t, 5)] == ["q-y", "r-y", "q-x", "r-x"]
            assert await store.unanswered(t) == []  # x has its final already

    run(main())


# -- the SQLite store ---------------------------------------------------------------------------


def test_sqlite_file_settings(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "s.db"

    async def main() -> str:
        async with opened(store := SqliteStore(str(path), 60)):
            s = await store.create_session("")
            await store.append_user(s, "m", "q", "m")
            return s

    s = run(main())
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("PRAGMA user_version").fetchone() == (2,)
    with pytest.raises(sqlite3.IntegrityError):  # the file itself refuses a second user row
        db.execute(
            "INSERT INTO events (session, seq, kind, msg_id, text, meta, ts)"
            " VALUES (?, 2, 'user', 'm', 'q', '{}', 0)",
            (s,),
        )
    with pytest.raises(sqlite3.IntegrityError, match="seq conflict"):  # seqs stay contiguous
        db.execute(
            "INSERT INTO events (session, seq, kind, msg_id, text, meta, ts)"
            " VALUES (?, 3, 'user', 'm2', 'q', '{}', 0)",
            (s,),
        )
    db.execute("DELETE FROM sessions WHERE id = ?", (s,))
    assert db.execute("SELECT count(*) FROM events").fetchone() == (0,)  # events go with it
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer"):
        run(SqliteStore(str(path), 60).open())


def test_sqlite_migration_2_leases_unanswered_messages(tmp_path: Path) -> None:
    """A version-1 file: its unanswered messages get a lapsed lease (claimable at once)."""
    from chatd.store import sqlite_sql

    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    for statement in sqlite_sql.MIGRATIONS[1]:
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    now = time.time()
    db.execute("INSERT INTO sessions VALUES ('s1', '', 0, ?, ?)", (now, now))
    rows = [(1, "user", "a"), (2, "reply", "a"), (3, "user", "b")]
    for seq, kind, mid in rows:
        db.execute(
            "INSERT INTO events (session, seq, kind, msg_id, text, meta, ts)"
            " VALUES ('s1', ?, ?, ?, 't', '{}', ?)",
            (seq, kind, mid, now),
        )
    db.close()

    async def main() -> list[Event]:
        async with opened(store := SqliteStore(str(path), 3600)):
            return await store.claim(None, 30, 10)

    [ev] = run(main())
    assert (ev.session, ev.msg_id, ev.seq) == ("s1", "b", 3)


def test_sqlite_append_is_committed_when_it_returns(tmp_path: Path) -> None:
    """Contract 3, in process: another connection sees the row while the store is still open."""
    path = str(tmp_path / "s.db")
    store = SqliteStore(path, 60)

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            for i in range(1, 21):
                got = await store.append_user(s, f"m{i}", "q", "m")
                with contextlib.closing(sqlite3.connect(path)) as db:
                    row = db.execute(
                        "SELECT msg_id FROM events WHERE session = ? AND seq = ?", (s, got.seq)
                    ).fetchone()
                assert row == (f"m{i}",)

    run(main())


def test_sqlite_group_commit_batches(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"), 60)

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            await asyncio.gather(*(store.append_user(s, f"m{i}", "q", "m") for i in range(300)))
            stats = store.statistics()
            assert stats.rows == 300
            assert stats.commits <= 10  # 300 concurrent appends fit in a few transactions

    run(main())


def test_sqlite_failing_request_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that fails unexpectedly is retried request by request: only the culprit fails."""
    real = SqliteStore._append

    def append(self: SqliteStore, reqs: list[tuple[str, ...]]) -> Any:
        if any(r[5] == "poison" for r in reqs):  # (owner, ttl, session, msg_id, kind, text, …)
            raise sqlite3.OperationalError("disk I/O error")
        return real(self, reqs)  # type: ignore[arg-type]

    monkeypatch.setattr(SqliteStore, "_append", append)
    store = SqliteStore(str(tmp_path / "s.db"), 60)

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            texts = ["ok"] * 10 + ["poison"] + ["ok"] * 10
            calls = [store.append_user(s, f"m{i}", t, "m") for i, t in enumerate(texts)]
            got = await asyncio.gather(*calls, return_exceptions=True)
            assert isinstance(got[10], StoreError)
            assert sorted(r.seq for r in got if not isinstance(r, BaseException)) == list(
                range(1, 21)
            )
            before = store.statistics().commits  # the next batch is whole again
            await asyncio.gather(*(store.append_user(s, f"n{i}", "ok", "m") for i in range(20)))
            assert store.statistics().commits - before <= 2

    run(main())


def test_sqlite_lost_race_is_planned_again(tmp_path: Path) -> None:
    """Another process appends between the batch's read and its INSERT: the batch re-plans."""
    path = str(tmp_path / "s.db")
    store = SqliteStore(path, 60)

    class Interloper:
        def __init__(self, db: sqlite3.Connection, session: str) -> None:
            self.db, self.session, self.raced = db, session, False

        def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
            if sql.lstrip().startswith("INSERT INTO events") and not self.raced:
                self.raced = True
                with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
                    other.execute(
                        "INSERT INTO events (session, seq, kind, msg_id, text, meta, ts)"
                        " VALUES (?, 1, 'user', 'theirs', 't', '{}', ?)",
                        (self.session, time.time()),
                    )
            return self.db.execute(sql, params)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.db, name)

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            store._wdb = Interloper(store._wdb, s)  # type: ignore[arg-type,assignment]
            assert (await store.append_user(s, "mine", "q", "m")).seq == 2
            assert (await store.append_user(s, "theirs", "q", "m")) == Appended(1, True)
            assert [(e.seq, e.msg_id) for e in await store.events_after(s, 0)] == [
                (1, "theirs"), (2, "mine"),
            ]  # fmt: skip

    run(main())


def test_sqlite_busy_lock_is_waited_out(tmp_path: Path) -> None:
    """A lock held elsewhere delays the append (retried, counted) without blocking the loop."""
    path = str(tmp_path / "s.db")
    store = SqliteStore(path, 60, busy_timeout=0.02)

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            task = asyncio.create_task(store.append_user(s, "m", "q", "m"))
            loop, gaps = asyncio.get_running_loop(), []
            for _ in range(30):  # 0.3 s of the lock being held elsewhere
                before = loop.time()
                await asyncio.sleep(0.01)
                gaps.append(loop.time() - before)
            assert not task.done()
            assert max(gaps) < 0.1  # the loop kept running while the writer waited
            other.execute("ROLLBACK")
            other.close()
            assert (await task).seq == 1
            assert store.statistics().busy_retries >= 3

    run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sqlite_locked_batch_is_retried_from_the_loop(tmp_path: Path, loop: str) -> None:
    """Another connection holds the write lock for ~50 ms: the writes never block the loop (a
    5 ms ticker keeps firing), they are retried from it (busy_retries), requests queued meanwhile
    join them, every future resolves after the release only, and a session's in seq order. On
    both loops (uvloop rounds timers to the millisecond)."""
    path = str(tmp_path / "s.db")
    store = SqliteStore(path, 60)

    async def main() -> None:
        async with opened(store):
            assert store._wdb is not None  # the write connection never waits inside SQLite
            assert store._wdb.execute("PRAGMA busy_timeout").fetchone() == (0,)
            assert store._wdb.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
            s, t = await store.create_session(""), await store.create_session("")
            running = asyncio.get_running_loop()
            ticks: list[float] = []
            released: list[float] = []
            resolved: list[tuple[str, int, float]] = []  # (session, seq, when), as they resolve

            def tick() -> None:
                ticks.append(time.monotonic())
                if not released:
                    running.call_later(0.005, tick)

            async def append(session: str, msg_id: str) -> Appended:
                got = await store.append_user(session, msg_id, "q", "m")
                resolved.append((session, got.seq, time.monotonic()))
                return got

            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")

            def release() -> None:
                other.execute("ROLLBACK")
                released.append(time.monotonic())

            busy = store.statistics().busy_retries
            tick()
            first = [asyncio.create_task(append(s, f"a{i}")) for i in range(5)]
            running.call_later(0.05, release)
            await asyncio.sleep(0.02)  # these come while the first ones wait: they join them
            later = [asyncio.create_task(append(x, f"b{i}")) for i in range(5) for x in (s, t)]
            got = await asyncio.gather(*first, *later)
            other.close()
            assert released and all(when >= released[0] for _, _, when in resolved)
            assert [g.seq for g in got[:5]] == [1, 2, 3, 4, 5]
            assert [g.seq for g in got[5::2]] == [6, 7, 8, 9, 10]  # session s
            assert [g.seq for g in got[6::2]] == [1, 2, 3, 4, 5]  # session t
            for x in (s, t):
                order = [seq for session, seq, _ in resolved if session == x]
                assert order == sorted(order)
            assert store.statistics().busy_retries > busy
            during = [b - a for a, b in itertools.pairwise(ticks)]
            assert len(ticks) >= 4 and max(during) < 0.1  # ~10 ticks expected, 5 ms apart
            for x, n in ((s, 10), (t, 5)):  # committed: another connection sees them all
                with contextlib.closing(sqlite3.connect(path)) as db:
                    q = "SELECT count(*) FROM events WHERE session = ?"
                    assert db.execute(q, (x,)).fetchone() == (n,)

    (uvloop.run if loop == "uvloop" else asyncio.run)(main())


def test_sqlite_lock_timeout_fails_the_batch_then_recovers(tmp_path: Path) -> None:
    """A lock held past ``lock_timeout`` fails the waiting writes (StoreError), and only them."""
    path = str(tmp_path / "s.db")
    store = SqliteStore(path, 60, lock_timeout=0.1)

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            try:
                with pytest.raises(StoreError, match="locked"):
                    await store.append_user(s, "m1", "q", "m")
            finally:
                other.execute("ROLLBACK")
                other.close()
            assert (await store.append_user(s, "m1", "q", "m")) == Appended(1, False)

    run(main())


def test_sqlite_close_waits_for_a_locked_batch(tmp_path: Path) -> None:
    """close() commits the writes queued before it, even if they first wait for the lock."""
    path = str(tmp_path / "s.db")
    store = SqliteStore(path, 60)

    async def main() -> None:
        await store.open()
        s = await store.create_session("")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        tasks = [asyncio.create_task(store.append_user(s, f"m{i}", "q", "m")) for i in range(3)]
        await asyncio.sleep(0.01)
        asyncio.get_running_loop().call_later(0.05, other.execute, "ROLLBACK")
        await store.close()
        other.close()
        assert [t.result().seq for t in tasks] == [1, 2, 3]

    run(main())
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM events").fetchone() == (3,)


def _size(path: str) -> int:
    return os.path.getsize(path)


def test_sqlite_wal_is_checkpointed_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints run in their own thread, and they keep the WAL small under a steady load
    that leaves them no quiet moment (RESTART once the WAL reaches ``checkpoint_pages``): far
    below the ~12 MB it would reach if nothing checkpointed."""
    from chatd.store.sqlite_checkpoint import Checkpointer

    threads: set[str] = set()
    real = Checkpointer._checkpoint

    def checkpoint(self: Checkpointer) -> tuple[int, int, bool]:
        threads.add(threading.current_thread().name)
        return real(self)

    monkeypatch.setattr(Checkpointer, "_checkpoint", checkpoint)
    path = str(tmp_path / "s.db")
    store = SqliteStore(path, 60, checkpoint_pages=100, checkpoint_interval=0.01)
    text = "x" * 4000  # 3,000 of them: about 12 MB written to the WAL

    async def main() -> None:
        async with opened(store):
            sessions = [await store.create_session("") for _ in range(10)]
            peak = 0

            async def writer(w: int) -> None:
                nonlocal peak
                for i in range(300):
                    await store.append_user(sessions[w], f"{i}", text, "m")
                    peak = max(peak, _size(path + "-wal"))
                    await asyncio.sleep(0.001)

            await asyncio.gather(*(writer(w) for w in range(10)))
            ck = store.checkpointer
            assert ck is not None
            for _ in range(1000):  # the last commits' checkpoint may still be running
                if ck.checkpoints >= 2:
                    break
                await asyncio.sleep(0.01)
            assert ck.checkpoints >= 2 and ck.failures == 0, ck.last_error
            assert ck.restarts >= 1
            assert peak < 6_000_000, peak  # half of what was written
            assert store.statistics().rows == 3000

    run(main())
    assert threads == {"chatd-store-checkpoint_0"}


def test_sqlite_on_uvloop(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"), 60)

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            got = await asyncio.gather(*(store.append_user(s, str(i), "q", "m") for i in range(50)))
            assert sorted(r.seq for r in got) == list(range(1, 51))
            assert len(await store.history(s, 10)) == 0

    uvloop.run(main())


CHILD = """
import asyncio, sys
from chatd.store.sqlite import SqliteStore

async def main(path, sessions, tag, n):
    store = SqliteStore(path, 3600)
    await store.open()
    async def worker(first):  # 20 concurrent appenders: the kill lands amid open batches
        for i in range(first, n, 20):
            got = await store.append_user(sessions[i % len(sessions)], f"{tag}{i}", "x" * 200, "m")
            sys.stdout.write(f"{got.seq} {tag}{i}\\n")
            sys.stdout.flush()
    await asyncio.gather(*(worker(w) for w in range(20)))
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2].split(","), sys.argv[3], int(sys.argv[4])))
"""


def _child(path: str, sessions: list[str], tag: str, n: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", CHILD, path, ",".join(sessions), tag, str(n)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)


def _new_sessions(path: str, n: int) -> list[str]:
    async def main() -> list[str]:
        async with opened(store := SqliteStore(path, 3600)):
            return [await store.create_session("") for _ in range(n)]

    return run(main())


def test_sqlite_acked_appends_survive_sigkill(tmp_path: Path) -> None:
    """Contract 3 across a crash: every seq a SIGKILLed process printed is in the file."""
    path = str(tmp_path / "s.db")
    [s] = _new_sessions(path, 1)
    child = _child(path, [s], "m", 1_000_000)
    assert child.stdout is not None
    acked = [child.stdout.readline() for _ in range(300)]
    child.send_signal(signal.SIGKILL)
    acked += child.stdout.readlines()  # printed before the kill, not read yet
    assert child.wait() == -signal.SIGKILL
    printed = {int(seq): mid for seq, mid in (line.split() for line in acked if line.strip())}
    assert len(printed) >= 300
    with contextlib.closing(sqlite3.connect(path)) as db:
        stored = dict(db.execute("SELECT seq, msg_id FROM events WHERE session = ?", (s,)))
    assert printed.items() <= stored.items()
    assert sorted(stored) == list(range(1, len(stored) + 1))

    async def after() -> None:  # a fresh store opens the crashed file and carries on
        async with opened(store := SqliteStore(path, 3600)):
            assert (await store.append_user(s, "next", "q", "m")).seq == len(stored) + 1

    run(after())


def test_sqlite_two_processes_share_sessions(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    sessions = _new_sessions(path, 10)
    children = [_child(path, sessions, tag, 150) for tag in ("a", "b")]
    outputs = [c.communicate(timeout=30)[0] for c in children]
    assert [c.returncode for c in children] == [0, 0]
    assert sum(len(o.splitlines()) for o in outputs) == 300
    with contextlib.closing(sqlite3.connect(path)) as db:
        for s in sessions:
            got = [r[0] for r in db.execute("SELECT seq FROM events WHERE session = ?", (s,))]
            assert sorted(got) == list(range(1, 31))
            assert db.execute("SELECT last_seq FROM sessions WHERE id = ?", (s,)).fetchone() == (
                30,
            )


def test_sqlite_open_and_use_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="cannot open"):
        run(SqliteStore(str(tmp_path / "file" / "s.db"), 60).open())
    store = SqliteStore(str(tmp_path / "s.db"), 60)

    async def main() -> None:
        with pytest.raises(StoreError, match="not open"):
            await store.get_session("x")
        async with opened(store):
            pass
        with pytest.raises(StoreError, match="not open"):
            await store.create_session("")

    run(main())


def test_open_store_factory(tmp_path: Path) -> None:
    store = open_store(SessionsConfig(store=f"sqlite://{tmp_path}/x/s.db", ttl=42))
    assert isinstance(store, SqliteStore)
    assert (store.path, store.ttl) == (f"{tmp_path}/x/s.db", 42)
    assert not (tmp_path / "x").exists()  # built, not opened
    rel = open_store(SessionsConfig(store="sqlite:var/s.db"))
    assert isinstance(rel, SqliteStore) and rel.path == "var/s.db"
    redis = open_store(SessionsConfig(store="redis://127.0.0.1:6379/0", ttl=7))
    assert isinstance(redis, RedisStore)
    assert (redis.url, redis.ttl) == ("redis://127.0.0.1:6379/0", 7)


# -- the Redis store ----------------------------------------------------------------------------


def _raw(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, decode_responses=True)


def test_redis_keys_slot_and_ttl(redis_url: str) -> None:
    """One hash-tagged slot per session; every key gets the ttl; a duplicate refreshes none."""
    from redis.crc import key_slot

    store, raw = RedisStore(redis_url, 100), _raw(redis_url)

    async def main() -> str:
        async with opened(store):
            s = await store.create_session("o")
            await store.append_user(s, "m1", "q", "m")
            keys = sorted(raw.keys(f"chatd:s:{{{s}}}:*"))
            names = ("ids", "lease", "log", "meta", "pending")
            assert keys == [f"chatd:s:{{{s}}}:{k}" for k in names]
            assert len({key_slot(k.encode()) for k in keys}) == 1
            assert all(90 <= raw.ttl(k) <= 100 for k in keys)
            for k in keys:
                raw.pexpire(k, 50_000)
            assert (await store.append_user(s, "m1", "q", "m")).duplicate
            assert all(raw.pttl(k) <= 50_000 for k in keys)  # a duplicate is no activity
            await store.append_final(s, "m1", "reply", "r", {})
            assert not raw.exists(keys[4]) and not raw.exists(keys[1])  # no pending, no lease
            assert all(raw.ttl(k) >= 90 for k in (keys[0], keys[2], keys[3]))
            assert raw.zscore("chatd:leases", f"{s} m1") is None  # released in the index too
            keys = [keys[2], keys[3]]  # the stream and the meta hash, for the checks below
            assert raw.type(keys[0]) == "stream" and raw.xrange(keys[0])[0][0] == "1-0"
            return s

    run(main())


def test_redis_group_commit_batches(redis_url: str) -> None:
    store = RedisStore(redis_url, 60)

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            await asyncio.gather(*(store.append_user(s, f"m{i}", "q", "m") for i in range(300)))
            stats = store.statistics()
            assert stats.rows == 300
            assert stats.commits <= 10  # 300 concurrent appends fit in a few round trips

    uvloop.run(main())  # the workers' loop


def test_redis_retry_after_a_lost_reply_is_not_a_duplicate(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The append ran but its reply was lost: the retry finds the caller's own write."""
    from redis import exceptions
    from redis.asyncio.client import Pipeline

    real, lost = Pipeline.execute, []

    async def execute(self: Pipeline, raise_on_error: bool = True) -> Any:
        got = await real(self, raise_on_error)
        if not lost:
            lost.append(got)
            raise exceptions.ConnectionError("Connection reset by peer (reply lost)")
        return got

    store = RedisStore(redis_url, 60)

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            monkeypatch.setattr(Pipeline, "execute", execute)
            assert await store.append_user(s, "m1", "q", "m") == Appended(1, False)
            assert lost  # the first attempt did commit
            assert await store.append_user(s, "m1", "q", "m") == Appended(1, True)
            assert seqs(await store.events_after(s, 0)) == [1]

    run(main())


def test_redis_scripts_reload_after_flush(redis_url: str) -> None:
    store = RedisStore(redis_url, 60)

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            _raw(redis_url).script_flush()  # as after a Redis restart: EVALSHA gets NOSCRIPT
            assert (await store.append_user(s, "m1", "q", "m")).seq == 1
            _raw(redis_url).script_flush()
            assert [e.msg_id for e in await store.unanswered(s)] == ["m1"]

    run(main())


def test_redis_unreachable_is_a_clear_error(start_redis: Callable[..., Any]) -> None:
    server = start_redis()
    server.stop()
    url = f"redis://:s3cret@127.0.0.1:{server.port}/0"

    async def main() -> None:
        with pytest.raises(StoreError, match="cannot open") as err:
            await RedisStore(url, 60, backoff=(0.01,)).open()
        assert f"127.0.0.1:{server.port}" in str(err.value) and "s3cret" not in str(err.value)

    run(main())


def test_redis_killed_then_restarted(start_redis: Callable[..., Any]) -> None:
    """SIGKILL redis-server amid appends: StoreError naming the URL, no crash; restarted on the
    same AOF (appendfsync always), every acknowledged append is there and the store carries on."""
    server = start_redis("--appendfsync", "always")
    store = RedisStore(server.url, 3600, backoff=(0.01, 0.05))
    acked: dict[int, str] = {}

    async def main() -> None:
        async with opened(store):
            s, enough = await store.create_session(""), asyncio.Event()

            async def appender(w: int) -> None:
                for i in itertools.count():
                    got = await store.append_user(s, f"w{w}-{i}", "x" * 200, "m")
                    acked[got.seq] = f"w{w}-{i}"
                    if len(acked) >= 300:
                        enough.set()

            tasks = [asyncio.create_task(appender(w)) for w in range(20)]
            await enough.wait()
            server.kill()
            errors = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(e, StoreError) for e in errors)
            assert server.url in str(errors[0]) and "cannot reach" in str(errors[0])
            for call in (store.get_session(s), store.events_after(s, 0), store.unanswered(s)):
                with pytest.raises(StoreError, match=re.escape(server.url)):
                    await call
            server.start()  # same port, same dir: Redis replays its AOF
            stored = {e.seq: e.msg_id for e in await store.events_after(s, 0)}
            assert acked.items() <= stored.items()
            assert sorted(stored) == list(range(1, len(stored) + 1))
            info = await store.get_session(s)
            assert info is not None and info.last_seq == len(stored)
            assert (await store.append_user(s, "after", "q", "m")).seq == len(stored) + 1

    run(main())


def _open_and_append(path: str) -> int:
    """In a fresh process: open the store on ``path`` (maybe brand new), create a session,
    append one message; the seq it got."""
    from chatd.store.sqlite import SqliteStore

    async def go() -> int:
        s = SqliteStore(path, 3600)
        await s.open()
        try:
            session = await s.create_session("")
            return (await s.append_user(session, "m", "hi", "x")).seq
        finally:
            await s.close()

    return asyncio.run(go())


def test_workers_opening_a_new_sqlite_file_together(tmp_path: Path) -> None:
    """Six processes open the same new file at once (workers starting together): none fails
    with 'database is locked' while another turns the file into WAL and creates the schema."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for n in range(3):
        path = str(tmp_path / f"fresh{n}" / "sessions.db")
        with concurrent.futures.ProcessPoolExecutor(6, mp_context=ctx) as pool:
            assert list(pool.map(_open_and_append, [path] * 6)) == [1] * 6
