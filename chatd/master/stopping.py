"""Stopping workers: retiring (drain), abandoning (stop now), escalating, killing all.

Runs in the master's loop; nothing blocks but :func:`kill_all_and_reap` (bounded, at exit).

* A retired worker is told to drain; without an answer within DRAIN_ACK_TIMEOUT it gets
  SIGTERM, and SIGKILL if it is still there RETIRE_GRACE after its ``graceful_timeout``.
* An abandoned worker (hung, or an incoming one of a failed roll) gets SIGTERM, then SIGKILL
  after KILL_GRACE.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Any

from chatd.master.fork import kill_and_reap
from chatd.master.supervision import Slot, Worker
from chatd.proto import control as proto

log = logging.getLogger("chatd.master")

DRAIN_ACK_TIMEOUT = 1.0  # a worker that has not acknowledged `drain` by then also gets SIGTERM
RETIRE_GRACE = 5.0  # seconds past its graceful_timeout before a retired worker gets SIGKILL
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL for a hung or abandoned worker


def retire(worker: Worker, slot: Slot | None, why: str, successor: Worker | None = None) -> None:
    """Detach ``worker`` from its slot and make it drain (escalating, see the docstring);
    ``successor``: the worker its open WebSockets move to (``[server] handoff``)."""
    detach(worker, slot)
    now = time.monotonic()
    timeout = worker.cfg.server.graceful_timeout
    worker.state = "draining"
    worker.drain_sent = now
    worker.kill_at = now + timeout + RETIRE_GRACE
    log.info(
        "worker %d (pid %d, generation %d) retiring (%s): draining, up to %gs",
        *(worker.slot, worker.pid, worker.generation, why, timeout),
    )
    # handover: other workers go on serving, so the drainer sends late hellos there.
    drain: dict[str, Any] = {proto.T: proto.DRAIN, "timeout": timeout, "handover": True}
    if successor is not None:
        drain["successor"] = successor.pid
        worker.handing_off = True  # until its handoff_done (a roll waits for it)
    if not tell(worker, drain):
        kill(worker, signal.SIGTERM)


def abandon(worker: Worker, slot: Slot | None) -> None:
    """Detach ``worker`` and stop it now: SIGTERM, then SIGKILL after KILL_GRACE."""
    detach(worker, slot)
    worker.state = "stopping"
    worker.kill_at = time.monotonic() + KILL_GRACE
    kill(worker, signal.SIGTERM)


def detach(worker: Worker, slot: Slot | None) -> None:
    """Mark ``worker`` detached: it serves ``slot`` no more, as its worker or incoming one."""
    worker.detached = True
    if slot is not None and slot.worker is worker:
        slot.worker = None
    if slot is not None and slot.incoming is worker:
        slot.incoming = None


def escalate(worker: Worker, now: float) -> None:
    """Stop a detached worker harder when it is late: SIGTERM if it did not acknowledge
    ``drain`` within DRAIN_ACK_TIMEOUT, SIGKILL once past its ``kill_at``."""
    sent = worker.drain_sent
    unacked = sent is not None and not worker.drain_acked and not worker.signalled
    if unacked and sent is not None and now - sent > DRAIN_ACK_TIMEOUT:
        kill(worker, signal.SIGTERM)
    if worker.kill_at is not None and now >= worker.kill_at:
        log.warning(
            "worker %d (pid %d) is still running after it was told to stop; SIGKILL",
            *(worker.slot, worker.pid),
        )
        worker.kill_at = None
        kill(worker, signal.SIGKILL)


def tell(worker: Worker, msg: dict[str, Any]) -> bool:
    """Send ``msg`` over the worker's link; False when the link is gone."""
    return worker.link is not None and worker.link.send(msg)


def kill(worker: Worker, signum: int) -> None:
    """Send ``signum`` to the worker (an exited one is ignored: the reaper will see it)."""
    worker.signalled = True
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker.pid, signum)


def kill_all_and_reap(by_pid: dict[int, Worker], within: float) -> None:
    """SIGKILL every worker left and reap them, waiting at most ``within`` seconds."""
    for worker in list(by_pid.values()):
        kill(worker, signal.SIGKILL)
        if worker.link is not None:
            worker.link.close()
    left = kill_and_reap(set(by_pid), within)
    if left:
        log.error("workers did not exit after SIGKILL: %s", sorted(left))
    by_pid.clear()
