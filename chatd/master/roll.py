"""A roll: replace the workers of some slots, one slot at a time, the new worker first.

The common path of a reload (new configuration and generation), its rollback, and an RSS
recycle (same configuration). For each slot, in order:

1. fork the new worker onto the slot's own listening socket, *next to* the old worker: two
   processes accepting on one SO_REUSEPORT socket is fine, and the socket's queue never waits
   for nobody;
2. wait for its ``ready`` (at most ``ready_timeout``); meanwhile the old worker keeps
   serving;
3. make it the slot's worker, and tell the old one to drain: it stops accepting, moves its
   open WebSockets to the new worker as each becomes idle (``[server] handoff``:
   :mod:`chatd.worker.mover`), or, without handoff, finishes the replies in flight (up to its
   ``graceful_timeout``) and closes its clients with 1001; then it exits
   (:meth:`chatd.master.workers.Workers.retire`).

The roll is done once every slot is done *and* every old worker has stopped accepting: it
acknowledged the drain (a worker acknowledges in the same step as it closes its listener) and,
when it moves its connections, said ``handoff_done`` (so the next roll never retires a worker
still adopting them, and the roll's log line says what moved), or exited, or was sent SIGTERM
(no acknowledgement within a second). Old workers may still be draining their replies then.

A new worker that exits, hangs (no heartbeat), cannot be forked, or is not ready in time fails
the roll at that slot: it is killed, the slot keeps (or gets back) a worker of its old
configuration, and :attr:`Roll.failure` says why in one sentence. Slots done before it stay
done; :attr:`Roll.switched` lists them with their previous configuration, for a rollback.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from chatd.config import Config
from chatd.master.supervision import Slot, Worker
from chatd.master.workers import Workers

log = logging.getLogger("chatd.master")

HANDOFF_WAIT = 5.0  # seconds a roll waits at most for an old worker's handoff_done


@dataclass(frozen=True, slots=True)
class Target:
    """Where one slot goes: the configuration and generation of its new worker."""

    slot: Slot
    cfg: Config
    generation: int


class Roll:
    """Drive the steps of the module docstring; call :meth:`step` on every loop iteration.

    Args:
        workers: the master's workers.
        targets: the slots to roll, in order (the first one is the canary).
        ready_timeout: seconds each new worker gets to report ``ready``.
        what: names the roll in log lines (``reload to generation 3``, ``RSS recycle``).
    """

    def __init__(
        self, workers: Workers, targets: list[Target], ready_timeout: float, what: str
    ) -> None:
        self.workers = workers
        self.what = what
        self.ready_timeout = ready_timeout
        self.done = False
        self.failure: str | None = None
        self.switched: list[Target] = []
        """The slots moved so far, each with its *previous* configuration and generation."""
        self._pending = list(targets)
        self._current: Target | None = None
        self._retired: list[Worker] = []
        self._deadline = 0.0

    def step(self, now: float) -> None:
        """Advance as far as possible without waiting."""
        while not self.done:
            current = self._current
            if current is None:
                if not self._pending:
                    self.done = not any(map(self._still_accepting, self._retired))
                    return
                self._start(self._pending.pop(0), now)
                continue
            slot = current.slot
            new = slot.incoming
            if new is None:  # it exited, timed out, or could not be forked
                self._fail(current, slot.incoming_failure or "went away before it was ready")
                return
            if new.state == "ready":
                self._promote(current)
                continue
            if now >= self._deadline:
                self.workers.abandon(new)
                self._fail(current, f"was not ready within {self.ready_timeout:g}s")
            return

    def abort(self) -> None:
        """Stop here (the master is stopping): the new worker being started is killed."""
        if self._current is not None and self._current.slot.incoming is not None:
            self.workers.abandon(self._current.slot.incoming)
        self.done = True

    def _start(self, target: Target, now: float) -> None:
        slot = target.slot
        if slot not in self.workers.slots:
            return  # removed meanwhile: nothing to roll
        # A crash-looping slot's pending respawn would race the new worker: the roll owns the
        # slot now (a failure below gives it back a worker).
        slot.respawn_at = None
        self._current = target
        self._deadline = now + self.ready_timeout
        self.workers.spawn(slot, incoming=True, cfg=target.cfg, generation=target.generation)

    def _promote(self, target: Target) -> None:
        slot = target.slot
        new = slot.incoming
        assert new is not None
        self.switched.append(Target(slot, slot.cfg, slot.generation))
        old = slot.worker
        slot.worker, slot.incoming = new, None
        slot.cfg, slot.generation = new.cfg, new.generation
        slot.boot_failures = 0
        if old is not None:
            self.workers.retire(old, f"{self.what}: replaced by pid {new.pid}", successor=new)
            self._retired.append(old)
        self._current = None

    def _still_accepting(self, old: Worker) -> bool:
        """Whether ``old`` may still take connections: it neither acknowledged its drain nor
        finished moving its connections to its successor (nor exited, nor was signalled). A
        handoff counts as finished after HANDOFF_WAIT at most: a client that never becomes
        movable (half a frame sent, then silence) must not hold every reload up."""
        gone = self.workers.by_pid.get(old.pid) is not old
        moving = old.handing_off and time.monotonic() - (old.drain_sent or 0.0) < HANDOFF_WAIT
        return not (gone or old.signalled or (old.drain_acked and not moving))

    def handoff_summary(self) -> str:
        """What the old workers' handoffs did, for the roll's log line ("" when none moved)."""
        reports = [w.handoff for w in self._retired if w.handoff]
        if not reports:
            return ""

        def total(key: str) -> int:
            return sum(int(r.get(key) or 0) for r in reports)

        slowest = max(float(r.get("ms") or 0) for r in reports)
        return (
            f"{total('moved')} open WebSockets moved to the new workers, "
            f"{total('fell_back')} closed with 1001 instead, in {slowest:.0f} ms"
        )

    def _fail(self, target: Target, why: str) -> None:
        slot = target.slot
        self.failure = f"the new worker of slot {slot.id} (generation {target.generation}) {why}"
        log.error("%s failed: %s", self.what, self.failure)
        self._current = None
        self.done = True
        # The slot must keep a worker of its own configuration: respawn one if it has none
        # (its old worker died meanwhile, or the slot was crash-looping).
        self.workers.ensure(slot)
