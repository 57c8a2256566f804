"""The host writer: one process that does every worker's SQLite writes, on one connection.

Why: two worker processes writing one SQLite file pay for sharing it. Each commit of one makes
the other's connection drop its whole page cache (SQLite sees the WAL index changed), so every
batch read its B-tree pages again (15 ``pread`` per message at 1,000 msg/s); every transaction
locked the shared WAL index (6-9 ``fcntl``), the workers took the write gate in turn (2-3
``flock``), and two half-size batches wrote more WAL pages than one would (23-26 ``pwrite``):
47-53 of a worker's 61-69 system calls per message were the store's, against the bare relay's
13-14 in all (scripts/syscalls.py, docs/benchmarks.md). Here one :class:`SqliteStore` (its
page cache kept from commit to commit, its checkpointer the host's only one) commits the
requests of every worker that arrived in one tick as one batch: a group commit across workers.

The master forks it before the workers (:mod:`chatd.master.storewriter`), restarts it when it
dies, and stops it after the last worker; each worker's store (``SqliteStore(writer=ADDRESS)``,
:mod:`chatd.store.sqlite_remote`) sends its writes here over a unix socket (an abstract name:
no file to clean up, no path-length limit) and reads the file itself (WAL readers need no
lock). A peer of another user is refused (SO_PEERCRED). The frames: :mod:`chatd.store.sqlite_wire`.

The promises hold as before: a worker acknowledges a message once its answer says committed;
a writer that dies leaves its requests in flight unanswered, and the workers fail them (a
user message is then not acknowledged: the client sends it again and the append, idempotent
on its id, stores it once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import sys
from typing import Any, NoReturn, cast

import msgpack
import uvloop

from chatd.errors import StoreError
from chatd.logs import set_role
from chatd.proto import control
from chatd.spec import WriterSpec
from chatd.store import sqlite_wire as wire
from chatd.store.sqlite import SqliteStore

log = logging.getLogger("chatd.store")

_UCRED = struct.Struct("3i")  # pid, uid, gid


def listen(address: str) -> socket.socket:
    """A listening unix stream socket on ``address`` (an abstract name: it starts with NUL)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def peer_allowed(sock: socket.socket) -> bool:
    """The peer runs as this process's user, or as root."""
    try:
        _, uid, _ = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        return False
    return uid in (os.getuid(), 0)


class _Connection(asyncio.Protocol):
    """One worker store's connection: its requests into the store's batches, the answers back
    (all the answers resolved in one tick in one write)."""

    def __init__(self, writer: HostWriter) -> None:
        self._writer = writer
        self._store = writer.store
        self._loop = writer.loop
        self._unpacker = wire.unpacker()
        self._packer = wire.packer()
        self._out: list[bytes] = []
        self._flush_planned = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # (uvloop's are not its subclasses)
        sock = transport.get_extra_info("socket")
        if sock is None or not peer_allowed(sock):
            log.warning("store writer: a connection from another user refused")
            transport.abort()
            return
        self.transport = transport
        self._writer.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._writer.ended(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._unpacker.feed(data)
            for frame in self._unpacker:
                self._request(frame)
        except (ValueError, msgpack.UnpackException) as exc:
            # Only chatd's workers connect: a bad frame is a bug or a stranger. That
            # connection alone ends; its requests already queued still commit.
            log.error("store writer: a bad request frame (%s); closing that connection", exc)
            if self.transport is not None:
                self.transport.close()

    def _request(self, frame: Any) -> None:
        rid, op, args = wire.check_request(frame)
        try:
            fut = self._store.submit(op, args)
        except StoreError as exc:  # the writer is closing
            self._send(wire.answer(rid, op, exc))
            return
        fut.add_done_callback(lambda f: self._done(rid, op, f))

    def _done(self, rid: int, op: str, fut: asyncio.Future[Any]) -> None:
        exc = fut.exception()
        self._send(wire.answer(rid, op, exc if exc is not None else fut.result()))

    def _send(self, frame: list[Any]) -> None:
        self._out.append(self._packer.pack(frame))
        if not self._flush_planned:  # the answers of a batch: one write, after it settled
            self._flush_planned = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the answers gathered so far, in one write."""
        self._flush_planned = False
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))


class HostWriter:
    """Serves the writes of the workers' stores on ``store`` (opened), on ``address``."""

    def __init__(self, store: SqliteStore, address: str) -> None:
        self.store = store
        self.address = address
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self._none_left = asyncio.Event()  # set when the last connection ends
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen (raises OSError: the address is taken, e.g. by a live writer)."""
        self._server = await self.loop.create_unix_server(
            lambda: _Connection(self), sock=listen(self.address)
        )

    def stop_accepting(self) -> None:
        """No new connection; those open go on."""
        if self._server is not None:
            self._server.close()

    async def connections_closed(self) -> None:
        """Wait until every open connection has ended (its worker exited)."""
        if self.connections:
            self._none_left.clear()
            await self._none_left.wait()

    def ended(self, conn: _Connection) -> None:
        """``conn`` was lost."""
        self.connections.discard(conn)
        if not self.connections:
            self._none_left.set()

    async def close(self) -> None:
        """Stop accepting and reading, commit every queued write, answer it, close the
        connections. (A request unread by then is lost with its connection: its worker fails
        it as one in flight. The master stops the writer after the last worker: none is.)"""
        self.stop_accepting()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.pause_reading()
        await self.store.close()  # drains the queue: every request read is answered
        for conn in list(self.connections):
            conn.flush()  # its answers (their callbacks ran while the store closed its threads)
            if conn.transport is not None:
                conn.transport.close()  # (after what it still buffers)


ORPHAN_WAIT = 120.0  # s: an orphaned writer serves its open connections this long at most
STATS_S = 1.0  # seconds between two reports of the writer's figures to the master


class _MasterLink(asyncio.Protocol):
    """The writer's end of its link with the master (control frames, chatd.proto.control):
    ``ready`` once it serves, then its figures every STATS_S (``stats {store}``); EOF means
    the master died (``gone`` is set)."""

    def __init__(self, gone: asyncio.Event) -> None:
        self._gone = gone
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        pass  # the master sends nothing

    def eof_received(self) -> bool:
        self._gone.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._gone.set()

    def send(self, msg: dict[str, Any]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(control.encode(msg))


def figures(store: SqliteStore) -> dict[str, Any]:
    """The writer's store figures for ``chatctl status``: its batches' commits and latency
    (chatd.store.sqlite.SqliteStore.statistics), and its checkpointer's."""
    st = store.statistics()
    out: dict[str, Any] = {
        "commits": st.commits,
        "rows": st.rows,
        "commit_p50_ms": round(st.commit_p50_ms, 3),
        "commit_p99_ms": round(st.commit_p99_ms, 3),
        "busy_retries": st.busy_retries,
        "lock_waits": st.lock_waits,
    }
    cp = store.checkpointer
    if cp is not None:
        out.update(checkpoints=cp.checkpoints, checkpoint_restarts=cp.restarts)
        out.update(checkpoint_failures=cp.failures, wal_pages=cp.wal_pages)
    return out


async def _report(store: SqliteStore, master: _MasterLink) -> None:
    while True:
        master.send({"t": "stats", "store": figures(store)})
        await asyncio.sleep(STATS_S)


async def serve(path: str, address: str, link: socket.socket | None = None) -> int:
    """The writer process's life: open the store on ``path``, serve ``address`` until SIGTERM
    (the master's, after its last worker), then commit what is queued and exit. Returns the
    exit code.

    SIGINT is ignored: a Ctrl-C in a terminal reaches every process of the daemon at once,
    and the workers, stopping, still write through this one; the master sends SIGTERM once
    they have exited. EOF on ``link`` (the master's socket) means the master died: its workers
    drain and exit, still writing here, so the writer takes no new connection, serves those
    open until they end (``ORPHAN_WAIT`` at most) and exits.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    orphaned = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    master: _MasterLink | None = None
    if link is not None:
        link.setblocking(False)
        _, master = await loop.create_unix_connection(lambda: _MasterLink(orphaned), sock=link)
    store = SqliteStore(path, 1)  # each request carries its own ttl (chatd.store.sqlite_wire)
    try:
        await store.open()
    except StoreError as exc:
        log.error("store writer: %s", exc)
        return 1
    writer = HostWriter(store, address)
    try:
        await writer.start()
    except OSError as exc:
        log.error("store writer: cannot listen: %s", exc)
        await store.close()
        return 1
    log.info("store writer serving %s (pid %d)", path, os.getpid())
    reporting: asyncio.Future[None] | None = None
    if master is not None:  # the master restarts a writer that served at once
        master.send({"t": "ready"})
        reporting = asyncio.ensure_future(_report(store, master))
    stopping = asyncio.ensure_future(stop.wait())
    master_gone = asyncio.ensure_future(orphaned.wait())
    await asyncio.wait([stopping, master_gone], return_when=asyncio.FIRST_COMPLETED)
    if master_gone.done() and not stop.is_set():
        log.warning("store writer: the master is gone; serving the workers left until they exit")
        writer.stop_accepting()
        drained = asyncio.ensure_future(writer.connections_closed())
        await asyncio.wait(
            [stopping, drained], timeout=ORPHAN_WAIT, return_when=asyncio.FIRST_COMPLETED
        )
        drained.cancel()
    stopping.cancel()
    master_gone.cancel()
    await writer.close()
    if reporting is not None:
        reporting.cancel()
    if master is not None:
        master.send({"t": "stats", "store": figures(store)})  # its last figures
    log.info("store writer stopped")
    return 0


def run_writer(spec: WriterSpec) -> NoReturn:
    """The forked writer's main (chatd.master.storewriter): never returns; the process exits
    with :func:`serve`'s code."""
    code = 1
    try:
        set_role("store writer")
        # As in a worker: the checkpointer's thread needs the GIL between its SQLite steps,
        # and at the default 5 ms switch interval a busy loop starves it (its PASSIVE
        # checkpoints fall behind, the WAL grows, and RESTARTs, which hold the write gate,
        # come more often).
        sys.setswitchinterval(1e-4)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            code = runner.run(serve(spec.path, spec.address, spec.link))
    except BaseException:
        log.exception("store writer crashed")
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """``python -m chatd.store.sqlite_host PATH ADDRESS``: a writer outside a daemon (tests,
    or a store shared by daemons of one host; ADDRESS ``@name`` is the abstract ``\\0name``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m chatd.store.sqlite_host")
    parser.add_argument("path", help="the SQLite file")
    parser.add_argument("address", help="the unix socket: a path, or @NAME (abstract)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return uvloop.run(serve(args.path, unix_address(args.address)))


def unix_address(text: str) -> str:
    """``@name`` as the abstract socket name ``\\0name``; anything else as it is (a path)."""
    return "\0" + text[1:] if text.startswith("@") else text


def accepts(address: str) -> bool:
    """Whether a writer (anything) listens at the unix ``address`` now: a connection is
    opened and closed at once (an abstract name starts with NUL)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(address)
        except OSError:
            return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
