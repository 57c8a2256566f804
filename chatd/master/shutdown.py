"""Stopping the daemon's workers: a graceful stop (drain) or a fast one.

Graceful stop (SIGTERM, ``chatctl stop``), step by step; the master does 1 and 5:

1. The master ends the operation in progress (a reload's new worker is killed), tells
   systemd ``STOPPING=1``; its state becomes ``stopping`` (status works).
1a. With ``[server] shutdown_delay`` > 0, the pre-drain: :meth:`Shutdown.begin` sends
   ``predrain`` to every worker (and :meth:`Shutdown.progress` to each one started
   meanwhile): they answer 503 on ``/healthz`` and ``/readyz`` and go on serving everything
   else, for load balancers that probe the pods to take this one out before it drains. Dead
   workers are still replaced. After the delay, step 2.
2. The master stops replacing workers and sends ``drain`` to every worker over its link (a
   worker without a link gets SIGTERM): each stops accepting, finishes its replies in
   flight, closes its clients with 1001 and exits.
3. :meth:`Shutdown.progress`: a worker that has not answered ``draining`` within
   DRAIN_ACK_TIMEOUT gets SIGTERM too. The workers are reaped as they exit, until none is
   left or ``graceful_timeout`` has passed. Then a worker that never acknowledged the drain
   is SIGKILLed; those that did get EXIT_GRACE more: at their own ``graceful_timeout`` they
   stop the replies still running, hand their messages back and close their clients with
   1001, which a SIGKILL at the same instant would turn into 1006 (abnormal closure).
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
EXIT_GRACE = 3.0  # seconds past graceful_timeout for draining workers to close (1001) and exit
KILL_WAIT = 5.0  # seconds to wait for SIGKILLed workers to be reaped before giving up


class Shutdown:
    """Steps 2 to 4 of the module docstring, for the master's workers."""

    def __init__(self, workers: Workers) -> None:
        self.workers = workers
        self.mode: str | None = None  # None, "graceful" or "fast"
        self.deadline = 0.0  # the next step's time: the drain, the SIGKILL, giving up
        self.drain_at: float | None = None  # while pre-draining (step 1a): when to drain
        self.graceful_timeout = 0.0
        self._predrained: set[int] = set()  # pids told ``predrain``
        self.killed = False  # step 4 was reached
        self.overtime = False  # step 3's EXIT_GRACE was given
        self.done = False

    def begin(
        self, *, graceful: bool, graceful_timeout: float, now: float, delay: float = 0.0
    ) -> bool:
        """Start (or escalate to) a stop; False when it changes nothing (already stopping).

        ``delay`` (``shutdown_delay``, graceful only): seconds of pre-drain before the drain;
        ``graceful_timeout`` is counted from the drain, so the whole stop takes at most
        ``delay + graceful_timeout + KILL_WAIT``.
        """
        if self.mode == "fast" or (self.mode and graceful):
            log.info("already stopping")
            return False
        self.mode = "graceful" if graceful else "fast"
        self.graceful_timeout = graceful_timeout
        if graceful and delay > 0:
            log.info(
                "graceful stop: draining in %gs (shutdown_delay); /healthz and /readyz answer "
                "503 meanwhile",
                delay,
            )
            self.drain_at = self.deadline = now + delay
            self.progress(now)
            return True
        self.drain_at = None
        self._stop_workers(graceful, now)
        self.progress(now)
        return True

    def _stop_workers(self, graceful: bool, now: float) -> None:
        """Step 2 (drain) or the fast stop's order, to every worker."""
        graceful_timeout = self.graceful_timeout
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

    def progress(self, now: float) -> None:
        """Escalate where due; :attr:`done` once no worker is left (or step 4 timed out)."""
        workers = self.workers
        if self.drain_at is not None:  # step 1a: the pre-drain
            if now < self.drain_at:
                for worker in workers.by_pid.values():
                    told = worker.pid in self._predrained
                    if not told and workers.tell(worker, {proto.T: proto.PREDRAIN}):
                        self._predrained.add(worker.pid)
                return
            self.drain_at = None
            self._stop_workers(True, now)
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
        if self.mode == "graceful" and not self.overtime:
            self.overtime = True
            if any(w.drain_acked for w in workers.by_pid.values()):
                for worker in workers.by_pid.values():
                    if not worker.drain_acked:
                        log.warning(
                            "worker pid %d never acknowledged the drain, killing", worker.pid
                        )
                        workers.kill(worker, signal.SIGKILL)
                self.deadline = now + EXIT_GRACE
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
