"""The master's workers: slots, fork, the child's first steps, reaping, replacing, retiring.

Runs inside the master's single-threaded selector loop (see :mod:`chatd.master.arbiter`); nothing
here blocks, and nothing uses asyncio. The records and the health rules are in
:mod:`chatd.master.supervision`.

A *slot* is a worker position with its own listening socket; it outlives the workers that serve
it. A slot has at most one *serving* worker (``slot.worker``) and, during a roll (reload, RSS
recycle), one *incoming* worker starting on the same socket (``slot.incoming``). Workers that
no longer serve a slot are *detached*: draining (retired) or being killed (hung, abandoned).

* A serving worker that dies, or is hung (no message for ``worker_timeout``: ``WORKER
  TIMEOUT``, SIGTERM, SIGKILL after KILL_GRACE), is replaced in its slot at once, with the same
  socket (the connections queued on it wait). Only a slot whose workers keep exiting before
  ``ready`` backs off (it is then ``crash-looping``); a worker killed after it became ready is
  replaced at once, however often.
* A retired worker is told to drain, and stopped harder if it does not
  (:mod:`chatd.master.stopping`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

import psutil

from chatd.config import Config
from chatd.master import stopping
from chatd.master.channel import Channel
from chatd.master.fork import MASTER_SIGNALS, fork_worker
from chatd.master.status import WorkerSnapshot
from chatd.master.supervision import (
    BOOT_FAILURES_BEFORE_BACKOFF,
    Slot,
    Worker,
    all_ready,
    describe_exit,
    sample,
    silent_for,
    status_rows,
)
from chatd.proto import control as proto
from chatd.spec import WorkerMain, WorkerSpec

log = logging.getLogger("chatd.master")

__all__ = ["MASTER_SIGNALS", "Slot", "Worker", "Workers", "describe_exit"]

SAMPLE_EVERY = 1.0  # seconds between CPU/RSS samples of the workers (psutil)
MAX_BACKOFF = 10.0  # seconds


class Workers:
    """Every slot and worker of one master.

    Args:
        cfg: the configuration the workers get.
        worker_main: the function a forked child runs (never returns).
        listeners: one listening socket per slot, in slot order.
        sel: the master's selector (the links register in it).
        close_master_fds: closes the master's own fds (control socket, wake-up pipe,
            selector) in a freshly forked child; this class closes the slots' and links'.
    """

    def __init__(
        self,
        cfg: Config,
        worker_main: WorkerMain,
        listeners: list[socket.socket],
        sel: selectors.BaseSelector,
        close_master_fds: Callable[[], None],
    ) -> None:
        self.cfg = cfg
        self.generation = 1
        self.slots = [
            Slot(id=i + 1, listener=s, cfg=cfg, generation=1) for i, s in enumerate(listeners)
        ]
        self.by_pid: dict[int, Worker] = {}
        self.restarts_total = 0
        self.retired: dict[str, float] = {
            "messages_total": 0,
            "errors_total": 0,
            **dict.fromkeys(proto.HANDOFF_KEYS, 0),
        }
        """Counters of exited workers (their last report), so daemon totals never go down."""
        self.replacing = True  # False once the master stops: exits are then final
        self.on_all_ready: Callable[[], None] = lambda: None
        self.handlers: dict[str, Callable[[Worker, dict[str, Any]], None]] = {}
        """Handlers of further message types from workers (LLM slots, metrics:
        chatd.master.services)."""
        self.on_exit: list[Callable[[Worker], None]] = []
        """Called with each worker reaped, its ``exit_code`` set (chatd.master.services takes
        its LLM slots back, chatd.master.takeover has its leases released)."""
        self.on_spawn: list[Callable[[Worker], None]] = []
        """Called with each worker forked, its link open (chatd.master.services sends it the
        addresses of the dns tables before any other message)."""
        self.on_other_exit: Callable[[int, int], bool] = lambda pid, status: False
        """Called with (pid, wait status) of a reaped child that is no worker; True if it was
        known (chatd.master.storewriter: the store writer)."""
        self.store_writer: tuple[str, str] | None = None
        """The host's SQLite writer (path, address) the workers' specs get, if there is one."""
        self._worker_main = worker_main
        self._sel = sel
        self._close_master_fds = close_master_fds
        self._reap_soon = False
        self._next_sample = 0.0

    # -- the loop's hooks ----------------------------------------------------------------------

    def timeout(self, now: float, longest: float) -> float:
        """How long the master's loop may sleep before :meth:`tick` has something to do."""
        if self._reap_soon:
            return 0.0
        due = [s.respawn_at - now for s in self.slots if s.respawn_at is not None]
        due += [w.kill_at - now for w in self.by_pid.values() if w.kill_at is not None]
        return max(0.0, min([longest, self._next_sample - now, *due]))

    def tick(self, now: float) -> None:
        """Reap after a link EOF, respawn backed-off slots that are due, escalate on detached
        workers, kill hung ones, sample CPU and RSS."""
        if self._reap_soon:
            self._reap_soon = False
            self.reap()
        for slot in self.slots:
            if slot.respawn_at is not None and now >= slot.respawn_at and self.replacing:
                slot.respawn_at = None
                if slot.worker is None and slot.incoming is None:
                    self.spawn(slot)
        for worker in list(self.by_pid.values()):
            if worker.detached:
                stopping.escalate(worker, now)
            elif self.replacing and not worker.signalled:
                silent = silent_for(worker, now)
                if silent > worker.cfg.server.worker_timeout:
                    self._timed_out(worker, silent)
        if now >= self._next_sample:
            self._next_sample = now + SAMPLE_EVERY
            for worker in self.by_pid.values():
                sample(worker, now)

    # -- fork ----------------------------------------------------------------------------------

    def spawn(
        self,
        slot: Slot,
        *,
        incoming: bool = False,
        cfg: Config | None = None,
        generation: int | None = None,
    ) -> Worker | None:
        """Fork a worker into ``slot`` (with the slot's config and generation unless given).

        With ``incoming`` it becomes ``slot.incoming`` (the slot's current worker keeps
        serving) and a failed fork returns None with ``slot.incoming_failure`` set; otherwise
        it becomes ``slot.worker`` and a failed fork is retried in a second.
        """
        cfg = cfg or slot.cfg
        generation = generation or slot.generation
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        spec = WorkerSpec(cfg, slot.id, generation, slot.listener, theirs, self.store_writer)
        try:
            pid = fork_worker(spec, self._worker_main, lambda: self._close_in_child(spec, ours))
        except OSError as exc:
            ours.close()
            theirs.close()
            if incoming:
                slot.incoming_failure = f"could not be forked: {exc}"
                return None
            log.error("cannot fork worker %d: %s; retrying in 1s", slot.id, exc)
            slot.respawn_at = time.monotonic() + 1.0
            return None
        theirs.close()
        worker = Worker(
            slot=slot.id, pid=pid, generation=generation, cfg=cfg, started=time.monotonic()
        )
        worker.link = Channel(
            self._sel,
            ours,
            name=f"worker {slot.id} link",
            on_message=lambda _, msg: self._on_message(worker, msg),
            on_close=lambda _: self._on_link_closed(worker),
        )
        with contextlib.suppress(psutil.Error):  # already gone: the reaper will see it
            worker.proc = psutil.Process(pid)
        if incoming:
            slot.incoming, slot.incoming_failure = worker, None
        else:
            slot.worker = worker
        self.by_pid[pid] = worker
        log.info("worker %d (pid %d) started, generation %d", slot.id, pid, generation)
        for hook in self.on_spawn:
            hook(worker)
        return worker

    def _close_in_child(self, spec: WorkerSpec, master_end: socket.socket) -> None:
        """In a freshly forked worker: close every fd of the master's but its own socket."""
        master_end.close()
        for slot in self.slots:
            if slot.listener is not spec.listener:
                slot.listener.close()
        for worker in self.by_pid.values():
            if worker.link is not None:
                worker.link.close_in_child()
        self._close_master_fds()

    def close_all_in_child(self) -> None:
        """In a freshly forked child that is no worker (the store writer): close every fd of
        the master's, every slot's listener and link included."""
        for slot in self.slots:
            slot.listener.close()
        for worker in self.by_pid.values():
            if worker.link is not None:
                worker.link.close_in_child()
        self._close_master_fds()

    # -- reap ----------------------------------------------------------------------------------

    def reap(self) -> None:
        """Collect every exited child (unknown ones too) and replace the workers among them."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.by_pid.pop(pid, None)
            if worker is None:
                if self.on_other_exit(pid, status):
                    continue
                log.debug("reaped child %d, not a worker: %s", pid, describe_exit(status))
                continue
            self._exited(worker, status)

    def _exited(self, worker: Worker, status: int) -> None:
        slot = self.slot_of(worker)
        worker.exit_code = os.waitstatus_to_exitcode(status)  # for the on_exit hooks
        if worker.link is not None:
            worker.link.read_remaining()  # its last report, written just before it exited
        if worker.link is not None:  # (reading to the end may have closed it)
            worker.link.close()
        for hook in self.on_exit:
            hook(worker)
        for key in self.retired:
            value = worker.stats.get(key, 0)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.retired[key] += value
        how = describe_exit(status)
        if slot is not None and slot.incoming is worker:
            slot.incoming = None
            slot.incoming_failure = f"{how} before it was ready"
            log.warning(
                "new worker %d (pid %d, generation %d) %s before it was ready",
                *(worker.slot, worker.pid, worker.generation, how),
            )
            return
        if slot is not None and slot.worker is worker:
            slot.worker = None
            if self.replacing:
                self._lost(slot, worker, how, booted=worker.state != "starting")
                return
        log.info(
            "worker %d (pid %d, generation %d) %s", worker.slot, worker.pid, worker.generation, how
        )

    def _lost(self, slot: Slot, worker: Worker, how: str, *, booted: bool) -> None:
        """``slot`` lost its serving worker (exit or timeout): replace it, or back off."""
        slot.restarts += 1
        self.restarts_total += 1
        slot.boot_failures = 0 if booted else slot.boot_failures + 1
        if slot.incoming is not None:
            log.warning(
                "worker %d (pid %d) %s; its successor (pid %d) is starting",
                *(worker.slot, worker.pid, how, slot.incoming.pid),
            )
            return
        excess = slot.boot_failures - BOOT_FAILURES_BEFORE_BACKOFF
        if excess < 0:
            log.warning("worker %d (pid %d) %s; replacing it", worker.slot, worker.pid, how)
            self.spawn(slot)
            return
        delay = min(MAX_BACKOFF, 0.5 * 2.0**excess)
        log.error(
            "worker %d (pid %d) %s before it was ready, %d times in a row; next try in %.1fs",
            *(worker.slot, worker.pid, how, slot.boot_failures, delay),
        )
        slot.respawn_at = time.monotonic() + delay

    def _on_link_closed(self, worker: Worker) -> None:
        worker.link = None
        # EOF usually means the worker is exiting: reap at the end of this loop iteration
        # (not from here: that would re-enter the reaper from its own link.close()).
        self._reap_soon = True

    def _timed_out(self, worker: Worker, silent: float) -> None:
        """A worker that has not spoken for ``worker_timeout``: kill it, replace it."""
        slot = self.slot_of(worker)
        limit = worker.cfg.server.worker_timeout
        log.error(
            "WORKER TIMEOUT (pid %d): worker %d sent nothing for %.1fs (worker_timeout %gs); "
            "killing it",
            *(worker.pid, worker.slot, silent, limit),
        )
        booted = worker.state != "starting"
        serving = slot is not None and slot.worker is worker
        incoming = slot is not None and slot.incoming is worker
        self.abandon(worker)  # detaches it from the slot
        if slot is not None and incoming:
            slot.incoming_failure = (
                f"sent no heartbeat for {silent:.1f}s (worker_timeout {limit:g}s)"
            )
        elif slot is not None and serving:
            self._lost(slot, worker, "timed out", booted=booted)

    # -- messages ------------------------------------------------------------------------------

    def _on_message(self, worker: Worker, msg: dict[str, Any]) -> None:
        worker.last_heard = time.monotonic()
        kind = msg.get(proto.T)
        if kind == proto.STATS:
            worker.stats = msg
        elif kind == proto.READY:
            if self.by_pid.get(worker.pid) is worker:  # not the last words of a dead one
                self._ready(worker)
        elif kind == proto.DRAINING:
            worker.state = "draining"
            worker.drain_acked = True
        elif kind == proto.HANDOFF_DONE:
            worker.handing_off = False
            # Numbers only (a bad report must not break the master's loop or its log line).
            worker.handoff = {k: v for k, v in msg.items() if _is_number(v)}
            for result in ("moved", "fell_back", "deferred"):  # its final counts
                key = f"handoff_{result}_total"
                value = _number_or_0(worker.handoff.get(result))
                worker.stats[key] = max(_number_or_0(worker.stats.get(key)), value)
        elif kind == proto.HELLO:
            if msg.get("pid") != worker.pid or msg.get("slot") != worker.slot:
                log.warning("worker %d (pid %d): unexpected hello %r", worker.slot, worker.pid, msg)
        elif isinstance(kind, str) and kind in self.handlers:
            self.handlers[kind](worker, msg)
        else:
            log.debug("worker %d: ignoring message %r", worker.slot, kind)

    def _ready(self, worker: Worker) -> None:
        if worker.state != "starting":
            return
        worker.state = "ready"
        slot = self.slot_of(worker)
        ms = (time.monotonic() - worker.started) * 1000
        if slot is not None and slot.incoming is worker:
            log.info(
                "new worker %d (pid %d, generation %d) ready in %.0f ms",
                *(worker.slot, worker.pid, worker.generation, ms),
            )
            return
        if slot is None or slot.worker is not worker:
            return
        slot.boot_failures = 0
        log.info("worker %d (pid %d) ready in %.0f ms", worker.slot, worker.pid, ms)
        if self.all_ready():
            self.on_all_ready()

    # -- orders --------------------------------------------------------------------------------

    def retire(self, worker: Worker, why: str, successor: Worker | None = None) -> None:
        """Detach ``worker`` from its slot and make it drain (:func:`stopping.retire`), its
        open WebSockets moving to ``successor`` when given."""
        stopping.retire(worker, self.slot_of(worker), why, successor)

    def least_loaded(self, among: int | None = None) -> Worker | None:
        """The ready worker of the first ``among`` slots (default all) with the fewest open
        connections (its last report), or None."""
        slots = self.slots[:among] if among is not None else self.slots
        ready = [s.worker for s in slots if s.worker is not None and s.worker.state == "ready"]
        return min(ready, key=lambda w: w.stats.get("connections") or 0, default=None)

    def helper(self, turn: int) -> Worker | None:
        """A worker to do some I/O for the master (resolve a name, renew the fleet's slots):
        the ``turn``-th ready one in pid order; else one still starting (the first answer at
        start); else a draining one (a stop drains them all, and their replies in progress
        still need the fleet's slots renewed); None when no worker has a link."""
        linked = [w for w in self.by_pid.values() if w.link is not None]
        serving = [w for w in linked if not w.detached and w.state in ("ready", "starting")]
        ready = [w for w in serving if w.state == "ready"] or serving or linked
        if not ready:
            return None
        return sorted(ready, key=lambda w: w.pid)[turn % len(ready)]

    def abandon(self, worker: Worker) -> None:
        """Detach ``worker`` and stop it now (:func:`stopping.abandon`)."""
        stopping.abandon(worker, self.slot_of(worker))

    tell = staticmethod(stopping.tell)
    kill = staticmethod(stopping.kill)

    def kill_all_and_reap(self, within: float) -> None:
        """SIGKILL every worker left and reap them, waiting at most ``within`` seconds."""
        stopping.kill_all_and_reap(self.by_pid, within)

    def ensure(self, slot: Slot) -> None:
        """Make sure ``slot`` gets a serving worker (after a failed roll, for example)."""
        if (
            self.replacing
            and slot in self.slots
            and slot.worker is None
            and slot.incoming is None
            and slot.respawn_at is None
        ):
            self.spawn(slot)

    def close(self) -> None:
        """Close every slot's listener (the master is exiting)."""
        for slot in self.slots:
            slot.listener.close()

    # -- views ---------------------------------------------------------------------------------

    def slot_of(self, worker: Worker) -> Slot | None:
        """The slot ``worker`` belongs to, if the slot still exists."""
        index = worker.slot - 1
        return self.slots[index] if 0 <= index < len(self.slots) else None

    def all_ready(self) -> bool:
        """Every slot has a serving worker, and each is ready."""
        return all_ready(self.slots)

    def snapshots(self, now: float) -> tuple[list[WorkerSnapshot], list[WorkerSnapshot]]:
        """Status rows: one per slot (its serving worker), then the other workers."""
        return status_rows(self.slots, self.by_pid.values(), now)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number_or_0(value: Any) -> float:
    return float(value) if _is_number(value) else 0.0
