"""The host's SQLite writer process, supervised by the master (its code: chatd.store.sqlite_host).

With a SQLite store (``[sessions] store = "sqlite:…"`` and ``sqlite_writer = true``, the
default), one process does every worker's writes on one connection: the master forks it before
the first worker, restarts it when it dies (at once; after a pause from 1 s doubling to 30 s
while it keeps dying before it serves), and stops it after the last worker has exited
(SIGTERM: it commits and answers what is queued; SIGKILL after ``STOP_WAIT``). Its workers
connect to ``address``, an abstract unix socket name unique to this master (no file to clean
up); while it restarts they hold their new writes and fail those in flight
(chatd.store.sqlite_remote).

The writer keeps the file it was started with across reloads: a new generation whose
``[sessions] store`` names another file, or that sets ``sqlite_writer = false``, writes the
file itself (the writes of both kinds exclude each other through SQLite's lock and the write
gate, chatd.store.sqlite_gate).
"""

from __future__ import annotations

import logging
import os
import secrets
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from chatd.config import Config
from chatd.master.channel import Channel
from chatd.master.fork import fork_child
from chatd.master.supervision import describe_exit
from chatd.spec import WriterMain, WriterSpec

log = logging.getLogger("chatd.master")

FIRST_PAUSE, LONGEST_PAUSE = 1.0, 30.0  # before restarting a writer that died before serving:
# doubled at each such death in a row (a file it cannot open, a schema newer than this chatd)
STOP_WAIT = 10.0  # seconds a stopping writer has to commit its queue before SIGKILL


class StoreWriter:
    """The writer process of ``cfg``'s SQLite file (see the module docstring).

    Args:
        cfg: the master's configuration at its start.
        writer_main: runs in the forked writer and never returns.
        close_in_child: closes, in the forked writer, every fd of the master's (listeners,
            links, control socket).
        sel: the master's selector: the writer's link (a :class:`Channel`) registers there;
            the writer says ``ready`` on it once it serves, and sends ``stats {store}``, its
            figures, every second (``stats``, shown in ``chatctl status``).
    """

    def __init__(
        self,
        cfg: Config,
        writer_main: WriterMain,
        close_in_child: Callable[[], None],
        sel: selectors.BaseSelector,
    ) -> None:
        path = cfg.sessions.sqlite_path
        assert path, "StoreWriter needs a SQLite store"
        self.cfg = cfg
        self.path = path
        self.address = f"\0chatd-store-{os.getpid()}-{secrets.token_hex(6)}"
        self._main = writer_main
        self._close_in_child = close_in_child
        self.pid: int | None = None
        self.started = 0.0
        self.restarts = 0
        self.respawn_at: float | None = None
        self._pause = 0.0  # the pause before the next restart, if it dies young again
        self.stopped = False
        self.stats: dict[str, Any] = {}  # the running writer's last figures
        self._ready = False  # the running writer said it serves
        self._sel = sel
        self._link: Channel | None = None  # the master's end: its EOF tells the writer

    @staticmethod
    def wanted(cfg: Config) -> bool:
        """Does ``cfg`` ask for a host writer (a SQLite store, ``sqlite_writer`` on)?"""
        return bool(cfg.sessions.sqlite_path) and cfg.sessions.sqlite_writer

    @property
    def for_workers(self) -> tuple[str, str]:
        """The ``store_writer`` of the workers' specs: (path, address)."""
        return self.path, self.address

    def start(self) -> None:
        """Fork the writer (a failed fork is tried again in a second)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        spec = WriterSpec(self.cfg, self.path, self.address, theirs)

        def close_in_child() -> None:
            ours.close()
            self._close_in_child()

        try:
            pid = fork_child(
                lambda: self._main(spec),
                close_in_child,
                cfg=self.cfg,
                role="store writer",
                title=f"chatd: store writer [{self.path}]",
            )
        except OSError as exc:
            ours.close()
            theirs.close()
            log.error("cannot fork the store writer: %s; retrying in 1s", exc)
            self.respawn_at = time.monotonic() + 1.0
            return
        theirs.close()
        if self._link is not None:
            self._link.close()
        self._link = Channel(
            self._sel,
            ours,
            name="store writer link",
            on_message=self._on_message,
            on_close=lambda _: None,  # its exit is seen by the reaper
        )
        self._ready, self.stats = False, {}
        self.pid, self.started, self.respawn_at = pid, time.monotonic(), None
        log.info("store writer started (pid %d) for %s", pid, self.path)

    def reaped(self, pid: int, status: int) -> bool:
        """The child ``pid`` exited: if it is the writer, restart it (unless stopping)."""
        if pid != self.pid:
            return False
        self.pid = None
        how = describe_exit(status)
        if self.stopped:
            log.info("store writer (pid %d) %s", pid, how)
            return True
        now = time.monotonic()
        self.restarts += 1
        if self._served():
            self._pause, self.respawn_at = 0.0, now
        else:  # it died at its start: restarting it at once would only fail again
            self._pause = min(LONGEST_PAUSE, max(FIRST_PAUSE, 2 * self._pause))
            self.respawn_at = max(now, self.started + self._pause)
        log.error(
            "store writer (pid %d) %s; restarting it%s",
            *(pid, how, "" if self.respawn_at <= now else f" in {self.respawn_at - now:.1f}s"),
        )
        if self.respawn_at <= now:
            self.start()
        return True

    def _on_message(self, _: Channel, msg: dict[str, Any]) -> None:
        kind = msg.get("t")
        if kind == "ready":
            self._ready = True
        elif kind == "stats" and isinstance(msg.get("store"), dict):
            self.stats = msg["store"]

    def _served(self) -> bool:
        """Did the writer that just exited say it served (``ready`` on its link)?"""
        if self._link is not None:
            self._link.read_remaining()  # what it wrote before it exited
        return self._ready

    def timeout(self, now: float, timeout: float) -> float:
        """The master loop's select timeout, shortened for a planned restart."""
        if self.respawn_at is None:
            return timeout
        return max(0.0, min(timeout, self.respawn_at - now))

    def tick(self, now: float) -> None:
        """Restart the writer when its planned restart is due."""
        if self.respawn_at is not None and now >= self.respawn_at and not self.stopped:
            self.start()

    def close_in_child(self) -> None:
        """In a forked worker: close the master's end of the writer's link."""
        if self._link is not None:
            self._link.close_in_child()

    def stop(self, within: float = STOP_WAIT) -> None:
        """After the last worker: SIGTERM, wait ``within`` seconds for it to commit what is
        queued and exit, then SIGKILL. Reaps it."""
        self.stopped = True
        self.respawn_at = None
        pid = self.pid
        if pid is not None and not _reaped_within(pid, 0.0):  # still our child: its pid is
            try:  # not reused (another reaper, SIGCHLD's, may have collected it already)
                os.kill(pid, signal.SIGTERM)
                if not _reaped_within(pid, within):
                    log.warning("store writer (pid %d) did not stop in %.0fs: SIGKILL", pid, within)
                    os.kill(pid, signal.SIGKILL)
                    _reaped_within(pid, within)
            except ProcessLookupError:
                pass
        self.pid = None
        if self._link is not None:
            self._link.close()
            self._link = None

    def snapshot(self) -> dict[str, Any]:
        """Its part of ``chatctl status --json``: ``store_writer`` (``store``: its figures,
        chatd.store.sqlite_host.figures, as it last sent them; {} before its first report)."""
        return {"pid": self.pid, "path": self.path, "restarts": self.restarts, "store": self.stats}


def _reaped_within(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True  # reaped elsewhere already
        if done:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
