"""The SQLite store's host writer (chatd.store.sqlite_host) and a worker's side of it
(chatd.store.sqlite_remote), with a real writer process: what its death does to the writes in
flight and to those made while it is away, a store that finds no writer, a bad frame, a peer
of another user. The store's contracts through it: test_store.py (``sqlite-writer``)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from chatd.errors import StoreError
from chatd.store import SqliteStore, sqlite_host
from chatd.store import sqlite as sqlite_mod
from tests.conftest import WriterProcess
from tests.support import until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[WriterProcess]:
    w = WriterProcess(str(tmp_path / "s.db"))
    w.start()
    yield w
    w.stop()


def test_writer_death_fails_the_writes_in_flight_and_holds_the_next(
    writer: WriterProcess,
) -> None:
    """A write sent to a writer that dies before answering fails (it may have committed: the
    caller's retry is idempotent); a write made while no writer listens waits, and commits on
    the writer started next; the client connects again by itself."""
    store = SqliteStore(writer.path, 3600, writer=writer.address)

    async def main() -> None:
        await store.open()
        try:
            s = await store.create_session("")
            assert (await store.append_user(s, "m1", "q", "m")).seq == 1
            assert writer.proc is not None
            os.kill(writer.proc.pid, signal.SIGSTOP)  # it reads nothing: the write stays in flight
            in_flight = asyncio.ensure_future(store.append_user(s, "m2", "q", "m"))
            await asyncio.sleep(0.2)
            assert not in_flight.done()
            writer.kill()
            with pytest.raises(StoreError, match="lost before the write was answered"):
                await in_flight
            waiting = asyncio.ensure_future(store.append_user(s, "m3", "q", "m"))
            await asyncio.sleep(0.3)  # no writer: it waits (and the client keeps trying)
            assert not waiting.done()
            await asyncio.to_thread(writer.start)
            assert (await asyncio.wait_for(waiting, 10)).seq == 2  # m2 never committed
            again = await store.append_user(s, "m2", "q", "m")  # the client's retry
            assert (again.seq, again.duplicate) == (3, False)
            assert [e.msg_id for e in await store.events_after(s, 0)] == ["m1", "m3", "m2"]
        finally:
            await store.close()

    asyncio.run(main())
    assert writer.stop() == 0  # SIGTERM: it committed what was queued and exited cleanly


def test_no_writer_answering_the_store_writes_the_file_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open() waits WRITER_WAIT for the writer, then writes the file itself (it is correct
    either way: the writer is an optimisation), saying so in the log."""
    monkeypatch.setattr(sqlite_mod, "WRITER_WAIT", 0.2)
    path = tmp_path / "s.db"
    store = SqliteStore(str(path), 3600, writer="\0chatd-test-nobody-" + os.urandom(6).hex())

    async def main() -> None:
        await store.open()
        try:
            s = await store.create_session("")
            assert (await store.append_user(s, "m1", "q", "m")).seq == 1
            assert store.checkpointer is not None  # its own connection and checkpointer
        finally:
            await store.close()

    asyncio.run(main())
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT msg_id FROM events").fetchall() == [("m1",)]


def test_a_bad_frame_closes_that_connection_only(writer: WriterProcess) -> None:
    """An unknown op (or any malformed request) ends the connection that sent it; the
    writer goes on serving the others."""
    store = SqliteStore(writer.path, 3600, writer=writer.address)

    async def main() -> None:
        await store.open()
        try:
            s = await store.create_session("")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                raw.settimeout(10)
                raw.connect(writer.address)
                raw.sendall(msgpack.packb([1, "drop_table", []]))
                assert await asyncio.to_thread(raw.recv, 100) == b""  # closed, no answer
            assert (await store.append_user(s, "m1", "q", "m")).seq == 1
        finally:
            await store.close()

    asyncio.run(main())


PEER = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(chr(0) + sys.argv[1])
try:
    sock.sendall(bytes.fromhex(sys.argv[2]))
    print("answered" if sock.recv(100) else "closed")
except ConnectionError:
    print("closed")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run a peer as another user")
def test_a_peer_of_another_user_is_refused(writer: WriterProcess) -> None:
    """Only the writer's own user (or root) may write through it (SO_PEERCRED)."""
    python = next(
        (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None
    )
    if python is None:
        pytest.skip("no system python3 that another user may run")
    request = msgpack.packb([1, "create", ["intruder"]]).hex()
    out = subprocess.run(
        [python, "-c", PEER, writer.name, request],
        user=65534,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "closed"  # unanswered
    with sqlite3.connect(writer.path) as db:
        assert db.execute("SELECT count(*) FROM sessions").fetchone() == (0,)


def test_two_clients_share_one_group_commit(writer: WriterProcess) -> None:
    """Two stores' appends sent in the same tick commit in one batch of the writer: each
    store's round trips, not one commit per request; seqs stay contiguous per session."""
    a = SqliteStore(writer.path, 3600, writer=writer.address)
    b = SqliteStore(writer.path, 3600, writer=writer.address)

    async def main() -> None:
        await a.open()
        await b.open()
        try:
            s = await a.create_session("")
            calls = [x.append_user(s, f"m{i}", "q", "m") for i, x in enumerate([a, b] * 50)]
            got = await asyncio.gather(*calls)
            assert sorted(r.seq for r in got) == list(range(1, 101))
            assert a.statistics().commits <= 3 and b.statistics().commits <= 3
            assert a.statistics().rows == b.statistics().rows == 50
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_renewals_of_two_owners_in_one_batch_answer_each_its_own(tmp_path: Path) -> None:
    """The writer renews for every worker in one batch: a message claimed by B is not
    reported held to A, its first owner, renewing in the same batch."""
    store = SqliteStore(str(tmp_path / "s.db"), 3600, owner="A")

    async def main() -> None:
        await store.open()
        try:
            s = await store.create_session("")
            await store.append_user(s, "m1", "q", "m", lease_s=0.05)  # A's, lapsing soon
            await asyncio.sleep(0.1)
            claimed = await store.submit("claim", ["B", s, 60.0, 10])
            assert [e.msg_id for e in claimed] == ["m1"]
            a = store.submit("renew", ["A", s, ["m1"], 60.0])  # one tick: one batch
            b = store.submit("renew", ["B", s, ["m1"], 60.0])
            assert await a == set()
            assert await b == {"m1"}
        finally:
            await store.close()

    asyncio.run(main())


def test_a_stuck_writer_fails_the_writes_after_the_timeout(writer: WriterProcess) -> None:
    """A writer alive but answering nothing (SIGSTOP) fails the writes after ``lock_timeout``
    (as a locked file would), in flight or not; once it answers again, so does the store."""
    store = SqliteStore(writer.path, 3600, writer=writer.address, lock_timeout=1.0)
    assert writer.proc is not None
    pid = writer.proc.pid

    async def main() -> None:
        await store.open()
        try:
            s = await store.create_session("")
            os.kill(pid, signal.SIGSTOP)
            try:
                with pytest.raises(StoreError, match=r"answer|reach"):
                    await asyncio.wait_for(store.append_user(s, "m1", "q", "m"), 10)
            finally:
                os.kill(pid, signal.SIGCONT)
            got = await asyncio.wait_for(store.append_user(s, "m1", "q", "m"), 10)
            assert got.seq == 1  # the first may have committed: then this one is its duplicate
        finally:
            await store.close()

    asyncio.run(main())


def test_an_orphaned_writer_serves_its_connections_until_they_end(tmp_path: Path) -> None:
    """The master's end of the link closes (the master died): the writer takes no new
    connection, goes on serving the open one (a draining worker's), and exits once it ends."""
    path = str(tmp_path / "s.db")
    address = "\0chatd-test-orphan-" + os.urandom(6).hex()
    ours, theirs = socket.socketpair()

    async def main() -> None:
        serving = asyncio.ensure_future(sqlite_host.serve(path, address, theirs))
        store = SqliteStore(path, 3600, writer=address)
        await store.open()
        try:
            s = await store.create_session("")
            ours.close()  # the master is gone
            await until(
                lambda: not sqlite_host.accepts(address), "the writer to stop taking connections"
            )
            assert (await store.append_user(s, "m1", "q", "m")).seq == 1  # the open one serves
            assert not serving.done()
        finally:
            await store.close()
        assert await asyncio.wait_for(serving, 10) == 0

    try:
        asyncio.run(main())
    finally:
        theirs.close()
