"""The master's workers: slots, fork, the child's first steps, reaping, replacing, reports.

Runs inside the master's single-threaded selector loop (see :mod:`chatd.master`); nothing here
blocks, and nothing uses asyncio.

A *slot* is a worker position with its own listening socket; it outlives the workers that serve
it. A worker that dies is replaced in its slot at once, with the same socket (the connections
queued on it wait). Only a slot whose workers keep exiting before ``ready`` backs off (it is then
``crash-looping``): a worker killed after it became ready is replaced at once, however often.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import setproctitle

from chatd.config import Config
from chatd.control import Channel
from chatd.logs import flush_logging, set_role
from chatd.proto import control as proto
from chatd.spec import WorkerMain, WorkerSpec
from chatd.status import WorkerSnapshot

log = logging.getLogger("chatd.master")

MASTER_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGCHLD,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
)
"""The signals the master handles: blocked across fork, back to their defaults in the child."""

SAMPLE_EVERY = 1.0  # seconds between CPU/RSS samples of the workers (psutil)
BOOT_FAILURES_BEFORE_BACKOFF = 3  # exits before `ready` in a row that make a slot crash-looping
MAX_BACKOFF = 10.0  # seconds


@dataclass(eq=False)
class Worker:
    """One worker process, as the master knows it."""

    slot: int
    pid: int
    generation: int
    started: float  # monotonic
    link: Channel | None = None
    state: str = "starting"  # starting -> ready -> draining
    stats: dict[str, Any] = field(default_factory=dict)  # its last `stats` message
    proc: psutil.Process | None = None
    rss: int = 0
    cpu: float = 0.0
    last_heard: float | None = None  # monotonic time of its last message
    drain_sent: float | None = None
    drain_acked: bool = False
    signalled: bool = False  # a stop signal (fallback or escalation) was sent


@dataclass(eq=False)
class Slot:
    """A worker position: its socket outlives the workers that serve it."""

    id: int  # 1-based
    listener: socket.socket
    worker: Worker | None = None
    restarts: int = 0
    boot_failures: int = 0  # workers in a row that exited before `ready`
    respawn_at: float | None = None  # set while a crash-looping slot backs off


def describe_exit(status: int) -> str:
    """``exited with code 1`` or ``killed by signal 9 (SIGKILL)``, from a wait status."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown"
    return f"killed by signal {-code} ({name})"


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
        self.slots = [Slot(id=i + 1, listener=s) for i, s in enumerate(listeners)]
        self.by_pid: dict[int, Worker] = {}
        self.restarts_total = 0
        self.retired: dict[str, float] = {"messages_total": 0, "errors_total": 0}
        """Counters of exited workers (their last report), so daemon totals never go down."""
        self.replacing = True  # False once the master stops: exits are then final
        self.on_all_ready: Callable[[], None] = lambda: None
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
        return max(0.0, min([longest, self._next_sample - now, *due]))

    def tick(self, now: float) -> None:
        """Reap after a link EOF, respawn backed-off slots that are due, sample CPU and RSS."""
        if self._reap_soon:
            self._reap_soon = False
            self.reap()
        for slot in self.slots:
            if slot.respawn_at is not None and now >= slot.respawn_at and self.replacing:
                slot.respawn_at = None
                self.spawn(slot)
        if now >= self._next_sample:
            self._next_sample = now + SAMPLE_EVERY
            self._sample()

    # -- fork ----------------------------------------------------------------------------------

    def spawn(self, slot: Slot) -> None:
        """Fork a worker into ``slot``; if the fork fails, try again in a second."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        spec = WorkerSpec(self.cfg, slot.id, self.generation, slot.listener, theirs)
        # Block the master's signals across the fork: the child must never run its handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
            ours.close()
            theirs.close()
            log.error("cannot fork worker %d: %s; retrying in 1s", slot.id, exc)
            slot.respawn_at = time.monotonic() + 1.0
            return
        if pid == 0:
            self._become_worker(spec, ours)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
        theirs.close()
        worker = Worker(slot=slot.id, pid=pid, generation=self.generation, started=time.monotonic())
        worker.link = Channel(
            self._sel,
            ours,
            name=f"worker {slot.id} link",
            on_message=lambda _, msg: self._on_message(worker, msg),
            on_close=lambda _: self._on_link_closed(worker),
        )
        with contextlib.suppress(psutil.Error):  # already gone: the reaper will see it
            worker.proc = psutil.Process(pid)
        slot.worker = worker
        self.by_pid[pid] = worker
        log.info("worker %d (pid %d) started, generation %d", slot.id, pid, self.generation)

    def _become_worker(self, spec: WorkerSpec, master_end: socket.socket) -> None:
        """In the child: shed the master's state and run the worker. Never returns."""
        code = 1
        try:
            # 1. Python's default signal dispositions, then let pending signals in.
            signal.set_wakeup_fd(-1)
            for signum in MASTER_SIGNALS:
                default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
                signal.signal(signum, default)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
            # 2. Close every fd of the master's. Our link's other end above all: while we hold
            #    it, the master's death would not show as EOF.
            master_end.close()
            for slot in self.slots:
                if slot.listener is not spec.listener:
                    slot.listener.close()
            for worker in self.by_pid.values():
                if worker.link is not None:
                    worker.link.close_in_child()
            self._close_master_fds()
            # 3. Name the process and its log lines, then hand over.
            set_role(f"worker {spec.slot}")
            setproctitle.setproctitle(f"chatd: worker {spec.slot} gen {spec.generation}")
            self._worker_main(spec)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except KeyboardInterrupt:
            code = 128 + signal.SIGINT
        except BaseException:
            log.exception("worker %d crashed", spec.slot)
        finally:
            # Never unwind into the master's code: its `finally` would clean up *its* state.
            flush_logging()
            os._exit(code)

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
                log.debug("reaped child %d, not a worker: %s", pid, describe_exit(status))
                continue
            self._exited(worker, status)

    def _exited(self, worker: Worker, status: int) -> None:
        slot = self.slots[worker.slot - 1]
        if slot.worker is worker:
            slot.worker = None
        if worker.link is not None:
            worker.link.close()
        for key in self.retired:
            value = worker.stats.get(key, 0)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.retired[key] += value
        how = describe_exit(status)
        if not self.replacing:
            log.info("worker %d (pid %d) %s", worker.slot, worker.pid, how)
            return
        slot.restarts += 1
        self.restarts_total += 1
        slot.boot_failures = slot.boot_failures + 1 if worker.state == "starting" else 0
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

    # -- messages, samples, snapshots ----------------------------------------------------------

    def _on_message(self, worker: Worker, msg: dict[str, Any]) -> None:
        worker.last_heard = time.monotonic()
        kind = msg.get(proto.T)
        if kind == proto.STATS:
            worker.stats = msg
        elif kind == proto.READY:
            self._ready(worker)
        elif kind == proto.DRAINING:
            worker.state = "draining"
            worker.drain_acked = True
        elif kind == proto.HELLO:
            if msg.get("pid") != worker.pid or msg.get("slot") != worker.slot:
                log.warning("worker %d (pid %d): unexpected hello %r", worker.slot, worker.pid, msg)
        else:
            log.debug("worker %d: ignoring message %r", worker.slot, kind)

    def _ready(self, worker: Worker) -> None:
        if worker.state != "starting":
            return
        worker.state = "ready"
        self.slots[worker.slot - 1].boot_failures = 0
        ms = (time.monotonic() - worker.started) * 1000
        log.info("worker %d (pid %d) ready in %.0f ms", worker.slot, worker.pid, ms)
        if all(s.worker is not None and s.worker.state == "ready" for s in self.slots):
            self.on_all_ready()

    def _sample(self) -> None:
        """CPU% and RSS of each worker: a few /proc reads each, once per SAMPLE_EVERY."""
        for worker in self.by_pid.values():
            if worker.proc is None:
                continue
            try:
                with worker.proc.oneshot():
                    worker.cpu = worker.proc.cpu_percent(None)
                    worker.rss = worker.proc.memory_info().rss
            except psutil.Error:
                pass

    def snapshots(self, now: float) -> list[WorkerSnapshot]:
        """One :class:`WorkerSnapshot` per slot, for ``chatctl status``."""
        return [self._snapshot(slot, now) for slot in self.slots]

    def _snapshot(self, slot: Slot, now: float) -> WorkerSnapshot:
        w = slot.worker
        looping = slot.boot_failures >= BOOT_FAILURES_BEFORE_BACKOFF
        if w is None:
            return WorkerSnapshot(
                id=slot.id,
                pid=None,
                generation=self.generation,
                state="crash-looping" if looping else "stopped",
                uptime_s=0.0,
                restarts=slot.restarts,
                rss_bytes=0,
                cpu_percent=0.0,
                last_heartbeat_s=None,
            )
        return WorkerSnapshot(
            id=slot.id,
            pid=w.pid,
            generation=w.generation,
            state="crash-looping" if looping and w.state == "starting" else w.state,
            uptime_s=now - w.started,
            restarts=slot.restarts,
            rss_bytes=w.rss,
            cpu_percent=w.cpu,
            last_heartbeat_s=None if w.last_heard is None else now - w.last_heard,
            stats=w.stats,
        )

    # -- orders --------------------------------------------------------------------------------

    @staticmethod
    def tell(worker: Worker, msg: dict[str, Any]) -> bool:
        """Send ``msg`` over the worker's link; False when the link is gone."""
        return worker.link is not None and worker.link.send(msg)

    @staticmethod
    def kill(worker: Worker, signum: int) -> None:
        """Send ``signum`` to the worker (an exited one is ignored: the reaper will see it)."""
        worker.signalled = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signum)

    def kill_all_and_reap(self, within: float) -> None:
        """SIGKILL every worker left and reap them, waiting at most ``within`` seconds."""
        left = list(self.by_pid.values())
        for worker in left:
            self.kill(worker, signal.SIGKILL)
            if worker.link is not None:
                worker.link.close()
        deadline = time.monotonic() + within
        while self.by_pid and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.by_pid.pop(pid, None)
            else:
                time.sleep(0.01)
        if self.by_pid:
            log.error("workers did not exit after SIGKILL: %s", sorted(self.by_pid))
        self.by_pid.clear()

    def close(self) -> None:
        """Close every slot's listener (the master is exiting)."""
        for slot in self.slots:
            slot.listener.close()
