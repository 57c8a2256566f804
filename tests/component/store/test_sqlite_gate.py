"""The SQLite store's write gate (chatd.store.sqlite_gate): what waits, what fails, what falls back.

The gate is an ``flock`` on ``PATH-gate`` (a release writes a byte to the FIFO ``PATH-wake``);
these tests hold it as another worker would (a gate of their own, a bare flock, a process then
SIGKILLed) and watch the store's writes: they wait for it without blocking the loop and
without retrying, commit once it is let go (woken by the release's byte, or by the periodic
retry when the holder died), fail after ``lock_timeout`` (naming the lock) and no later
request with them, and a store whose gate file cannot be opened still writes, through SQLite's
lock and its retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatd.errors import StoreError
from chatd.store import SqliteStore, sqlite_gate
from chatd.store.sqlite_gate import WriteGate, gate_path
from tests.component.store.test_store import opened, run
from tests.support import until

pytestmark = pytest.mark.timeout(60)


@contextlib.contextmanager
def gate_held(db_path: str) -> Iterator[int]:
    """Hold the gate of ``db_path`` as another process would (an open file description)."""
    fd = os.open(gate_path(db_path), os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # lets the gate go, if the test did not


async def waiting(store: SqliteStore) -> None:
    """Until a batch of ``store`` has found the gate held and waits for it (the loop runs on:
    this coroutine polls it)."""
    await until(lambda: store.statistics().lock_waits > 0, "a write waiting for the gate")


def test_a_held_gate_delays_writes_without_blocking_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker's store holds the gate: writes wait without blocking the loop (this
    test's coroutine runs on meanwhile) and without an attempt (no busy retry), writes queued
    meanwhile join the waiting batch, and all commit, in order, once the holder lets go: woken
    by its release's byte (the periodic retry is put out of reach here: 60 s)."""
    monkeypatch.setattr(sqlite_gate, "RETRY_S", 60.0)
    path = str(tmp_path / "s.db")
    store = SqliteStore(path, 60)

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            assert Path(gate_path(path)).is_file()  # noqa: ASYNC240 (a local stat)
            other = WriteGate(path)  # as another worker's store
            try:
                assert other.try_acquire()
                first = asyncio.create_task(store.append_user(s, "m0", "q", "m"))
                await waiting(store)
                later = [
                    asyncio.create_task(store.append_user(s, f"m{i}", "q", "m"))
                    for i in range(1, 4)
                ]
                await asyncio.sleep(0)  # one loop turn: the later writes are queued
                assert not first.done() and not any(t.done() for t in later)
                other.release()
                got = await asyncio.gather(first, *later)
            finally:
                other.close()
            assert [g.seq for g in got] == [1, 2, 3, 4]
            stats = store.statistics()
            assert stats.busy_retries == 0  # waited for, never tried against a held lock
            assert stats.lock_waits == 1  # the later writes joined the one waiting batch
            with contextlib.closing(sqlite3.connect(path)) as db:
                assert db.execute("SELECT count(*) FROM events").fetchone() == (4,)

    run(main())


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_a_holder_killed_mid_batch_lets_the_gate_go(tmp_path: Path) -> None:
    """A process holding the gate is SIGKILLed (no release, so no byte for the waiters): the
    kernel lets its flock go, and the waiting write commits (the periodic retry finds it)."""
    path = str(tmp_path / "s.db")
    store = SqliteStore(path, 60)

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            holder = await asyncio.create_subprocess_exec(
                sys.executable, "-c", HOLDER, gate_path(path), stdout=asyncio.subprocess.PIPE
            )
            try:
                assert holder.stdout is not None
                assert await holder.stdout.readline() == b"held\n"
                task = asyncio.create_task(store.append_user(s, "m1", "q", "m"))
                await waiting(store)
                assert not task.done()
            finally:
                holder.kill()
                await holder.wait()
            assert (await task).seq == 1
            assert store.statistics().lock_waits == 1

    run(main())


def test_the_gate_excludes_another_store_of_the_same_file(tmp_path: Path) -> None:
    """Two stores (two workers) on one file: while one holds the gate the other's write waits;
    each store lets it go after its batch, so both keep writing."""
    path = str(tmp_path / "s.db")
    a, b = SqliteStore(path, 60), SqliteStore(path, 60)

    async def main() -> None:
        async with opened(a, b):
            s = await a.create_session("")
            assert a._gate is not None and a._gate.try_acquire()
            task = asyncio.create_task(b.append_user(s, "m1", "q", "m"))
            await waiting(b)
            assert not task.done()
            a._gate.release()
            assert (await task).seq == 1
            assert (await a.append_user(s, "m2", "q", "m")).seq == 2  # b let it go
            assert b.statistics().lock_waits == 1 and a.statistics().lock_waits == 0

    run(main())


def test_a_gate_held_past_lock_timeout_fails_the_waiting_writes_only(tmp_path: Path) -> None:
    """Held past ``lock_timeout``: the writes waiting fail (StoreError naming the lock); once
    the gate is free the store writes again, the failed message included."""
    path = str(tmp_path / "s.db")
    store = SqliteStore(path, 60, lock_timeout=0.2)

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            with gate_held(path):
                with pytest.raises(StoreError, match=r"locked \(the write gate held for"):
                    await store.append_user(s, "m1", "q", "m")
                assert not store.health.healthy
            assert (await store.append_user(s, "m1", "q", "m")).seq == 1
            assert (await store.append_user(s, "m2", "q", "m")).seq == 2

    run(main())


def test_close_commits_writes_waiting_for_the_gate(tmp_path: Path) -> None:
    """close() commits the writes queued before it, even those waiting for the gate."""
    path = str(tmp_path / "s.db")
    store = SqliteStore(path, 60)

    async def main() -> None:
        await store.open()
        s = await store.create_session("")
        with gate_held(path) as fd:
            tasks = [asyncio.create_task(store.append_user(s, f"m{i}", "q", "m")) for i in range(3)]
            await waiting(store)
            # Let go once close() waits for them (no byte: the waiter's periodic retry finds it).
            asyncio.get_running_loop().call_soon(fcntl.flock, fd, fcntl.LOCK_UN)
            await store.close()
        assert [t.result().seq for t in tasks] == [1, 2, 3]

    run(main())
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM events").fetchone() == (3,)


def test_without_a_gate_file_the_store_still_writes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A gate file that cannot be opened (here a directory in its place): one warning naming
    it, and the writes go through SQLite's lock and retries as before."""
    path = str(tmp_path / "s.db")
    os.mkdir(gate_path(path))
    store = SqliteStore(path, 60)

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            assert (await store.append_user(s, "m1", "q", "m")).seq == 1
            assert store.statistics().lock_waits == 0

    with caplog.at_level(logging.WARNING, logger="chatd.store"):
        run(main())
    assert any("no write gate for" in r.getMessage() for r in caplog.records)


def test_the_checkpointer_starts_the_wal_over_itself(tmp_path: Path) -> None:
    """Once a checkpoint has copied every frame, the checkpointer (holding the gate) makes the
    write that starts the WAL over, and so pays the fsync of its new header in its own
    thread: the WAL then holds that one frame, where it held every batch before. A worker's
    next write appends to it, and never starts a WAL (nor fsyncs one) on its loop."""
    path = str(tmp_path / "s.db")
    store = SqliteStore(path, 60, checkpoint_interval=0.01)

    async def main() -> None:
        async with opened(store):
            s = await store.create_session("")
            for i in range(20):
                await store.append_user(s, f"m{i}", "x" * 2000, "m")
            ck = store.checkpointer
            assert ck is not None
            for _ in range(500):  # the checkpoint 10 ms after the last commit
                if ck.checkpoints >= 1 and ck._running is None and ck._timer is None:
                    break
                await asyncio.sleep(0.01)
            assert ck.checkpoints >= 1 and ck.failures == 0, ck.last_error
            with contextlib.closing(sqlite3.connect(path)) as db:
                busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            assert (busy, frames, copied) == (0, 1, 1)  # only the start-over write's page 1
            assert (await store.append_user(s, "m20", "q", "m")).seq == 21

    run(main())
