"""The SQLite store's writes, run on the worker's event loop (the design: chatd.store.sqlite).

:class:`LoopWrites` is the write half of :class:`~chatd.store.sqlite.SqliteStore`: the requests
queued in one event-loop tick become one batch, committed by one callback (``_flush``) on the
loop thread; a batch that finds the file locked is tried again from the loop a moment later.
The planning (``_create``, ``_append``, ...) reads the state of a batch's sessions in one
statement, assigns seqs in Python and writes with one statement per kind of request.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from chatd.errors import SessionGone, StoreError
from chatd.store import sqlite_sql as sql
from chatd.store.base import Appended, Event, Health
from chatd.store.sqlite_checkpoint import Checkpointer
from chatd.store.sqlite_gate import WriteGate
from chatd.store.sqlite_remote import WriterClient

_RESERVOIR = 4096  # commit latency samples kept (uniform over all batches since open)
_CONFLICTS = 8  # re-plans of a batch that keeps losing races before it is split up
_KNOWN_MAX = 100_000  # sessions whose last seq a store remembers from its own commits
# A batch that finds the file locked is tried again after a random pause in this range (s):
# short, since a writer holds the lock for about a millisecond. Once it has waited _LONG_WAIT,
# the lock is held for longer (a RESTART checkpoint, a backup, a forgotten transaction) and
# the pauses stretch to _LONG_PAUSE, so that each attempt's cost (a read and the planning, on
# the loop) stays a small share of the loop.
_PAUSE = (0.0002, 0.002)
_LONG_WAIT, _LONG_PAUSE = 0.1, 0.01


def is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED ("database is locked"): another connection holds the lock."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (5, 6)  # primary codes SQLITE_BUSY, SQLITE_LOCKED
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


def short(session: str) -> str:
    # A session id is a capability (it resumes the session): errors and logs show a prefix only.
    return session[:6] + "…"


class _Pending:
    """The result of a request not done yet (None is a result: nothing)."""


_PENDING = _Pending()


class _Request:
    """One queued write: ``op`` ("append", "create", ...), its arguments, the caller's future,
    and its ``result`` once done (a StoreError instance means it failed)."""

    __slots__ = ("args", "fut", "op", "result")

    def __init__(self, op: str, args: Sequence[Any], fut: asyncio.Future[Any]) -> None:
        self.op, self.args, self.fut = op, args, fut
        self.result: Any = _PENDING


class LoopWrites:
    """The write half of the SQLite store: batching on the loop, retries, planning, statistics.

    Uses the store's ``_wdb`` (the write connection, ``timeout=0``),
    ``_window``, ``_max_batch``, ``_lock_timeout``, ``_checkpointer`` and ``_closed``.
    """

    _wdb: sqlite3.Connection | None
    _window: float
    _max_batch: int
    _lock_timeout: float
    _checkpointer: Checkpointer | None
    _gate: WriteGate | None
    _closed: bool

    def _init_writes(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the writes run on
        # The host writer's client when this store's writes are the host writer's
        # (chatd.store.sqlite_host); None: they are committed here, on the loop.
        self._remote: WriterClient | None = None
        self._queue: list[_Request] = []  # FIFO; a retried batch's leftovers go back in front
        self._handle: asyncio.Handle | None = None  # the planned _flush, if any
        self._waited = False  # the lone request at the queue's head has had its window
        self._busy_since: float | None = None  # when the batch being retried first found a lock
        self._gating = False  # the gate was found held: the loop waits for it (sqlite_gate)
        self._gate_timer: asyncio.TimerHandle | None = None  # lock_timeout of that wait
        self._idle: list[asyncio.Future[None]] = []  # close() waiting for an empty queue
        # What this store's own commits say of its sessions: session -> (last_seq, updated_at).
        # A batch whose sessions are all here is planned without reading the file (the read
        # was a third of an append's cost); if another writer moved a session meanwhile, or a
        # message id is a duplicate, the file refuses the INSERT (the seq trigger, the UNIQUE
        # constraint), the batch's sessions are forgotten and it is planned again from a read.
        self._known: dict[str, tuple[int, float]] = {}
        # The counters are written on the loop, busy_retries also by the reader thread.
        self._stats_lock = threading.Lock()
        self._commits = self._rows = self._busy_retries = self._n_samples = 0
        self._samples: list[float] = []
        # Each kind of request, in the order a batch commits them: its planner and whether it
        # takes all of a batch's requests at once (one statement) or one by one.
        self._ops: dict[str, tuple[Callable[[list[Any]], list[Any]], bool]] = {
            "create": (self._create, True),
            "append": (self._append, True),
            "expire": (self._expire, True),
            "release": (self._release, False),  # before the claims: they may take them
            "claim": (self._claim, False),  # one UPDATE each: a claim done is never lost
            "renew": (self._renew, True),
            "probe": (self._probe, True),
        }
        self.health = Health()

    async def _write(self, op: str, *args: Any) -> Any:
        """Queue a write for this tick's batch; its result once committed. Call on the loop
        the store was opened on (not checked here: a lookup of the running loop is a system
        call on CPython 3.11, chatd.relay.pool.Pool.loop)."""
        remote = self._remote
        if remote is not None and self._closed:
            raise StoreError("the session store is not open")
        try:
            result = await (self.submit(op, args) if remote is None else remote.call(op, args))
        except StoreError as exc:
            self.health.failed(exc)
            raise
        self.health.ok()
        if remote is not None and isinstance(result, Appended) and not result.duplicate:
            with self._stats_lock:  # (committed here: _settle counts the local batches')
                self._rows += 1
        return result

    def submit(self, op: str, args: Sequence[Any]) -> asyncio.Future[Any]:
        """Queue a write for this tick's batch (on the store's loop); the future is resolved
        once it committed, or fails with a StoreError. ``append``, ``claim`` and ``renew``
        take the lease owner as their first argument (the host writer, chatd.store.sqlite_host,
        writes for every worker's store)."""
        loop = self._loop
        if loop is None or self._closed:
            raise StoreError("the session store is not open")
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Request(op, args, fut))
        if self._handle is None and not self._gating:  # the tick's first: commit at its end
            self._handle = loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        """On the loop: commit the queued requests (at most ``max_batch``) and resolve them."""
        self._handle = None
        loop, queue = self._loop, self._queue
        assert loop is not None
        if not queue:  # (the gate is held here after a wait whose requests all timed out)
            if self._gate is not None:
                self._gate.release()
            self._wake_idle()
            return
        lone = len(queue) == 1 and self._busy_since is None and not self._closed
        if lone and self._window > 0 and not self._waited:  # it waits one window for company
            self._waited = True
            self._handle = loop.call_later(self._window, self._flush)
            return
        self._waited = False
        gate = self._gate
        if gate is not None and not gate.held and not gate.try_acquire():
            self._wait_gate(gate)
            return
        try:
            self._flush_batch()
        finally:
            if gate is not None:
                gate.release()

    def _wait_gate(self, gate: WriteGate) -> None:
        """The gate is held (another worker's batch): the loop goes on and runs the batch when
        a release wakes it; the queued requests fail if it is not had within ``lock_timeout``."""
        loop = self._loop
        assert loop is not None
        now = time.monotonic()
        since = now if self._busy_since is None else self._busy_since
        self._busy_since, self._gating = since, True
        self._gate_timer = loop.call_later(
            max(0.0, since + self._lock_timeout - now), self._gate_timeout
        )
        gate.wait(loop, self._gate_open)

    def _gate_open(self) -> None:
        """On the loop, the gate held: the batch that waited for it (and what joined it)."""
        self._gating = False
        if self._gate_timer is not None:
            self._gate_timer.cancel()
            self._gate_timer = None
        self._flush()

    def _gate_timeout(self) -> None:
        """The gate was not had within ``lock_timeout``: the queued requests fail (the wait
        goes on, for the requests that come later, each with ``lock_timeout`` of its own)."""
        loop = self._loop
        assert loop is not None
        since = self._busy_since if self._busy_since is not None else time.monotonic()
        error = StoreError(
            "session store write failed: database is locked "
            f"(the write gate held for {time.monotonic() - since:.1f} s)"
        )
        batch, self._queue[:] = self._queue[:], []
        for req in batch:
            req.result = error
        self._settle(batch)
        self._busy_since = time.monotonic()
        self._gate_timer = loop.call_later(self._lock_timeout, self._gate_timeout)
        self._wake_idle()

    def _flush_batch(self) -> None:
        """On the loop, the gate held (if there is one): commit one batch and resolve it."""
        loop, queue = self._loop, self._queue
        assert loop is not None
        batch = queue[: self._max_batch]
        del queue[: self._max_batch]
        start = time.monotonic()
        busy = False
        try:
            self._run_batch(batch)
        except Exception as exc:
            if not (busy := is_busy(exc)):  # a bug: fail the batch rather than leave it waiting
                for req in batch:
                    if req.result is _PENDING:
                        req.result = StoreError(f"session store write failed: {exc!r}")
        end = time.monotonic()
        if busy:
            # Another connection holds the write lock. What committed before it is resolved
            # now; the rest goes back to the head of the queue (so every later request of its
            # sessions still commits after it) and is tried again, with whatever joined it.
            with self._stats_lock:
                self._busy_retries += 1
            since = start if self._busy_since is None else self._busy_since
            if end - since < self._lock_timeout:
                self._busy_since = since
                queue[:0] = [req for req in batch if req.result is _PENDING]
                self._settle(batch)
                longest = _PAUSE[1] if end - since < _LONG_WAIT else _LONG_PAUSE
                self._handle = loop.call_later(random.uniform(_PAUSE[0], longest), self._flush)
                self._committed()
                return
            error = StoreError(
                f"session store write failed: database is locked (for {end - since:.1f} s)"
            )
            for req in batch:
                if req.result is _PENDING:
                    req.result = error
        else:  # the batch's commit latency: its loop time, plus its lock waits if it was retried
            since = start if self._busy_since is None else self._busy_since
            self._record((end - since) * 1000.0)
        self._busy_since = None
        self._settle(batch)
        if queue:  # more than max_batch were queued: the rest after the loop's other callbacks
            self._handle = loop.call_soon(self._flush)
        else:
            self._wake_idle()
        self._committed()

    def _settle(self, batch: list[_Request]) -> None:
        """Resolve the done requests of ``batch``, in queue order (so a session's in seq order)."""
        rows = 0
        for req in batch:
            res = req.result
            if res is _PENDING:
                continue
            if isinstance(res, Appended) and not res.duplicate:
                rows += 1
            if req.fut.done():  # the caller was cancelled; its write may still have committed
                continue
            if isinstance(res, BaseException):
                req.fut.set_exception(res)
            else:
                req.fut.set_result(res)
        if rows:
            with self._stats_lock:
                self._rows += rows

    def _committed(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.committed(self._commits)

    def _wake_idle(self) -> None:
        waiters, self._idle = self._idle, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _drain(self) -> None:
        """Wait until every queued request is done (close(): the queue gets no new ones)."""
        while self._loop is not None and (self._queue or self._handle is not None):
            waiter = self._loop.create_future()
            self._idle.append(waiter)
            await waiter

    def _run_batch(self, batch: list[_Request]) -> None:
        """Each kind of request: one write transaction. Leaves every request done, or raises
        SQLITE_BUSY with the ones done so far done (their transactions committed)."""
        for op, (fn, together) in self._ops.items():
            todo = [req for req in batch if req.op == op and req.result is _PENDING]
            if together and todo:
                self._commit(fn, todo)
            else:
                for req in todo:
                    self._commit(fn, [req])

    def _commit(self, fn: Callable[[list[Any]], list[Any]], reqs: list[_Request]) -> None:
        """``fn`` on the requests' arguments: one write transaction, planned again after a lost
        race; if it fails otherwise, the requests are tried one by one and only the failing
        ones fail. SQLITE_BUSY is raised (the caller tries again later)."""
        conflicts = 0
        while True:
            try:
                results = fn([req.args for req in reqs])
            except sqlite3.IntegrityError:  # another process wrote first: plan again
                conflicts += 1
                if conflicts < _CONFLICTS:
                    continue
                error: Exception = StoreError("session store write kept conflicting")
            except Exception as exc:
                if is_busy(exc):
                    raise
                error = StoreError(f"session store write failed: {exc}")
            else:
                for req, res in zip(reqs, results, strict=True):
                    req.result = res
                return
            if len(reqs) == 1:
                reqs[0].result = error
                return
            for req in reqs:
                self._commit(fn, [req])
            return

    def _create(self, reqs: list[tuple[str]]) -> list[str]:
        assert self._wdb is not None
        ids = [secrets.token_urlsafe(16) for _ in reqs]  # a collision (2**-128) is a conflict
        now = time.time()
        rows = orjson.dumps([(sid, owner) for sid, (owner,) in zip(ids, reqs, strict=True)])
        self._wdb.execute(sql.SQL_CREATE_ALL, (now, rows))
        self._commits += 1
        for sid in ids:
            self._know(sid, 0, now)
        return ids

    def _probe(self, reqs: list[tuple[()]]) -> list[None]:
        """Write page 1 again (``user_version`` set to itself): a WAL frame, no session
        changed, so a full disk or a read-only file fails it like any write."""
        assert self._wdb is not None
        version = self._wdb.execute("PRAGMA user_version").fetchone()[0]
        self._wdb.execute(f"PRAGMA user_version = {int(version)}")
        return [None] * len(reqs)

    def _expire(self, reqs: list[tuple[int]]) -> list[int]:
        """One DELETE per distinct ``ttl`` (one, in practice: all the workers' config's)."""
        assert self._wdb is not None
        now = time.time()
        counts: list[int] = []
        done: set[int] = set()
        for (ttl,) in reqs:
            if ttl in done:
                counts.append(0)
                continue
            counts.append(self._wdb.execute(sql.SQL_EXPIRE, (now - ttl,)).rowcount)
            done.add(ttl)
            self._commits += 1
        return counts

    def _release(self, reqs: list[tuple[str]]) -> list[int]:
        """Each release: one UPDATE (its own transaction); the leases it made lapse."""
        assert self._wdb is not None
        counts = [self._wdb.execute(sql.SQL_RELEASE, (o, time.time())).rowcount for (o,) in reqs]
        self._commits += sum(map(bool, counts))
        return counts

    def _claim(self, reqs: list[tuple[str, str | None, float, int]]) -> list[list[Event]]:
        """Each claim: one UPDATE ... RETURNING (its own transaction)."""
        assert self._wdb is not None
        results: list[list[Event]] = []
        for owner, session, lease_s, limit in reqs:
            now = time.time()
            rows = self._wdb.execute(
                sql.SQL_CLAIM, (owner, now + lease_s, now, session, limit)
            ).fetchall()
            self._commits += bool(rows)
            events = [
                Event(seq, kind, msg_id, text, orjson.loads(meta), ts, sess)
                for sess, seq, kind, msg_id, text, meta, ts in rows
            ]
            events.sort(key=lambda e: (e.session, e.seq))
            results.append(events)
        return results

    def _renew(self, reqs: list[tuple[str, str, Sequence[str], float]]) -> list[set[str]]:
        """The renewals of a batch: one UPDATE per distinct (owner, lease length): one per
        worker, in practice; done again whole if a later one finds the file locked (a renewal
        is idempotent)."""
        assert self._wdb is not None
        db, now = self._wdb, time.time()
        # What each owner still holds: a message another owner claimed is renewed by that one,
        # and must not read as held by the first (the host writer renews for every worker).
        held: set[tuple[str, str, str]] = set()
        by_lease: dict[tuple[str, float], list[tuple[str, str]]] = {}
        for owner, session, msg_ids, lease_s in reqs:
            by_lease.setdefault((owner, lease_s), []).extend((session, m) for m in msg_ids)
        for (owner, lease_s), pairs in by_lease.items():
            blob = orjson.dumps(pairs)
            if sql.NUL in blob:  # json_extract stops at a NUL: row by row (rare)
                rows = []
                for session, msg_id in pairs:
                    args = (now + lease_s, owner, session, msg_id)
                    rows += db.execute(sql.SQL_RENEW_ONE, args).fetchall()
            else:
                rows = db.execute(sql.SQL_RENEW, (now + lease_s, owner, blob)).fetchall()
            held.update((owner, session, msg_id) for session, msg_id in rows)
            self._commits += 1
        return [
            {m for m in msg_ids if (owner, session, m) in held}
            for owner, session, msg_ids, _ in reqs
        ]

    def _append(
        self, reqs: list[tuple[str, int, str, str, str, str, str, float]]
    ) -> list[Appended | StoreError]:
        """Read the state of every (session, msg_id, role), plan in Python, write in one INSERT."""
        assert self._wdb is not None
        db, now = self._wdb, time.time()
        keys = [(s, m, "user" if k == "user" else "final") for _, _, s, m, k, _, _, _ in reqs]
        state: list[Any] = [None] * len(reqs)
        known = self._known
        ttls = [req[1] for req in reqs]
        if all(
            k[0] in known and known[k[0]][1] + t >= now for k, t in zip(keys, ttls, strict=True)
        ):
            # Optimistic: the seqs from this store's own commits, no duplicate assumed.
            state = [(*known[k[0]], None) for k in keys]
        elif sql.NUL in (blob := orjson.dumps(keys)):
            state = [db.execute(sql.SQL_LOOKUP, (m, r, s)).fetchone() for s, m, r in keys]
        else:
            for k, *found in orjson.loads(db.execute(sql.SQL_STATE, (blob,)).fetchone()[0]):
                state[k] = found
        results: list[Appended | StoreError] = []
        rows: list[tuple[str, int, str, str, str, str, str, float]] = []
        last: dict[str, int] = {}  # session -> its highest seq in this batch
        seen: dict[tuple[str, str, str], int] = {}  # key -> seq given earlier in this batch
        for (owner, ttl, session, msg_id, kind, text, meta, lease_s), key, got in zip(
            reqs, keys, state, strict=True
        ):
            if got is None or got[0] is None or got[1] + ttl < now:
                results.append(SessionGone(f"unknown or expired session {short(session)}"))
            elif (old := got[2] if got[2] is not None else seen.get(key)) is not None:
                results.append(Appended(old, True))
            else:
                seq = seen[key] = last[session] = last.get(session, got[0]) + 1
                # A new user message is leased to this store (contract 6); a final has none.
                lease = (owner, now + lease_s) if kind == "user" else ("", 0.0)
                rows.append((session, seq, kind, msg_id, text, meta, *lease))
                results.append(Appended(seq, False))
        try:
            if rows:  # one statement, one transaction; its rows as parameters
                db.execute(sql.insert_rows(len(rows)), [v for row in rows for v in (*row, now)])
        except sqlite3.IntegrityError:  # planned on stale knowledge: read the file next time
            for key in keys:
                known.pop(key[0], None)
            raise
        self._commits += bool(rows)
        for session, seq in last.items():
            self._know(session, seq, now)
        return results

    def _know(self, session: str, last_seq: int, updated_at: float) -> None:
        """Remember a session's state after a commit of this store (bounded: past
        ``_KNOWN_MAX`` sessions, everything is forgotten and read again as needed)."""
        if len(self._known) >= _KNOWN_MAX and session not in self._known:
            self._known.clear()
        self._known[session] = (last_seq, updated_at)

    def _record(self, elapsed_ms: float) -> None:
        with self._stats_lock:
            self._n_samples += 1
            if len(self._samples) < _RESERVOIR:
                self._samples.append(elapsed_ms)
            else:  # reservoir sampling (Vitter's R): a uniform sample of every batch
                j = random.randrange(self._n_samples)
                if j < _RESERVOIR:
                    self._samples[j] = elapsed_ms
