"""The host-wide write gate of the SQLite store: an ``flock`` the workers take in turn.

SQLite takes its write lock without waiting (``busy_timeout`` 0 on the write connection: the
event loop must never block on it), so two workers writing one file used to find it held
about once in ten batches and tried again after a random pause (0.2-2 ms; shorter pauses were
measured worse: the retries spin against a holder the kernel may have preempted). Those pauses
were most of the slowest replies' time (docs/benchmarks.md, "Where the tail goes now").

The gate is taken before a batch and let go after it: ``flock(LOCK_EX|LOCK_NB)`` on
``PATH-gate``, ``flock(LOCK_UN)`` then one byte written to the FIFO ``PATH-wake``. A store that
finds the gate held watches that FIFO from its event loop (``add_reader``) and tries again when
a byte comes, so its batch runs the moment the holder lets go, on the loop, which never waits
and makes no attempt in vain. No byte is lost to a race: a waiter empties the FIFO *before*
its last try, so a release after that try always leaves it a byte.

Why not a thread blocked in ``flock(LOCK_EX)``: measured, it was worse than no gate at all at
saturation (closed loop: 1,886 against 2,272 replies/s). The thread got the gate, then waited
for the GIL (up to the 5 ms switch interval, the loop thread being busy) and for the loop to
run its callback, holding the gate all along while the other worker, with a batch ready,
waited. Here a gate is held only by a loop that is running the batch.

``flock`` belongs to the open file description: each store opens the gate file itself, so two
stores in one process exclude each other too, and a process that dies (even SIGKILLed) lets go
of it with its descriptors. Such a release writes no byte, so a waiter also tries again every
:data:`RETRY_S` seconds whatever comes. The checkpointer takes the gate
too (:meth:`WriteGate.acquire_within`, from its thread), for a RESTART and for starting the WAL
over. Another SQLite connection (a backup, the ``sqlite3`` shell) is still met by SQLite's own
lock and the store's retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import stat
import time
from collections.abc import Callable

RETRY_S = 0.05  # a waiter tries again this often even without a byte (a killed holder)
_DRAIN = 65536  # bytes read at once from the FIFO: all it holds (its default capacity)


def gate_path(db_path: str) -> str:
    """The gate file of the SQLite file ``db_path`` (beside it, as SQLite's -wal and -shm)."""
    return db_path + "-gate"


def wake_path(db_path: str) -> str:
    """The FIFO a release writes a byte to, for the stores waiting for the gate."""
    return db_path + "-wake"


class WriteGate:
    """One store's handle on the host-wide write gate of a SQLite file (module docstring).

    Not thread-safe: a store's loop calls :meth:`try_acquire`, :meth:`release`, :meth:`wait`
    (one wait at a time) and :meth:`close`; the checkpointer's thread has a gate of its own.
    """

    def __init__(self, db_path: str) -> None:
        """Open (create) the gate file and the FIFO; OSError if either cannot be (the store
        then runs without a gate)."""
        self.path = gate_path(db_path)
        wake = wake_path(db_path)
        with contextlib.suppress(FileExistsError):  # another worker made it first
            os.mkfifo(wake, 0o600)
        if not stat.S_ISFIFO(os.stat(wake).st_mode):
            raise OSError(f"{wake} is not a FIFO")
        # Read-only is enough for flock, so a gate file made by another user still serves;
        # O_RDWR on a FIFO opens without waiting for the other end (Linux), and keeps one.
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._wake = os.open(wake, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            os.close(self._fd)
            raise
        self._loop: asyncio.AbstractEventLoop | None = None
        self._callback: Callable[[], None] | None = None  # the wait in progress, if any
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        self.held = False
        self.waits = 0  # times the gate was found held and waited for

    def try_acquire(self) -> bool:
        """Take the gate if it is free, without waiting."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held = True
        return True

    def acquire_within(self, timeout: float) -> bool:
        """Off the loop (the checkpointer's thread): take the gate, waiting ``timeout`` s at
        most (polled every 0.5 ms: a blocking flock could not be given up)."""
        deadline = time.monotonic() + timeout
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.0005)
        return True

    def release(self) -> None:
        """Let the gate go, and wake whoever waits for it (in this process or another)."""
        if self.held and not self._closed:
            self.held = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            # Full (nobody waited for a while): the waiters empty it before waiting anyway.
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake, b"\0")

    def wait(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        """From ``loop``: ``callback()`` on it, with the gate held, as soon as it is had.

        The callback must :meth:`release` it. Never calls back within this call."""
        self.waits += 1
        self._loop, self._callback = loop, callback
        loop.add_reader(self._wake, self._try)
        self._retry = loop.call_later(RETRY_S, self._try)

    def _try(self) -> None:
        callback, loop = self._callback, self._loop
        if callback is None or loop is None:
            return
        self._drain()  # first: a release after the try below leaves a byte
        if self._retry is not None:
            self._retry.cancel()
        if not self.try_acquire():
            self._retry = loop.call_later(RETRY_S, self._try)
            return
        self._stop_waiting()
        callback()

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while len(os.read(self._wake, _DRAIN)) == _DRAIN:
                pass

    def _stop_waiting(self) -> None:
        if self._loop is not None and self._callback is not None:
            self._loop.remove_reader(self._wake)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._callback = None

    def close(self) -> None:
        """Stop a wait in progress, let go, close the files (from the loop, or from the thread
        that used :meth:`acquire_within`)."""
        if self._closed:
            return
        self._stop_waiting()
        self.release()
        self._closed = True
        os.close(self._wake)
        os.close(self._fd)
