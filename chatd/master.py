"""The master process: binds, forks workers, reaps and replaces them, answers chatctl, stops.

Single-threaded, and its own code never touches asyncio: it is one ``selectors`` loop over

* the signal wake-up pipe (``signal.set_wakeup_fd``): handlers only queue the signal number, and
  the loop dispatches it to ``handle_<name>()`` once ``select`` returns (gunicorn's arbiter);
* the control socket and its chatctl connections (:class:`chatd.control.ControlServer`);
* one link per worker, the master's end of a socketpair (:mod:`chatd.workers`),

with a short tick for timers (respawn backoff, stop deadlines, CPU and RSS samples).

Sockets: one SO_REUSEPORT listener per worker *slot*, bound before any fork and kept open by the
master until it exits (:mod:`chatd.listeners`). Slot *i*'s worker inherits socket *i*, and so
does its replacement: connections that queued while no worker served them are served, not
reset.

The worker's main function is imported by the caller (``chatd.cli``) before the master is
built, so a fork imports nothing and a replacement serves within milliseconds.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import sys
import time
from collections import deque
from types import FrameType
from typing import Any

import setproctitle

from chatd.config import Config
from chatd.control import ControlServer, Request
from chatd.errors import ControlError, ExitCode
from chatd.listeners import BindError, bind_slots
from chatd.proto import control as proto
from chatd.spec import WorkerMain, WorkerSpec
from chatd.status import aggregate_status
from chatd.workers import MASTER_SIGNALS, Workers

__all__ = ["Master", "WorkerSpec"]

log = logging.getLogger(__name__)

TICK = 0.5  # longest sleep of the loop; it also wakes at the next deadline
DRAIN_ACK_TIMEOUT = 1.0  # a worker that has not acknowledged `drain` by then also gets SIGTERM
FAST_STOP_GRACE = 2.0  # seconds a fast stop waits before SIGKILL
KILL_WAIT = 5.0  # seconds to wait for SIGKILLed workers to be reaped before giving up


class Master:
    """The arbiter. ``Master(cfg, worker_main).run()`` returns the process exit code.

    Args:
        cfg: the validated configuration.
        worker_main: runs in each forked worker and never returns. None means
            ``chatd.worker.run_worker``, imported before the first fork.
    """

    def __init__(self, cfg: Config, worker_main: WorkerMain | None = None) -> None:
        self.cfg = cfg
        self.worker_main = worker_main
        self.state = "starting"  # starting -> running -> stopping
        self.bind = cfg.server.bind
        self.workers: Workers | None = None
        self._started = time.monotonic()
        self._sel: selectors.BaseSelector | None = None
        self._wakeup: tuple[int, int] | None = None
        self._signals: deque[int] = deque()
        self._old_handlers: dict[int, Any] = {}
        self._control: ControlServer | None = None
        self._stopping: str | None = None  # None, "graceful" or "fast"
        self._stop_deadline = 0.0
        self._killed = False
        self._done = False

    # -- life cycle --------------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until a stop signal, clean up. Returns 0, or 1 when the start failed."""
        try:
            try:
                self._start()
            except (BindError, ControlError, OSError) as exc:
                log.error("cannot start: %s", exc)
                return ExitCode.FAILURE
            while not self._done:
                self._run_once()
        except Exception:
            log.critical("the master failed; killing the workers", exc_info=True)
            return ExitCode.FAILURE
        finally:
            self._cleanup()
        log.info("master stopped")
        return ExitCode.OK

    def _start(self) -> None:
        """Check, bind, listen and fork, in this order; a failure leaves nothing behind."""
        if self.worker_main is None:
            from chatd.worker import run_worker  # type: ignore[import-not-found,unused-ignore]

            self.worker_main = run_worker
        count = self.cfg.server.workers or os.cpu_count() or 1
        # 1. The control socket first: a live master on it is the clearest "already running".
        ControlServer.check_free(self.cfg.control.socket)
        # 2. The slot sockets: a taken port fails here, before anything else exists.
        listeners = bind_slots(self.cfg.server.bind, count)
        host, port = listeners[0].getsockname()[:2]
        self.bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # 3. The loop: selector, wake-up pipe and handlers, then the control socket.
        self._sel = selectors.DefaultSelector()
        self.workers = Workers(
            self.cfg, self.worker_main, listeners, self._sel, self._close_in_child
        )
        self.workers.on_all_ready = self._all_ready
        self._wakeup = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wakeup[0], selectors.EVENT_READ, self._on_wakeup)
        signal.set_wakeup_fd(self._wakeup[1], warn_on_full_buffer=False)
        for signum in MASTER_SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)
        self._control = ControlServer(
            self._sel,
            self.cfg.control.socket,
            self.cfg.control.mode_bits,
            {proto.STATUS: self._cmd_status},
        )
        self._control.open()
        setproctitle.setproctitle(f"chatd: master [{self.cfg.path or 'defaults'}]")
        log.info(
            "master listening on %s, %d workers, control socket %s",
            *(self.bind, count, self.cfg.control.socket),
        )
        # 4. The workers.
        for slot in self.workers.slots:
            self.workers.spawn(slot)

    def _run_once(self) -> None:
        assert self._sel is not None and self.workers is not None
        now = time.monotonic()
        timeout = self.workers.timeout(now, TICK)
        if self._stopping:
            timeout = max(0.0, min(timeout, self._stop_deadline - now))
        for key, mask in self._sel.select(timeout):
            key.data(mask)
        while self._signals:
            signum = self._signals.popleft()
            getattr(self, f"handle_{signal.Signals(signum).name[3:].lower()}")()
        now = time.monotonic()
        self.workers.tick(now)
        if self._stopping:
            self._stop_progress(now)

    def _all_ready(self) -> None:
        if self.state == "starting":
            self.state = "running"
            log.info("all workers ready")

    def _close_in_child(self) -> None:
        """In a freshly forked worker: close the master's fds, touching no shared state."""
        if self._control is not None:
            self._control.close_in_child()
        if self._wakeup is not None:
            for fd in self._wakeup:
                os.close(fd)
        if self._sel is not None:
            self._sel.close()  # our copy of the epoll fd; nothing is unregistered

    # -- signals -------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of whatever the loop was doing: queue it, nothing else.
        self._signals.append(signum)

    def _on_wakeup(self, mask: int) -> None:
        assert self._wakeup is not None
        try:
            while os.read(self._wakeup[0], 4096):
                pass
        except BlockingIOError:
            pass

    def handle_chld(self) -> None:
        assert self.workers is not None
        self.workers.reap()

    def handle_term(self) -> None:
        self._begin_stop(graceful=True)

    def handle_int(self) -> None:
        self._begin_stop(graceful=False)

    def handle_quit(self) -> None:
        self._begin_stop(graceful=False)

    def handle_hup(self) -> None:
        log.warning("SIGHUP: reloading is not implemented yet; ignored")

    def handle_ttin(self) -> None:
        log.warning("SIGTTIN: scaling is not implemented yet; ignored")

    def handle_ttou(self) -> None:
        log.warning("SIGTTOU: scaling is not implemented yet; ignored")

    # -- stopping ------------------------------------------------------------------------------

    def _begin_stop(self, *, graceful: bool) -> None:
        """Start a graceful (drain) or a fast stop; a fast stop may overtake a graceful one.

        Graceful stop (SIGTERM), step by step; steps 3 to 5 happen in :meth:`_stop_progress`
        and :meth:`_cleanup`:

        1. Stop replacing workers; the master's state becomes ``stopping`` (status still works).
        2. Send ``drain`` to every worker over its link; a worker without a link gets SIGTERM.
        3. A worker that has not answered ``draining`` within DRAIN_ACK_TIMEOUT gets SIGTERM
           too. Reap the workers as they exit, until none is left or ``graceful_timeout`` has
           passed.
        4. SIGKILL the rest and reap them (waiting up to KILL_WAIT).
        5. Close the listeners and the control socket (its file is removed); exit 0.

        A fast stop (SIGINT, SIGQUIT) sends ``stop`` (SIGQUIT to a worker without a link),
        SIGKILLs after FAST_STOP_GRACE, then steps 4 and 5.
        """
        assert self.workers is not None
        if self._stopping == "fast" or (self._stopping and graceful):
            log.info("already stopping")
            return
        now = time.monotonic()
        self.state = "stopping"
        self._stopping = "graceful" if graceful else "fast"
        workers = self.workers
        workers.replacing = False
        for slot in workers.slots:
            slot.respawn_at = None
        if graceful:
            timeout = self.cfg.server.graceful_timeout
            log.info("graceful stop: draining %d workers (up to %gs)", len(workers.by_pid), timeout)
            self._stop_deadline = now + timeout
            for worker in workers.by_pid.values():
                worker.state = "draining"
                worker.drain_sent = now
                if not workers.tell(worker, {proto.T: proto.DRAIN, "timeout": timeout}):
                    workers.kill(worker, signal.SIGTERM)
        else:
            log.info("fast stop: stopping %d workers", len(workers.by_pid))
            self._stop_deadline = now + FAST_STOP_GRACE
            for worker in workers.by_pid.values():
                worker.drain_sent = None
                if not workers.tell(worker, {proto.T: proto.STOP}):
                    workers.kill(worker, signal.SIGQUIT)
        self._stop_progress(now)

    def _stop_progress(self, now: float) -> None:
        assert self.workers is not None
        workers = self.workers
        if not workers.by_pid:
            self._done = True
            return
        for worker in workers.by_pid.values():
            sent = worker.drain_sent
            late = sent is not None and now - sent > DRAIN_ACK_TIMEOUT and not worker.drain_acked
            if late and not worker.signalled:
                workers.kill(worker, signal.SIGTERM)
        if now < self._stop_deadline:
            return
        if not self._killed:
            log.warning(
                "workers still running at the deadline, killing: %s", sorted(workers.by_pid)
            )
            for worker in workers.by_pid.values():
                workers.kill(worker, signal.SIGKILL)
            self._killed = True
            self._stop_deadline = now + KILL_WAIT
        else:
            self._done = True  # _cleanup() reports the ones that would not die

    def _cleanup(self) -> None:
        """Last step of every exit path: no worker, no socket, no control socket file left."""
        if self.workers is not None:
            self.workers.kill_all_and_reap(KILL_WAIT if not self._killed else 0.0)
            self.workers.close()
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for signum, handler in self._old_handlers.items():
                signal.signal(signum, handler)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None
        if self._sel is not None:
            self._sel.close()
            self._sel = None

    # -- control commands ----------------------------------------------------------------------

    def _cmd_status(self, request: Request) -> None:
        request.ok(self.status())

    def status(self) -> dict[str, Any]:
        """The ``chatctl status --json`` document."""
        assert self.workers is not None
        now = time.monotonic()
        master = {
            "pid": os.getpid(),
            "uptime_s": round(now - self._started, 3),
            "generation": self.workers.generation,
            "config": self.cfg.path or None,
            "bind": self.bind,
            "state": self.state,
            "workers_wanted": len(self.workers.slots),
            "python": sys.version.split()[0],
        }
        return aggregate_status(
            master=master,
            workers=self.workers.snapshots(now),
            cfg=self.cfg,
            restarts_total=self.workers.restarts_total,
            retired=self.workers.retired,
        )
