"""The master process: binds, forks workers, reaps and replaces them, answers chatctl, stops.

Single-threaded, and its own code never touches asyncio: it is one ``selectors`` loop over

* the signal wake-up pipe (``signal.set_wakeup_fd``): handlers only queue the signal number, and
  the loop dispatches it to ``handle_<name>()`` once ``select`` returns (gunicorn's arbiter);
* the control socket and its chatctl connections (:class:`chatd.master.control.ControlServer`);
* one link per worker, the master's end of a socketpair (:mod:`chatd.master.workers`),

with a short tick for timers (respawn backoff, stop deadlines, CPU and RSS samples, heartbeat
timeouts, the systemd watchdog, the dns tables' resolution: :mod:`chatd.master.discovery`),
and one change to the workers at a time: a rolling reload
(:mod:`chatd.master.reload`), an RSS recycle, a scale (:mod:`chatd.master.operations`,
:mod:`chatd.master.scale`).
What chatctl may ask is in :mod:`chatd.master.commands`; systemd is told how things go
(:mod:`chatd.master.systemd`).

Sockets: one SO_REUSEPORT listener per worker *slot*, bound before any fork and kept open by the
master until it exits (:mod:`chatd.master.listeners`). Slot *i*'s worker inherits socket *i*, and so
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
import time
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any

import setproctitle

from chatd.config import Config, load
from chatd.errors import ControlError, ExitCode
from chatd.logs import setup_logging
from chatd.master import commands
from chatd.master.control import ControlServer
from chatd.master.discovery import Discovery
from chatd.master.fleet import Fleet
from chatd.master.listeners import BindError, bind_slots, tcp_migrate_req
from chatd.master.operations import Operations
from chatd.master.reload import worker_count
from chatd.master.scale import MAX_WORKERS, scale_to
from chatd.master.services import Services
from chatd.master.shutdown import KILL_WAIT, Shutdown
from chatd.master.storewriter import STOP_WAIT, StoreWriter
from chatd.master.systemd import Notifier
from chatd.master.takeover import Takeover
from chatd.master.workers import MASTER_SIGNALS, Workers
from chatd.spec import WorkerMain, WorkerSpec, WriterMain

__all__ = ["Master", "WorkerSpec"]

log = logging.getLogger("chatd.master")

TICK = 0.5  # longest sleep of the loop; it also wakes at the next deadline
STATUS_EVERY = 5.0  # seconds between two STATUS= lines to systemd when nothing notable changed


class Master:
    """The arbiter. ``Master(cfg, worker_main).run()`` returns the process exit code.

    Args:
        cfg: the validated configuration.
        worker_main: runs in each forked worker and never returns. The caller imports it
            (``chatd.cli`` passes ``chatd.worker.main.run_worker``) before the master is built,
            so a fork imports nothing; the master itself never imports the worker.
        load_config: reads the configuration again for a reload: the file the master was
            started with, with the command-line overrides given at start (raises
            ConfigError). None means ``load(cfg.path)`` (the defaults without a file).
    """

    def __init__(
        self,
        cfg: Config,
        worker_main: WorkerMain,
        load_config: Callable[[], Config] | None = None,
        writer_main: WriterMain | None = None,
    ) -> None:
        self.cfg = cfg
        self.worker_main = worker_main
        self.writer_main = writer_main
        self.store_writer: StoreWriter | None = None
        self.load_config = load_config or (lambda: load(cfg.path) if cfg.path else Config())
        self.state = "starting"  # starting -> running -> stopping
        self.bind = cfg.server.bind
        self.workers: Workers | None = None
        self.services: Services | None = None  # LLM slots and metrics for the workers
        self.discovery: Discovery | None = None  # the dns tables' addresses
        self.fleet: Fleet | None = None  # the fleet's LLM slots (a Redis store)
        self.ops: Operations | None = None  # reloads and RSS recycles
        self.notifier = Notifier()
        self.tcp_migrate_req = tcp_migrate_req()
        self.started = time.monotonic()
        self._status_key: tuple[Any, ...] = ()
        self._next_status = 0.0
        self._sel: selectors.BaseSelector | None = None
        self._wakeup: tuple[int, int] | None = None
        self._signals: deque[int] = deque()
        self._old_handlers: dict[int, Any] = {}
        self._control: ControlServer | None = None
        self._shutdown: Shutdown | None = None

    # -- life cycle --------------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until a stop signal, clean up. Returns 0, or 1 when the start failed."""
        try:
            try:
                self._start()
            except (BindError, ControlError, OSError) as exc:
                log.error("cannot start: %s", exc)
                return ExitCode.FAILURE
            while not (self._shutdown is not None and self._shutdown.done):
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
        count = worker_count(self.cfg)
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
        self.services = Services(self.cfg, self.workers)
        Takeover(self.workers)  # kept by its hooks in self.workers
        self.discovery = Discovery(self.cfg, self.workers, self.services)
        self.fleet = Fleet.attach(self.cfg.sessions.store, self.workers, self.services)
        self.ops = Operations(self.workers, self.load_config, self.notifier, self._apply)
        self._shutdown = Shutdown(self.workers)
        self._wakeup = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wakeup[0], selectors.EVENT_READ, self._on_wakeup)
        signal.set_wakeup_fd(self._wakeup[1], warn_on_full_buffer=False)
        for signum in MASTER_SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)
        self._control = ControlServer(
            self._sel,
            self.cfg.control.socket,
            self.cfg.control.mode_bits,
            commands.handlers(self),
        )
        self._control.open()
        setproctitle.setproctitle(f"chatd: master [{self.cfg.path or 'defaults'}]")
        log.info(
            "master listening on %s, %d workers, control socket %s",
            *(self.bind, count, self.cfg.control.socket),
        )
        if self.tcp_migrate_req == 0:
            log.warning(
                "net.ipv4.tcp_migrate_req is 0: connections queued on a slot socket that is "
                "closed (scaling down) are reset; set it to 1 to have them moved to the other "
                "slots (sysctl -w net.ipv4.tcp_migrate_req=1, before chatd starts)"
            )
        # 4. The store's writer (a SQLite store), then the workers, which connect to it.
        if self.writer_main is not None and StoreWriter.wanted(self.cfg):
            writer = self.store_writer = StoreWriter(
                self.cfg, self.writer_main, self.workers.close_all_in_child, self._sel
            )
            self.workers.store_writer = writer.for_workers
            self.workers.on_other_exit = writer.reaped
            self.services.store_writer = writer.snapshot
            writer.start()
        for slot in self.workers.slots:
            self.workers.spawn(slot)

    def _run_once(self) -> None:
        assert self._sel is not None and self.workers is not None
        now = time.monotonic()
        timeout = self.workers.timeout(now, TICK)
        if self.services is not None:
            timeout = self.services.timeout(now, timeout)
        if self.store_writer is not None:
            timeout = self.store_writer.timeout(now, timeout)
        watchdog = self.notifier.watchdog_due(now)
        if watchdog is not None:
            timeout = min(timeout, watchdog)
        if self.stopping:
            assert self._shutdown is not None
            timeout = max(0.0, min(timeout, self._shutdown.deadline - now))
        for key, mask in self._sel.select(timeout):
            key.data(mask)
        while self._signals:
            signum = self._signals.popleft()
            getattr(self, f"handle_{signal.Signals(signum).name[3:].lower()}")()
        now = time.monotonic()
        self.workers.tick(now)
        if self.services is not None:
            self.services.tick(now)
        if self.store_writer is not None:
            self.store_writer.tick(now)
        if self._shutdown is not None and self._shutdown.mode:
            self._shutdown.progress(now)
        elif self.ops is not None:
            self.ops.tick(now)
            if self.state == "starting" and self.workers.all_ready():
                self._all_ready()  # e.g. a reload fixed a start that was crash-looping
            self._tell_systemd(now)
        # Only a loop that goes round pings the watchdog: a stuck master gets restarted.
        self.notifier.watchdog(now)

    def _all_ready(self) -> None:
        if self.state == "starting":
            self.state = "running"
            log.info("all workers ready")
            self.notifier.ready(commands.status_line(self))

    def _tell_systemd(self, now: float) -> None:
        """A STATUS= line when something notable changed, else every STATUS_EVERY seconds."""
        if not self.notifier.enabled or self.workers is None or self.ops is None:
            return
        slots = self.workers.slots
        key = (
            self.state,
            self.workers.generation,
            len(slots),
            [(s.worker.state if s.worker else None, s.boot_failures) for s in slots],
            self.ops.busy,
            self.ops.last_reload,
        )
        if key != self._status_key or now >= self._next_status:
            self._status_key, self._next_status = key, now + STATUS_EVERY
            self.notifier.status(commands.status_line(self))

    def _apply(self, cfg: Config) -> None:
        """A reload succeeded: the master's own share of the new configuration."""
        self.cfg = cfg
        setup_logging(cfg.log, "master")
        if self._control is not None:
            self._control.set_mode(cfg.control.mode_bits)
        if self.services is not None:
            self.services.configure(cfg)
        if self.discovery is not None:
            self.discovery.configure(cfg)
        if self.fleet is not None:
            self.fleet.configure(cfg.sessions.store)

    @property
    def stopping(self) -> bool:
        return self._shutdown is not None and self._shutdown.mode is not None

    def scale_refusal(self) -> str | None:
        """Why the number of workers cannot change now, or None."""
        if self.stopping:
            return "the daemon is stopping"
        busy = self.ops.busy if self.ops is not None else None
        if busy:
            return f"{busy} is in progress; scale again when it has finished"
        return None

    def _close_in_child(self) -> None:
        """In a freshly forked worker: close the master's fds, touching no shared state."""
        if self._control is not None:
            self._control.close_in_child()
        if self._wakeup is not None:
            for fd in self._wakeup:
                os.close(fd)
        if self._sel is not None:
            self._sel.close()  # our copy of the epoll fd; nothing is unregistered
        self.notifier.close_in_child()
        if self.store_writer is not None:
            self.store_writer.close_in_child()

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
        if self.stopping or self.ops is None:
            log.warning("SIGHUP: the daemon is stopping; no reload")
            return
        self.ops.request_reload(None, "SIGHUP")

    def handle_ttin(self) -> None:
        self._scale_by(+1, "SIGTTIN")

    def handle_ttou(self) -> None:
        self._scale_by(-1, "SIGTTOU")

    def _scale_by(self, delta: int, source: str) -> None:
        assert self.workers is not None
        count = len(self.workers.slots) + delta
        why = self.scale_refusal()
        if why is None and not 1 <= count <= MAX_WORKERS:
            why = f"the number of workers must stay within 1..{MAX_WORKERS}"
        if why is not None:
            log.warning("%s: not scaling to %d workers: %s", source, count, why)
            return
        try:
            log.info("%s: %s", source, scale_to(self.workers, count))
        except BindError as exc:
            log.error("%s: %s", source, exc)

    # -- stopping ------------------------------------------------------------------------------

    def _begin_stop(self, *, graceful: bool) -> None:
        """Start a graceful (drain) or a fast stop (:mod:`chatd.master.shutdown` has the steps)."""
        assert self._shutdown is not None
        server = self.cfg.server
        if not self._shutdown.begin(
            graceful=graceful,
            graceful_timeout=server.graceful_timeout,
            now=time.monotonic(),
            delay=server.shutdown_delay,
        ):
            return
        if self.state != "stopping":
            self.state = "stopping"
            self.notifier.stopping()
            if self.ops is not None:
                self.ops.abort("the daemon is stopping")

    def _cleanup(self) -> None:
        """Last step of every exit path: no worker, no socket, no control socket file left."""
        if self.workers is not None:
            killed = self._shutdown is not None and self._shutdown.killed
            self.workers.kill_all_and_reap(0.0 if killed else KILL_WAIT)
            self.workers.close()
        if self.store_writer is not None:  # after the workers: their stores wrote through it
            killed = self._shutdown is not None and self._shutdown.killed
            self.store_writer.stop(KILL_WAIT if killed else STOP_WAIT)
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
        self.notifier.close()

    # -- control commands ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The ``chatctl status --json`` document (see :mod:`chatd.master.commands`)."""
        return commands.status_document(self)
