"""The host-wide write gate of the SQLite store: an ``flock`` every writer waits on in order.

SQLite takes its write lock without waiting (``busy_timeout`` 0 on the write connection: the
event loop must never block on it), so two workers writing one file used to find it held
about once in ten batches and tried again after a random pause (0.2-2 ms; shorter pauses were
measured worse: the retries spin against a holder the kernel may have preempted). Those pauses
were most of the slowest replies' time (docs/benchmarks.md, "Where the tail goes now").

The gate is taken before a batch and let go after it. A free gate costs two system calls
(``flock(LOCK_EX|LOCK_NB)``, ``flock(LOCK_UN)``); a held one is waited for by a thread, blocked
in the kernel, which wakes it the moment the holder lets go; the thread then asks the loop to
run the batch (``call_soon_threadsafe``). So the loop never waits, no attempt is wasted, and a
batch waits for the holder's batch only, not for a random pause.

``flock`` belongs to the open file description: each store opens the gate file itself, so two
stores in one process exclude each other too, and a process that dies (even SIGKILLed) lets go
of it with its descriptors. The checkpointer takes it too for a RESTART (which holds SQLite's
write lock for a checkpoint's copy and fsync), so the workers wait for that in line as well.
Another SQLite connection (a backup, the ``sqlite3`` shell) is still met by SQLite's own lock
and the store's retries.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import queue
import threading
import time
from collections.abc import Callable


def gate_path(db_path: str) -> str:
    """The gate file of the SQLite file ``db_path`` (beside it, as SQLite's -wal and -shm)."""
    return db_path + "-gate"


class WriteGate:
    """One store's handle on the host-wide write gate of a SQLite file (module docstring).

    Not thread-safe: the loop calls :meth:`try_acquire`, :meth:`release` and :meth:`wait`, one
    wait at a time; :meth:`wait`'s callback runs on the loop with the gate held.
    """

    def __init__(self, db_path: str) -> None:
        """Open (create) the gate file; OSError if it cannot be (the store then runs without)."""
        # Read-only is enough for flock, so a gate file made by another user still serves.
        self.path = gate_path(db_path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._waits: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, Callable[[], None]]]
        self._waits = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Between the loop and the waiter thread: whether a wait is in flight, and closed.
        self._mutex = threading.Lock()
        self._waiting = self._closed = False
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
        """Off the loop (a thread of the store's own): take the gate, waiting ``timeout`` s at
        most (polled every 0.5 ms: a blocking flock could not be given up)."""
        deadline = time.monotonic() + timeout
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.0005)
        return True

    def release(self) -> None:
        """Let the gate go (the next waiter, in this process or another, wakes at once)."""
        if self.held and not self._closed:
            self.held = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def wait(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        """Wait for the gate in a thread; then ``callback()`` on ``loop``, with the gate held.

        The callback must :meth:`release` it. A loop that is closed by then gets nothing, and
        the gate is let go.
        """
        self.waits += 1
        with self._mutex:
            self._waiting = True
        if self._thread is None:
            # A daemon: a worker exiting while another process holds the gate must not hang.
            self._thread = threading.Thread(
                target=self._waiter, name="chatd-store-gate", daemon=True
            )
            self._thread.start()
        self._waits.put((loop, callback))

    def _waiter(self) -> None:
        while True:
            loop, callback = self._waits.get()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            with self._mutex:
                self._waiting = False
                if self._closed:  # closed meanwhile: closing the file lets the gate go
                    os.close(self._fd)
                    return
                self.held = True
            try:
                loop.call_soon_threadsafe(callback)
            except RuntimeError:  # the loop is closed: nobody will run the batch
                self.release()

    def close(self) -> None:
        """Let go and close the file. A wait in flight keeps the file open until it ends (the
        descriptor is never closed under the waiting thread, whose number could be reused)."""
        with self._mutex:
            if self._closed:
                return
            self.release()
            self._closed = True
            if self._waiting:
                return
        os.close(self._fd)
