"""WAL checkpoints of the SQLite store, off the event loop (see chatd.store.sqlite).

The store's write connection runs on the worker's event loop with ``wal_autocheckpoint = 0``:
a checkpoint copies pages into the database file and fsyncs it, which must not happen on the
loop. The :class:`Checkpointer` runs them instead in its own thread, on its own connection:

- **When**: about every ``pages / 2`` pages written to the WAL, as SQLite's own
  auto-checkpoint would (every 1000 pages by default), and at most ``interval`` s after a
  commit (so a quiet store is checkpointed soon after its last write). The loop cannot see the
  WAL's size, so the pages are counted in commits: each checkpoint reports the WAL's size, and
  the growth since the previous one over the commits made meanwhile gives the pages per commit
  (more under a heavier load, whose batches are larger; another process's writes count too).
- **PASSIVE** never waits for a reader or a writer, and two processes checkpointing at once is
  safe (one of them just finds nothing to do or reports busy): every worker process of a host
  runs its own checkpointer on the shared file.
- **Bounded WAL**: SQLite restarts the WAL from its beginning only when a write begins after
  a checkpoint copied *every* frame. The loop keeps committing while a PASSIVE runs, so a
  busy store may never catch up, and the WAL would grow without end. So when a PASSIVE leaves
  the WAL at ``pages`` or more, a RESTART follows: it takes the write lock (waiting
  ``busy_timeout`` at most, else it does no more than a PASSIVE), copies the rest and makes
  the next writer start the WAL over (``journal_size_limit`` then truncates the file). It
  holds the workers' write gate meanwhile (:mod:`chatd.store.sqlite_gate`; waiting 50 ms at
  most for it), so the writers it holds off for those few milliseconds wait for it in line,
  as behind another worker's batch, rather than retrying against SQLite's lock.
- **The WAL starts over here, not on a loop**: once a checkpoint has copied every frame, the
  next write starts the WAL from its beginning, and with ``synchronous = NORMAL`` that write
  fsyncs the new WAL header. So the checkpointer, holding the gate, makes that write itself
  (page 1 written again), and the fsync is its thread's, never a worker's event loop's.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from chatd.store.sqlite_gate import WriteGate

GATE_WAIT = 0.05  # s: the longest a RESTART waits for the workers' write gate
PASSIVE = "PRAGMA wal_checkpoint(PASSIVE)"
RESTART = "PRAGMA wal_checkpoint(RESTART)"


class Checkpointer:
    """Runs ``PRAGMA wal_checkpoint`` in a thread when commits make one due (module docstring).

    Driven from the event loop: :meth:`committed` after commits, :meth:`close` at the end. Its
    figures (read them on the loop): ``checkpoints`` run, ``restarts`` among them, ``failures``
    (a checkpoint that raised; the next one is tried all the same), ``wal_pages`` the WAL's
    size in pages as the last checkpoint found it, ``last_error``.
    """

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        *,
        pages: int = 1000,
        interval: float = 0.25,
        gate: Callable[[], WriteGate] | None = None,
    ) -> None:
        self._connect = connect
        self._open_gate = gate
        self._gate: WriteGate | None = None  # opened and used in the thread only
        self._pages = pages
        self._interval = interval
        self._every = 20  # commits between two checkpoints, until the first ones measure it
        self._db: sqlite3.Connection | None = None  # made and used in the thread only
        self._pool: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Future[tuple[int, int, bool]] | None = None
        self._started_at = self._measured_at = 0  # commit counts: last start, last measure
        self._commits = 0  # the latest commit count seen
        self._wal = 0  # the WAL's pages after the last checkpoint (0: it starts over)
        self.checkpoints = self.restarts = self.failures = self.wal_pages = 0
        self.last_error = ""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="chatd-store-checkpoint")

    def committed(self, commits: int) -> None:
        """On the loop: the store's commit count is now ``commits``; start or plan a checkpoint."""
        self._commits = commits
        if self._running is not None or commits == self._started_at or self._loop is None:
            return
        if commits - self._started_at >= self._every:
            self._start()
        elif self._timer is None:
            self._timer = self._loop.call_later(self._interval, self._start)

    def _later(self) -> None:
        """A checkpoint within ``interval`` s, if commits were made since the last one started."""
        if self._commits != self._started_at and self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(self._interval, self._start)

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._running is not None or self._loop is None or self._pool is None:
            return
        self._started_at = self._commits
        self._running = self._loop.run_in_executor(self._pool, self._checkpoint)
        self._running.add_done_callback(self._finished)

    def _checkpoint(self) -> tuple[int, int, bool]:
        """In the thread: a PASSIVE, then a RESTART if the WAL stayed large.

        Returns the WAL's pages, those not copied yet and whether a RESTART was done."""
        if self._db is None:
            self._db = self._connect()
        _, pages, copied = self._db.execute(PASSIVE).fetchone()
        restart = pages >= self._pages
        if not restart and not (pages and copied == pages):
            return pages, pages - copied, False
        # The workers wait for a RESTART at the gate rather than retrying against SQLite's
        # lock; a gate not had soon (a stuck holder) and the RESTART goes on without it, but
        # the start-over write does not (it would race the workers' batches).
        gate = self._take_gate()
        busy = 0
        try:
            if restart:
                busy, pages, copied = self._db.execute(RESTART).fetchone()
            if gate is not None and not busy:  # every frame copied: the WAL starts over
                self._start_over()
        finally:
            if gate is not None:
                gate.release()
        return pages, pages - copied, restart and not busy

    def _take_gate(self) -> WriteGate | None:
        """In the thread: the workers' write gate, held (waiting GATE_WAIT at most), or None."""
        if self._gate is None and self._open_gate is not None:
            try:
                self._gate = self._open_gate()
            except OSError:  # gone since the store opened it: the checkpoint goes on without
                self._open_gate = None
        gate = self._gate
        return gate if gate is not None and gate.acquire_within(GATE_WAIT) else None

    def _start_over(self) -> None:
        """In the thread, the gate held, every frame copied: be the writer that starts the WAL
        over (page 1 written again: ``user_version`` set to itself). With ``synchronous =
        NORMAL`` that writer fsyncs the new WAL header; left to a worker, the fsync stopped its
        event loop (py-spy --native: ``fdatasync`` under ``sqlite3WalFrames`` on the loop).
        A failure (the lock held by a process without the gate) leaves it to the next writer."""
        assert self._db is not None
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            self._db.execute(f"PRAGMA user_version = {int(version)}")
        except sqlite3.Error:
            self.last_error = "could not start the WAL over (the next writer does)"

    def _finished(self, fut: asyncio.Future[tuple[int, int, bool]]) -> None:
        self._running = None
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self.failures += 1
            self.last_error = repr(exc)
            self._later()
            return
        pages, _, restarted = fut.result()
        self.checkpoints += 1
        self.restarts += restarted
        self.wal_pages = pages
        self._measure(pages, restarted)
        if restarted:  # it copied all that was committed; the WAL starts over at the next write
            self._later()
        else:
            self.committed(self._commits)  # commits made meanwhile: the next may be due

    def _measure(self, pages: int, restarted: bool) -> None:
        """Pages per commit since the last checkpoint: the commits until the next one is due."""
        grown = pages - self._wal if pages >= self._wal else pages  # less: the WAL started over
        commits = self._started_at - self._measured_at
        if grown > 0 and commits > 0:
            self._every = max(1, min(1000, int(self._pages / 2 * commits / grown)))
        self._measured_at = self._started_at
        self._wal = 0 if restarted else pages

    async def close(self) -> None:
        """Cancel a planned checkpoint, wait for a running one, close the thread's connection."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None  # committed() plans nothing more
        if self._running is not None:
            await asyncio.wait([self._running])
        if self._pool is not None:
            pool, self._pool = self._pool, None
            if self._db is not None:
                await asyncio.wrap_future(pool.submit(self._db.close))
            if self._gate is not None:
                self._gate.close()
            await asyncio.to_thread(pool.shutdown, True)
