"""The SQLite session store: one WAL file shared by every worker process of a host.

Each worker opens its own :class:`SqliteStore` after the fork (threads and connections do not
survive ``fork``). SQLite has one writer at a time per file, so the store spends that lock well:

- **Group commit**: writes go to one writer thread per store. It takes every queued request
  (a lone request first waits ``window`` s for company; at most ``max_batch``), reads the state
  of all their sessions in one statement, assigns seqs and finds duplicates in Python, and
  writes all the appends with ONE ``INSERT`` (its own transaction). Futures are resolved after
  the commit (contract 3), with one ``call_soon_threadsafe`` per batch and event loop.
- **Checked by the file**: triggers refuse an event whose seq is not its session's
  ``last_seq + 1`` and then bump ``last_seq``; a UNIQUE constraint refuses a second user or final
  event per message (contracts 1, 2). A batch that raced a writer in another process fails
  whole and is planned again, so seqs stay distinct and contiguous across processes.
- **Why one statement and not BEGIN IMMEDIATE ... COMMIT**: the sqlite3 module releases the GIL
  around every step, and next to a busy event loop the writer thread may wait long to take it
  back (measured: 0.4-0.8 s per statement with the loop at 100%). Holding the host-wide write
  lock across such waits would stall every worker; a single statement holds it only in C.
- **Failures stay local**: a refused request (unknown or expired session) fails alone; when a
  batch fails unexpectedly its requests are retried one by one so only the culprit fails.
- **Contention is waited out**: SQLite sleeps ``busy_timeout`` on a held lock, then the store
  retries after a short random pause (counted in ``busy_retries``) until ``lock_timeout``.
- **Reads** use a second connection in one reader thread, and return one JSON value per query
  (one step, whatever the row count) for the same GIL reason.

- **Leases** (contract 6) live in the ``events`` row of the user message (``lease_owner``,
  ``lease_until``, unix time: one clock, as every process shares the host): set by the append's
  INSERT, released by a trigger on the final's INSERT, taken by ``claim`` with one ``UPDATE ...
  RETURNING`` (SQLite >= 3.35) in the writer thread, so atomically against every process.

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
import contextlib
import os
import queue
import random
import secrets
import sqlite3
import threading
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
    new_owner_id,
)

T = TypeVar("T")

_RESERVOIR = 4096  # commit latency samples kept (uniform over all commits since open)
_CONFLICTS = 8  # re-plans of a batch that keeps losing races before it is split up
# (operation: "append", "create" or "expire"; its arguments; the caller's future and loop)
_Request = tuple[str, tuple[Any, ...], asyncio.Future[Any], asyncio.AbstractEventLoop]


def _is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED ("database is locked"): another connection holds the lock."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (5, 6)  # primary codes SQLITE_BUSY, SQLITE_LOCKED
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def _events(blob: str) -> list[Event]:
    rows = orjson.loads(blob)
    rows.sort(key=lambda r: r[0])  # json_group_array promises no order
    return [Event(*r) for r in rows]


def _short(session: str) -> str:
    # A session id is a capability (it resumes the session): errors and logs show a prefix only.
    return session[:6] + "…"


def _resolve(items: list[tuple[asyncio.Future[Any], Any]]) -> None:
    """On the event loop: hand each request its result (a StoreError instance means failure)."""
    for fut, res in items:
        if fut.done():  # the caller was cancelled; its write may still have committed
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)


class SqliteStore:
    """The :class:`~chatd.store.base.Store` on a SQLite file (see the module docstring).

    ``window`` and ``max_batch`` shape the group commit; ``busy_timeout`` is SQLite's own wait on
    a held lock per attempt, ``lock_timeout`` the total time a write keeps retrying (seconds).
    """

    def __init__(
        self,
        path: str,
        ttl: int,
        *,
        window: float = 0.001,
        max_batch: int = 256,
        busy_timeout: float = 0.01,
        lock_timeout: float = 30.0,
        owner: str | None = None,
    ) -> None:
        self.path = path
        self.owner = owner or new_owner_id()
        self.ttl = ttl
        self._window = window
        self._max_batch = max_batch
        self._busy_timeout = busy_timeout
        self._lock_timeout = lock_timeout
        # Requests go to the writer thread once per event-loop tick, as one list: one queue
        # put and one thread wake-up per tick instead of per append (measured: the hand-offs,
        # not SQLite, were most of the store's cost per message).
        self._queue: queue.SimpleQueue[list[_Request] | None] = queue.SimpleQueue()
        self._tick: list[_Request] = []
        self._writer: threading.Thread | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._wdb: sqlite3.Connection | None = None
        self._rdb: sqlite3.Connection | None = None
        self._closed = False
        self._stats_lock = threading.Lock()
        self._commits = self._rows = self._busy_retries = self._n_samples = 0
        self._samples: list[float] = []
        self._ops: dict[str, Callable[[list[Any]], list[Any]]] = {
            "create": self._create,
            "append": self._append,
            "expire": self._expire,
            "claim": self._claim,
            "renew": self._renew,
        }

    async def open(self) -> None:
        """Open both connections, switch to WAL, create or migrate the schema, start threads."""
        if self._writer is not None or self._closed:
            raise StoreError("the session store was already opened")
        await asyncio.to_thread(self._connect)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="chatd-store-read")
        self._writer = threading.Thread(
            target=self._write_loop, name="chatd-store-write", daemon=True
        )
        self._writer.start()

    async def close(self) -> None:
        """Commit every append queued so far, then stop both threads and close the file."""
        if self._closed:
            return
        self._closed = True  # new requests are refused from here on, so the sentinel is last
        if self._writer is not None:
            if self._tick:
                self._hand_over()
            self._queue.put(None)
            await asyncio.to_thread(self._writer.join)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.shutdown, True)
        if self._rdb is not None:
            self._rdb.close()

    def _connect(self) -> None:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            # Workers starting together open a new file at once: one of them turning it into
            # WAL holds a lock the others must wait out, even for their first PRAGMA.
            self._wdb = self._retrying(self._connection)
            self._rdb = self._retrying(self._connection)
            self._retrying(self._setup)
            self._rdb.execute("PRAGMA query_only = ON")  # the reader never writes, by mistake
        except BaseException as exc:
            for db in (self._wdb, self._rdb):
                if db is not None:
                    db.close()
            if isinstance(exc, (OSError, sqlite3.Error)):
                raise StoreError(f"cannot open the session store {self.path}: {exc}") from exc
            raise

    def _connection(self) -> sqlite3.Connection:
        # Autocommit (isolation_level=None): every statement is its own short transaction.
        db = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
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
        """``fn(*args)``, retried while the database is locked, for up to ``lock_timeout``."""
        deadline = time.monotonic() + self._lock_timeout
        while True:
            try:
                return fn(*args)
            except sqlite3.Error as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise
            with self._stats_lock:
                self._busy_retries += 1
            # Short random pauses: SQLite's own busy handler backs off to 10-100 ms sleeps and is
            # no fair queue; polling keeps the wait near the holder's actual commit time.
            time.sleep(random.uniform(0.0002, 0.002))

    async def _write(self, op: str, *args: Any) -> Any:
        if self._writer is None or self._closed:
            raise StoreError("the session store is not open")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._tick:
            loop.call_soon(self._hand_over)
        self._tick.append((op, args, fut, loop))
        return await fut

    def _hand_over(self) -> None:
        """Give this tick's requests to the writer thread in one piece."""
        tick, self._tick = self._tick, []
        self._queue.put(tick)

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
            Appended, await self._write("append", session, msg_id, "user", text, meta, lease_s)
        )

    async def append_final(
        self, session: str, msg_id: str, kind: EventKind, text: str, meta: Mapping[str, Any]
    ) -> Appended:
        """Append the one reply or final error of ``msg_id`` (contract 2)."""
        if kind not in ("reply", "error"):
            raise ValueError(f"append_final takes 'reply' or 'error', not {kind!r}")
        # Serialized here, so a bad meta fails its caller at once rather than in the batch.
        blob = orjson.dumps(meta if isinstance(meta, dict) else dict(meta)).decode()
        return cast(Appended, await self._write("append", session, msg_id, kind, text, blob, 0.0))

    async def claim(self, session: str | None, lease_s: float, limit: int) -> list[Event]:
        """Take up to ``limit`` lapsed leases (of ``session``, or of all with None): one UPDATE
        ... RETURNING in the writer thread, so atomic against every process (contract 6)."""
        if limit <= 0:
            return []
        return cast(list[Event], await self._write("claim", session, lease_s, limit))

    async def renew(self, session: str, msg_ids: Sequence[str], lease_s: float) -> set[str]:
        """Extend this store's leases (contract 6); the renewals queued in one event-loop tick
        are one UPDATE per distinct ``lease_s`` in the writer thread."""
        if not msg_ids:
            return set()
        return cast(set[str], await self._write("renew", session, tuple(msg_ids), lease_s))

    async def expire(self) -> int:
        """Delete the sessions (and their events) idle for more than ``ttl`` seconds."""
        return cast(int, await self._write("expire"))

    def _write_loop(self) -> None:
        """The writer thread: gather a batch, commit it, resolve its futures; until the sentinel."""
        q = self._queue
        running = True
        while running:
            first = q.get()
            if first is None:
                break
            batch = list(first)
            # A lone request waits one window for company; a backlog is taken at once (those
            # requests already waited for the previous commit).
            if len(batch) == 1 and q.empty() and self._window > 0:
                time.sleep(self._window)
            while len(batch) < self._max_batch:
                try:
                    more = q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    running = False
                    break
                batch.extend(more)
            self._run_batch(batch)
        assert self._wdb is not None
        self._wdb.close()

    def _run_batch(self, batch: list[_Request]) -> None:
        start = time.monotonic()
        results: list[Any] = [None] * len(batch)
        try:
            for op, fn in self._ops.items():  # each kind of request: one write transaction
                index = [i for i, req in enumerate(batch) if req[0] == op]
                got = self._commit(fn, [batch[i][1] for i in index]) if index else []
                for i, res in zip(index, got, strict=True):
                    results[i] = res
            rows = sum(1 for r in results if isinstance(r, Appended) and not r.duplicate)
            self._record((time.monotonic() - start) * 1000.0, rows)
        except Exception as exc:  # a bug: fail the batch rather than leave its callers waiting
            results = [StoreError(f"session store write failed: {exc!r}") for _ in batch]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        for (_, _, fut, loop), res in zip(batch, results, strict=True):
            by_loop.setdefault(loop, []).append((fut, res))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_resolve, items)

    def _commit(self, fn: Callable[[list[Any]], list[Any]], reqs: list[Any]) -> list[Any]:
        """``fn(reqs)``: one write transaction, retried while locked or after a lost race; if it
        fails otherwise, the requests are retried one by one and only the failing ones fail."""
        conflicts = 0
        while True:
            try:
                results = self._retrying(fn, reqs)
            except sqlite3.IntegrityError:  # another process wrote first: plan again
                conflicts += 1
                if conflicts < _CONFLICTS:
                    continue
                error: Exception = StoreError("session store write kept conflicting")
            except Exception as exc:
                error = StoreError(f"session store write failed: {exc}")
            else:
                return results
            if len(reqs) == 1:
                return [error]
            return [res for req in reqs for res in self._commit(fn, [req])]

    def _create(self, reqs: list[tuple[str]]) -> list[str]:
        assert self._wdb is not None
        ids = [secrets.token_urlsafe(16) for _ in reqs]  # a collision (2**-128) is a conflict
        now = time.time()
        rows = orjson.dumps([(sid, owner) for sid, (owner,) in zip(ids, reqs, strict=True)])
        self._wdb.execute(sql.SQL_CREATE_ALL, (now, rows))
        self._commits += 1  # written by this thread only
        return ids

    def _expire(self, reqs: list[tuple[()]]) -> list[int]:
        assert self._wdb is not None
        # The sessions_delete trigger deletes the events in the same statement.
        sql = "DELETE FROM sessions WHERE updated_at < ?"
        n = self._wdb.execute(sql, (time.time() - self.ttl,)).rowcount
        self._commits += 1
        return [n] + [0] * (len(reqs) - 1)

    def _claim(self, reqs: list[tuple[str | None, float, int]]) -> list[list[Event]]:
        """Each claim: one UPDATE ... RETURNING (its own transaction)."""
        assert self._wdb is not None
        results: list[list[Event]] = []
        for session, lease_s, limit in reqs:
            now = time.time()
            rows = self._wdb.execute(
                sql.SQL_CLAIM, (self.owner, now + lease_s, now, session, limit)
            ).fetchall()
            self._commits += bool(rows)
            events = [
                Event(seq, kind, msg_id, text, orjson.loads(meta), ts, sess)
                for sess, seq, kind, msg_id, text, meta, ts in rows
            ]
            events.sort(key=lambda e: (e.session, e.seq))
            results.append(events)
        return results

    def _renew(self, reqs: list[tuple[str, tuple[str, ...], float]]) -> list[set[str]]:
        """The renewals of a batch: one UPDATE per distinct lease length (one, in practice)."""
        assert self._wdb is not None
        db, now = self._wdb, time.time()
        held: set[tuple[str, str]] = set()
        by_lease: dict[float, list[tuple[str, str]]] = {}
        for session, msg_ids, lease_s in reqs:
            by_lease.setdefault(lease_s, []).extend((session, m) for m in msg_ids)
        for lease_s, pairs in by_lease.items():
            blob = orjson.dumps(pairs)
            if sql.NUL in blob:  # json_extract stops at a NUL: row by row (rare)
                for session, msg_id in pairs:
                    args = (now + lease_s, self.owner, session, msg_id)
                    got = db.execute(sql.SQL_RENEW_ONE, args)
                    held.update(got.fetchall())
            else:
                held.update(db.execute(sql.SQL_RENEW, (now + lease_s, self.owner, blob)).fetchall())
            self._commits += 1
        return [{m for m in msg_ids if (session, m) in held} for session, msg_ids, _ in reqs]

    def _append(
        self, reqs: list[tuple[str, str, str, str, str, float]]
    ) -> list[Appended | StoreError]:
        """Read the state of every (session, msg_id, role), plan in Python, write in one INSERT."""
        assert self._wdb is not None
        db, now = self._wdb, time.time()
        keys = [(s, m, "user" if k == "user" else "final") for s, m, k, _, _, _ in reqs]
        blob = orjson.dumps(keys)
        state: list[Any] = [None] * len(reqs)
        if sql.NUL in blob:
            state = [db.execute(sql.SQL_LOOKUP, (m, r, s)).fetchone() for s, m, r in keys]
        else:
            for k, *found in orjson.loads(db.execute(sql.SQL_STATE, (blob,)).fetchone()[0]):
                state[k] = found
        results: list[Appended | StoreError] = []
        rows: list[tuple[str, int, str, str, str, str, str, float]] = []
        last: dict[str, int] = {}  # session -> its highest seq in this batch
        seen: dict[tuple[str, str, str], int] = {}  # key -> seq given earlier in this batch
        for (session, msg_id, kind, text, meta, lease_s), key, got in zip(
            reqs, keys, state, strict=True
        ):
            if got is None or got[0] is None or got[1] + self.ttl < now:
                results.append(StoreError(f"unknown or expired session {_short(session)}"))
            elif (old := got[2] if got[2] is not None else seen.get(key)) is not None:
                results.append(Appended(old, True))
            else:
                seq = seen[key] = last[session] = last.get(session, got[0]) + 1
                # A new user message is leased to this store (contract 6); a final has none.
                lease = (self.owner, now + lease_s) if kind == "user" else ("", 0.0)
                rows.append((session, seq, kind, msg_id, text, meta, *lease))
                results.append(Appended(seq, False))
        if rows and sql.NUL in (blob := orjson.dumps(rows)):
            db.execute("BEGIN IMMEDIATE")  # rare: row by row, in one transaction
            try:
                db.executemany(sql.SQL_INSERT, [(*row, now) for row in rows])
                db.execute("COMMIT")
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")
        elif rows:
            db.execute(sql.SQL_INSERT_ALL, (now, blob))
        self._commits += bool(rows)
        return results

    async def _read(self, sql: str, *params: Any) -> Any:
        """The one row ``sql`` selects (a JSON array for the event lists), read off the loop."""
        if self._reader is None or self._closed:
            raise StoreError("the session store is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._reader, self._retrying, self._row, sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"session store read failed: {exc}") from exc

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

    def _record(self, elapsed_ms: float, rows: int) -> None:
        with self._stats_lock:
            self._rows += rows
            self._n_samples += 1
            if len(self._samples) < _RESERVOIR:
                self._samples.append(elapsed_ms)
            else:  # reservoir sampling (Vitter's R): a uniform sample of every batch
                j = random.randrange(self._n_samples)
                if j < _RESERVOIR:
                    self._samples[j] = elapsed_ms

    def statistics(self) -> StoreStats:
        """Write transactions committed, event rows stored (duplicates excluded), commit
        latency, busy retries.

        A commit's latency is its batch's, from the first statement (lock waits included) to
        the last commit; it excludes the ``window`` spent gathering the batch.
        """
        with self._stats_lock:
            samples = sorted(self._samples)
            commits, rows, busy = self._commits, self._rows, self._busy_retries

        def pct(q: float) -> float:
            return samples[min(len(samples) - 1, int(q * len(samples)))] if samples else 0.0

        return StoreStats(commits, rows, pct(0.50), pct(0.99), busy)
