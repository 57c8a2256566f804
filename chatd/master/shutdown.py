"""Stopping the daemon's workers: a graceful stop (drain) or a fast one.

Graceful stop (SIGTERM, ``chatctl stop``), step by step; the master does 1 and 5:

1. The master stops replacing workers, ends the operation in progress (a reload's new worker
   is killed), tells systemd ``STOPPING=1``; its state becomes ``stopping`` (status works).
2. :meth:`Shutdown.begin` sends ``drain`` to every worker over its link (a worker without a
   link gets SIGTERM): each stops accepting, finishes its replies in flight, closes its
   clients with 1001 and exits.
3. :meth:`Shutdown.progress`: a worker that has not answered ``draining`` within
   DRAIN_ACK_TIMEOUT gets SIGTERM too. The workers are reaped as they exit, until none is
   left or ``graceful_timeout`` has passed.
4. SIGKILL the rest and reap them (waiting up to KILL_WAIT).
5. The master closes the listeners and the control socket (its file is removed); exit 0.

A fast stop (SIGINT, SIGQUIT) sends ``stop`` (SIGQUIT to a worker without a link), SIGKILLs
after FAST_STOP_GRACE, then steps 4 and 5. A fast stop may overtake a graceful one, not the
reverse.
"""

from __future__ import annotations

import logging
import signal

from chatd.master.stopping import DRAIN_ACK_TIMEOUT
from chatd.master.workers import Workers
from chatd.proto import control as proto

log = logging.getLogger("chatd.master")

FAST_STOP_GRACE = 2.0  # seconds a fast stop waits before SIGKILL
KILL_WAIT = 5.0  # seconds to wait for SIGKILLed workers to be reaped before giving up


class Shutdown:
    """Steps 2 to 4 of the module docstring, for the master's workers."""

    def __init__(self, workers: Workers) -> None:
        self.workers = workers
        self.mode: str | None = None  # None, "graceful" or "fast"
        self.deadline = 0.0
        self.killed = False  # step 4 was reached
        self.done = False

    def begin(self, *, graceful: bool, graceful_timeout: float, now: float) -> bool:
        """Start (or escalate to) a stop; False when it changes nothing (already stopping)."""
        if self.mode == "fast" or (self.mode and graceful):
            log.info("already stopping")
            return False
        self.mode = "graceful" if graceful else "fast"
        workers = self.workers
        workers.replacing = False
        for slot in workers.slots:
            slot.respawn_at = None
        if graceful:
            log.info(
                "graceful stop: draining %d workers (up to %gs)",
                *(len(workers.by_pid), graceful_timeout),
            )
            self.deadline = now + graceful_timeout
            for worker in workers.by_pid.values():
                worker.state = "draining"
                worker.drain_sent = now
                drain = {proto.T: proto.DRAIN, "timeout": graceful_timeout}
                if not workers.tell(worker, drain):
                    workers.kill(worker, signal.SIGTERM)
        else:
            log.info("fast stop: stopping %d workers", len(workers.by_pid))
            self.deadline = now + FAST_STOP_GRACE
            for worker in workers.by_pid.values():
                worker.drain_sent = None
                if not workers.tell(worker, {proto.T: proto.STOP}):
                    workers.kill(worker, signal.SIGQUIT)
        self.progress(now)
        return True

    def progress(self, now: float) -> None:
        """Escalate where due; :attr:`done` once no worker is left (or step 4 timed out)."""
        workers = self.workers
        if not workers.by_pid:
            self.done = True
            return
        for worker in workers.by_pid.values():
            sent = worker.drain_sent
            late = sent is not None and now - sent > DRAIN_ACK_TIMEOUT and not worker.drain_acked
            if late and not worker.signalled:
                workers.kill(worker, signal.SIGTERM)
        if now < self.deadline:
            return
        if not self.killed:
            log.warning(
                "workers still running at the deadline, killing: %s", sorted(workers.by_pid)
            )
            for worker in workers.by_pid.values():
                workers.kill(worker, signal.SIGKILL)
            self.killed = True
            self.deadline = now + KILL_WAIT
        else:
            self.done = True  # the master's cleanup reports the ones that would not die
