"""The SQLite session store: one WAL file shared by every worker process of a host.

Each worker opens its own :class:`SqliteStore` after the fork (threads and connections do not
survive ``fork``). In a daemon its writes go to the host's **store writer**
(``SqliteStore(writer=ADDRESS)``: :mod:`chatd.store.sqlite_host`, a process of the master's
that runs the batches below for every worker on one connection, and
:mod:`chatd.store.sqlite_remote`, a worker's side); it reads the file itself. Without a writer
(``[sessions] sqlite_writer = false``, tests, tools) each store writes the file itself, as
below. SQLite has one writer at a time per file, so the store spends that lock well, and never
makes the event loop wait for it or for the disk:

- **Writes run on the event loop** (:mod:`chatd.store.sqlite_write`). The writes queued in one
  loop tick (appends, creates, claims, renewals, expiries) make one batch, committed by one
  callback at the end of the tick (one ``loop.call_soon`` per tick); it resolves the futures
  right there, after the commit (contract 3). They used to run on a writer thread, and its
  hand-offs were most of an ack's wait: a queue put and a thread wake-up per tick, the GIL
  ping-pong (the sqlite3 module releases the GIL around every step, and the thread waited to
  take it back from a busy loop), then ``call_soon_threadsafe`` back. Measured with
  ``scripts/quick_bench.py throughput --workers 1 --rate 1000`` (the first-cut measuring
  script, retired since for ``chatd-bench``; in git up to commit ba3b18b) (side by side,
  5+ runs each): ack p50 2.1-3.1 -> 0.9-1.4 ms, reply p50 4.6-6.8 -> 2.0-3.0 ms, for a worker
  CPU per message of 790-855 -> 865-940 us (smaller batches: 1.1-1.3 appends per commit
  instead of 3.5-3.9). Near one worker's capacity (2,000 msg/s) batches grow by themselves
  (8 appends per commit), the CPU per message is the thread's (~500 us) and the reply p50 is
  17-19 ms instead of 43-108 ms.
- **Group commit**: a batch reads the state of all its sessions in one statement, assigns
  seqs and finds duplicates in Python, and writes all its appends with ONE ``INSERT`` (its own
  transaction). A batch whose sessions this store's own commits describe (last seq,
  ``updated_at``) skips the read: the file refuses a stale plan (the seq trigger, the UNIQUE
  constraint), and the batch is planned again from a read (7-12 % less worker CPU per
  message at 1,000 msg/s). No window waits for company by default (``window`` 0): on the
  loop, a tick already gathers what arrived together, and a heavier load makes longer ticks,
  so larger batches. A 1 ms window for a lone request (the thread's) measured at 1,000 msg/s: 2.6
  appends per commit and ~10 % less CPU, but it gave back most of the latency gained (ack p50
  2.2 ms, reply p50 4.8 ms); at 2,000 msg/s it changed nothing.
- **The loop never waits for the lock, and the workers take it in turn**: a batch first takes
  the host-wide *write gate* (:mod:`chatd.store.sqlite_gate`, an ``flock`` beside the file,
  taken by every worker's store and by the checkpointer). Free, it costs three system calls
  (take, let go, a byte to the waiters' FIFO); held, the loop watches that FIFO and runs the
  batch as soon as a release's byte comes (``lock_waits``), with the writes queued meanwhile;
  not had within ``lock_timeout``, the queued writes fail. Behind it, the write connection has
  a busy timeout of 0: a batch that still finds the file locked (a process that takes no gate: a
  backup, the ``sqlite3`` shell) is tried again from the loop after a random 0.2-2 ms
  (``call_later``; up to 10 ms once it has waited 0.1 s), until ``lock_timeout``, counted in
  ``busy_retries``. What it had committed is resolved at once; the rest goes back to the head
  of the queue, so a session's writes still commit, and resolve, in order. The gate replaced
  those retries between workers: at 1,000 msg/s they were ~2,500 per 10 s and their random
  pauses most of the slowest replies' time (docs/benchmarks.md).
- **No fsync on the loop**: with ``synchronous=NORMAL`` a WAL commit only writes to the page
  cache; the fsyncs are the checkpoints', and the write connection runs none
  (``wal_autocheckpoint = 0``). A thread of its own does (:mod:`chatd.store.sqlite_checkpoint`):
  PASSIVE ones, and a RESTART when the WAL stays large, so it stays bounded (7-8.5 MB at
  1,000 msg/s, flat over 30 s, where SQLite's auto-checkpoint kept it at 4.2 MB;
  ``journal_size_limit`` truncates it above 64 MiB). One fsync is a writer's: the write that
  starts the WAL over syncs its header. The checkpointer makes that write itself, holding the
  gate, right after a checkpoint that copied every frame; a worker's batch that comes between
  the two still pays it (seen: 14 loop samples in 1,854 under a closed loop, from 22).
- **Why one statement per kind of request and not BEGIN IMMEDIATE ... COMMIT**: SQLite's
  write lock is then held only inside one ``sqlite3_step``, in C: never across the planning
  in Python, a wait for the GIL, or the kernel preempting the worker between statements (a
  process that takes no gate meets it that briefly). The gate, held for a whole batch (its
  planning included), does not have that property: a worker preempted mid-batch holds up the
  other; measured, waiting in line for it still beats retrying (docs/benchmarks.md).
- **Checked by the file**: triggers refuse an event whose seq is not its session's
  ``last_seq + 1`` and then bump ``last_seq``; a UNIQUE constraint refuses a second user or final
  event per message (contracts 1, 2). A batch that raced a writer in another process fails
  whole and is planned again, so seqs stay distinct and contiguous across processes.
- **Failures stay local**: a refused request (unknown or expired session) fails alone; when a
  batch fails unexpectedly its requests are retried one by one so only the culprit fails.
- **Reads** use a second connection in one reader thread (SQLite's ``busy_timeout`` and
  retries there), and return one JSON value per query (one step, whatever the row count), so
  that thread takes the GIL back from the busy loop once per read, not once per row.

- **Leases** (contract 6) live in the ``events`` row of the user message (``lease_owner``,
  ``lease_until``, unix time: one clock, as every process shares the host): set by the append's
  INSERT, released by a trigger on the final's INSERT, taken by ``claim`` with one ``UPDATE ...
  RETURNING`` (SQLite >= 3.35), so atomically against every process.

Contract 4 on the loop: a batch costs the loop its statements' CPU and page-cache writes
(commit p50 0.12-0.13 ms at 1,000 msg/s), but never a wait for a lock or a disk flush.
Durability: WAL with ``synchronous=NORMAL`` survives the death of any process, not a power loss.

Beyond the ``Store`` docstrings: ``history`` counts as a turn a user event *with a reply*; user
messages that ended in an error or are unanswered are left out (they would put two user turns
in a row in the model's context, and the message being answered must not appear twice). It
gives each user event followed by its reply, by the user event's seq. ``append_final`` does not
require the user event. Reads of an unknown session give ``[]``; an expired session's events
stay readable until ``expire`` deletes them (``get_session`` hides the session at once).
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import orjson

from chatd.errors import StoreError
from chatd.store import sqlite_sql as sql
from chatd.store.base import (
    LEASE_S,
    Appended,
    Event,
    EventKind,
    SessionInfo,
    StoreStats,
    log,
    new_owner_id,
)
from chatd.store.sqlite_checkpoint import Checkpointer
from chatd.store.sqlite_gate import WriteGate
from chatd.store.sqlite_remote import WriterClient
from chatd.store.sqlite_write import LoopWrites, is_busy

T = TypeVar("T")

WRITER_WAIT = 5.0  # seconds open() waits for the host writer before writing the file itself
PROBE_MIN_FREE = 1 << 20  # bytes: less free on the disk of the file, and the store is "full"


def _events(blob: str) -> list[Event]:
    rows = orjson.loads(blob)
    rows.sort(key=lambda r: r[0])  # json_group_array promises no order
    return [Event(*r) for r in rows]


class SqliteStore(LoopWrites):
    """The :class:`~chatd.store.base.Store` on a SQLite file (see the module docstring).

    ``window`` and ``max_batch`` shape the group commit; ``lock_timeout`` is the total time a
    write keeps retrying a locked file (seconds). The write connection never waits in SQLite
    (busy timeout 0); ``busy_timeout`` is SQLite's own wait on a held lock in the reader and
    the checkpointer threads. A checkpoint runs about every ``checkpoint_pages / 2`` pages
    written to the WAL, and at most ``checkpoint_interval`` s after a commit; a WAL left at
    ``checkpoint_pages`` or more is restarted (see :mod:`chatd.store.sqlite_checkpoint`).
    """

    def __init__(
        self,
        path: str,
        ttl: int,
        *,
        window: float = 0.0,
        max_batch: int = 256,
        busy_timeout: float = 0.01,
        lock_timeout: float = 30.0,
        owner: str | None = None,
        checkpoint_pages: int = 1000,
        checkpoint_interval: float = 0.25,
        writer: str | None = None,
    ) -> None:
        self.path = path
        self._dir = os.path.dirname(os.path.abspath(path))  # statvfs'd by probe()
        self.owner = owner or new_owner_id()
        self.ttl = ttl
        # window 0: the writes of one event-loop tick make a batch, at its end. Measured, a
        # window for a lone request saves some CPU at a moderate load only, for a latency that
        # the move from a writer thread to the loop was made to save (module docstring).
        self._window = window
        self._max_batch = max_batch
        self._busy_timeout = busy_timeout
        self._lock_timeout = lock_timeout
        self._checkpointer: Checkpointer | None = None
        self._gate: WriteGate | None = None
        self._checkpoint_args = (checkpoint_pages, checkpoint_interval)
        self._reader: ThreadPoolExecutor | None = None
        self._wdb: sqlite3.Connection | None = None
        self._rdb: sqlite3.Connection | None = None
        self._closed = False
        self._init_writes()
        self.writer = writer  # the host writer's address (chatd.store.sqlite_host), or None

    @property
    def checkpointer(self) -> Checkpointer | None:
        """The WAL checkpointer (its figures: checkpoints, restarts, wal_pages...), once open."""
        return self._checkpointer

    async def open(self) -> None:
        """Open the connections, switch to WAL, create or migrate the schema, start threads."""
        if self._loop is not None or self._closed:
            raise StoreError("the session store was already opened")
        loop = asyncio.get_running_loop()
        if self.writer is not None:
            try:
                await self._open_remote(loop, self.writer)
                return
            except StoreError as exc:  # the file itself says what is wrong, if anything is
                log.warning("%s; this worker writes %s itself", exc, self.path)
        await asyncio.to_thread(self._connect)
        try:
            self._gate = WriteGate(self.path)
        except OSError as exc:  # a read-only directory: SQLite's lock and retries alone
            log.warning("no write gate for %s (%s): writes retry on a locked file", self.path, exc)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="chatd-store-read")
        pages, interval = self._checkpoint_args
        checkpointer = Checkpointer(
            lambda: self._connection(self._busy_timeout),
            pages=pages,
            interval=interval,
            gate=(lambda: WriteGate(self.path)) if self._gate is not None else None,
        )
        checkpointer.start(loop)
        self._checkpointer = checkpointer
        self._loop = loop  # writes are accepted from here on

    async def _open_remote(self, loop: asyncio.AbstractEventLoop, address: str) -> None:
        """Writes through the host writer at ``address``; the reader connection of our own
        (opened once the writer answers: it has created or migrated the schema)."""
        remote = WriterClient(address, loop, self._lock_timeout, self._record)
        await remote.connect(WRITER_WAIT)
        try:
            self._rdb = await asyncio.to_thread(self._reader_connection)
        except (OSError, sqlite3.Error) as exc:
            await remote.close()
            raise StoreError(f"cannot open the session store {self.path}: {exc}") from exc
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="chatd-store-read")
        self._remote = remote
        self._loop = loop

    async def close(self) -> None:
        """Commit every write queued so far, then stop the threads and close the file."""
        if self._closed:
            return
        self._closed = True  # new requests are refused from here on
        if self._remote is not None:
            await self._remote.drain()
            await self._remote.close()
        await self._drain()
        if self._gate is not None:
            self._gate.close()
        if self._checkpointer is not None:
            await self._checkpointer.close()
        if self._reader is not None:
            await asyncio.to_thread(self._reader.shutdown, True)
        # Closed in a thread: the last connection to a WAL file checkpoints it (an fsync).
        for db in (self._rdb, self._wdb):
            if db is not None:
                await asyncio.to_thread(db.close)

    def _connect(self) -> None:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            # Workers starting together open a new file at once: one of them turning it into
            # WAL holds a lock the others must wait out, even for their first PRAGMA.
            self._wdb = self._retrying(self._connection, 0.0)
            self._rdb = self._reader_connection()
            self._retrying(self._setup)
        except BaseException as exc:
            for db in (self._wdb, self._rdb):
                if db is not None:
                    db.close()
            if isinstance(exc, (OSError, sqlite3.Error)):
                raise StoreError(f"cannot open the session store {self.path}: {exc}") from exc
            raise

    def _reader_connection(self) -> sqlite3.Connection:
        """The reader thread's connection: SQLite's own busy wait, and query_only (the reader
        never writes, by mistake)."""
        db = self._retrying(self._connection, self._busy_timeout)
        try:
            db.execute("PRAGMA query_only = ON")
        except BaseException:
            db.close()
            raise
        return db

    def _connection(self, busy_timeout: float) -> sqlite3.Connection:
        # Autocommit (isolation_level=None): every statement is its own short transaction.
        db = sqlite3.connect(
            self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute("PRAGMA synchronous = NORMAL")  # per connection; survives process death
        except BaseException:
            db.close()
            raise
        return db

    def _setup(self) -> None:
        assert self._wdb is not None
        db = self._wdb
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"{self.path}: cannot use WAL mode (got {mode!r}); a local disk?")
        db.execute("PRAGMA journal_size_limit = 67108864")  # truncate the WAL above 64 MiB
        db.execute("PRAGMA wal_autocheckpoint = 0")  # no checkpoint (fsync) on the loop
        db.execute("BEGIN IMMEDIATE")  # serializes schema creation among starting workers
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > sql.SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {version} is newer than this "
                    f"chatd ({sql.SCHEMA_VERSION}); upgrade chatd"
                )
            for v in range(version + 1, sql.SCHEMA_VERSION + 1):
                for statement in sql.MIGRATIONS[v]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {v}")
            db.execute("COMMIT")
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")

    def _retrying(self, fn: Callable[..., T], *args: Any) -> T:
        """Off the loop: ``fn(*args)``, retried while the database is locked (``lock_timeout``)."""
        deadline = time.monotonic() + self._lock_timeout
        while True:
            try:
                return fn(*args)
            except sqlite3.Error as exc:
                if not is_busy(exc) or time.monotonic() > deadline:
                    raise
            with self._stats_lock:
                self._busy_retries += 1
            # Short random pauses: SQLite's own busy handler backs off to 10-100 ms sleeps and is
            # no fair queue; polling keeps the wait near the holder's actual commit time.
            time.sleep(random.uniform(0.0002, 0.002))

    async def create_session(self, owner: str) -> str:
        """Create an empty session with a new id of 128 random bits (22 URL-safe characters)."""
        if "\0" in owner:
            raise ValueError("a session owner cannot contain NUL")
        return cast(str, await self._write("create", owner))

    async def append_user(
        self, session: str, msg_id: str, text: str, model: str, lease_s: float = LEASE_S
    ) -> Appended:
        """Append a user message leased to this store for ``lease_s`` s; a repeated ``msg_id``
        returns the original seq and changes nothing (contracts 1, 6)."""
        meta = orjson.dumps({"model": model}).decode()
        return cast(
            Appended,
            await self._write(
                "append", self.owner, self.ttl, session, msg_id, "user", text, meta, lease_s
            ),
        )

    async def append_final(
        self, session: str, msg_id: str, kind: EventKind, text: str, meta: Mapping[str, Any]
    ) -> Appended:
        """Append the one reply or final error of ``msg_id`` (contract 2)."""
        if kind not in ("reply", "error"):
            raise ValueError(f"append_final takes 'reply' or 'error', not {kind!r}")
        # Serialized here, so a bad meta fails its caller at once rather than in the batch.
        blob = orjson.dumps(meta if isinstance(meta, dict) else dict(meta)).decode()
        return cast(
            Appended,
            await self._write(
                "append", self.owner, self.ttl, session, msg_id, kind, text, blob, 0.0
            ),
        )

    async def claim(self, session: str | None, lease_s: float, limit: int) -> list[Event]:
        """Take up to ``limit`` lapsed leases (of ``session``, or of all with None): one UPDATE
        ... RETURNING (its own transaction), so atomic against every process (contract 6)."""
        if limit <= 0:
            return []
        return cast(list[Event], await self._write("claim", self.owner, session, lease_s, limit))

    async def renew(self, session: str, msg_ids: Sequence[str], lease_s: float) -> set[str]:
        """Extend this store's leases (contract 6); the renewals queued in one event-loop tick
        are one UPDATE per distinct ``lease_s``."""
        if not msg_ids:
            return set()
        return cast(
            set[str], await self._write("renew", self.owner, session, tuple(msg_ids), lease_s)
        )

    async def release(self, owner: str) -> int:
        """Make ``owner``'s held leases lapse now (see :meth:`chatd.store.base.Store.release`):
        one UPDATE, so atomic against every process's claims and renewals."""
        return cast(int, await self._write("release", owner))

    async def probe(self) -> None:
        """See :meth:`chatd.store.base.Store.probe`: page 1 written again, through the batch,
        and at least PROBE_MIN_FREE bytes free on the file's disk: a WAL with room to reuse
        takes a small write even on a full disk, which the next larger one would fail."""
        await self._write("probe")
        await self._read("SELECT 1")  # the reader side too: a resume reads
        try:
            st = os.statvfs(self._dir)
        except OSError as exc:
            error = StoreError(f"cannot check the disk of {self.path}: {exc}")
            self.health.failed(error)
            raise error from exc
        free = st.f_bavail * st.f_frsize
        if free < PROBE_MIN_FREE:
            error = StoreError(
                f"database or disk is full: {free} bytes free on the disk of {self.path}"
            )
            self.health.failed(error)
            raise error
        self.health.recovered()

    async def expire(self) -> int:
        """Delete the sessions (and their events) idle for more than ``ttl`` seconds."""
        return cast(int, await self._write("expire", self.ttl))

    async def _read(self, sql: str, *params: Any) -> Any:
        """The one row ``sql`` selects (a JSON array for the event lists), read off the loop."""
        if self._reader is None or self._closed:
            raise StoreError("the session store is not open")
        loop = asyncio.get_running_loop()
        try:
            row = await loop.run_in_executor(self._reader, self._retrying, self._row, sql, params)
        except StoreError as exc:  # not open, or the lock held too long
            self.health.failed(exc)
            raise
        except sqlite3.Error as exc:
            error = StoreError(f"session store read failed: {exc}")
            self.health.failed(error)
            raise error from exc
        self.health.ok()
        return row

    def _row(self, sql: str, params: tuple[Any, ...]) -> Any:
        assert self._rdb is not None
        return self._rdb.execute(sql, params).fetchone()

    async def get_session(self, session: str) -> SessionInfo | None:
        """The session, or None if it never existed or was idle for more than ``ttl`` seconds."""
        row = await self._read(
            "SELECT owner, last_seq, updated_at FROM sessions WHERE id = ? AND updated_at >= ?",
            session,
            time.time() - self.ttl,
        )
        return SessionInfo(session, row[0], row[1], row[2]) if row else None

    async def events_after(self, session: str, after_seq: int) -> list[Event]:
        """Every event with ``seq > after_seq``, in seq order."""
        return _events((await self._read(sql.SQL_EVENTS_AFTER, session, after_seq))[0])

    async def history(self, session: str, turns: int) -> list[Event]:
        """The last ``turns`` answered user messages, each followed by its reply (see above)."""
        if turns <= 0:
            return []
        pairs = orjson.loads((await self._read(sql.SQL_HISTORY, session, turns))[0])
        pairs.sort(key=lambda p: p[0][0])
        return [Event(*e) for pair in pairs for e in pair]

    async def unanswered(self, session: str) -> list[Event]:
        """The user events that have neither a reply nor a final error yet, in seq order."""
        return _events((await self._read(sql.SQL_UNANSWERED, session))[0])

    def statistics(self) -> StoreStats:
        """Write transactions committed, event rows stored (duplicates excluded), commit
        latency, busy retries, waits for the write gate.

        A commit's latency is its batch's: the time the event loop spent running the batch
        (its statements, planning included) and, for a batch that found the file locked, from
        its first attempt to its commit (the lock waits and the loop's other work between
        attempts included). The ``window`` spent gathering a batch is not counted. Through the
        host writer: ``commits`` counts the round trips (the writes of one tick), the latency
        is each request's from its send to its answer, and there are no busy retries or gate
        waits (the writer's are its own).
        """
        with self._stats_lock:
            samples = sorted(self._samples)
            commits, rows, busy = self._commits, self._rows, self._busy_retries
        if self._remote is not None:  # the writes' round trips, their answers' latency
            commits = self._remote.round_trips

        def pct(q: float) -> float:
            return samples[min(len(samples) - 1, int(q * len(samples)))] if samples else 0.0

        waits = self._gate.waits if self._gate is not None else 0
        return StoreStats(commits, rows, pct(0.50), pct(0.99), busy, waits)
