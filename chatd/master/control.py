"""Master side of the control channel: framed connections, the chatctl listener, status.

Everything here runs inside the master's single-threaded ``selectors`` loop (no asyncio, no
threads): each socket is registered with a callback as its selector ``data``, and the master's
loop calls ``key.data(mask)``; the control server's timers (idle connections, the accept back-off)
run from the loop's turns (``timeout`` then ``tick``, :class:`~chatd.master.requests.Clock`).

:class:`ControlServer` is the Unix socket chatctl connects to. Each connection is a
:class:`~chatd.master.channel.Channel`; each frame becomes a :class:`~chatd.master.requests.Request`
dispatched by its ``t`` to a handler the master registered. A garbage or oversized frame closes
that one connection and is logged; nothing else is affected. Each peer's credentials are
checked when it connects (:mod:`chatd.master.peercred`): a peer that is not allowed gets
``{"ok": false, "error": "permission denied: ..."}`` and is closed.

The control socket must never take the master down, whoever connects and however often
(the master's descriptors are shared with its supervision: forking a worker, reading
``/proc``). So, for each connection:

* a refused peer gets its one error frame and is closed at once;
* over ``max_clients`` open connections, or when fewer than ``FD_RESERVE`` descriptors would be
  left under ``RLIMIT_NOFILE``, a new connection gets ``{"ok": false, "error": "too many
  control connections ..."}`` (if it can be sent without blocking) and is closed at once;
* a connection without a complete request for ``idle_timeout`` seconds is closed, unless it
  waits for an answer (a reload answers when it has finished) or was told to stay open
  (``stop``: the caller waits for EOF, which comes when the master exits);
* when ``accept`` fails for lack of descriptors or memory (EMFILE, ENFILE, ...), the listener is
  not polled for ``ACCEPT_BACKOFF`` seconds (the connections wait in its backlog), instead of
  the loop spinning on a readable socket it cannot accept from.

Log lines about these are throttled (one per cause per ``LOG_EVERY`` seconds, with the number
held back), so a flood writes a bounded number of lines.

The ``status`` document itself is built in :mod:`chatd.master.status`.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import selectors
import socket
import stat
import time
from collections.abc import Mapping
from typing import Any

from chatd.errors import ControlError
from chatd.master import peercred
from chatd.master.channel import Channel
from chatd.master.requests import Commands, Handler, Request, Session
from chatd.proto import control as proto

log = logging.getLogger("chatd.control")

IDLE_TIMEOUT = 5.0
"""Seconds a control connection may stay without a complete request (and nothing it waits for)."""

MAX_CLIENTS = 64
"""Control connections open at once; chatctl uses one per command, for a second or less."""

FD_RESERVE = 32
"""Descriptors under ``RLIMIT_NOFILE`` that control connections never take: the master's own
work (a worker's socketpair, ``/proc`` reads, a config file) must still find one."""

ACCEPT_BACKOFF = 0.5
"""Seconds the listener is not polled after ``accept`` failed for lack of resources."""

LOG_EVERY = 60.0
"""Seconds between two log lines about the same trouble (refused peers, a full server)."""

ACCEPT_BATCH = 16
"""Connections accepted per wake-up at most, so a flood cannot hog the loop."""

_STARVED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
"""``accept`` errors that say "no resources now": back off, they pass by themselves."""


class _Throttle:
    """At most one log line per key per ``every`` seconds; the ones held back are counted."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str, now: float) -> int | None:
        """None: stay silent. Else log now, telling how many lines were held back since."""
        if now < self._next.get(key, float("-inf")):
            self._held[key] = self._held.get(key, 0) + 1
            return None
        if len(self._next) > 256:  # keys are uids and causes: drop the stale ones
            self._next = {k: t for k, t in self._next.items() if t > now}
        self._next[key] = now + self.every
        return self._held.pop(key, 0)


def _also(held: int) -> str:
    return f" ({held} more since the last such line)" if held else ""


class ControlServer:
    """The chatctl listener at ``[control] socket`` and its client connections.

    Args:
        sel: the master's selector.
        path: where the socket lives; the parent directory is created when missing.
        mode: permission bits applied to the socket file.
        handlers: command type (``"status"``, ...) -> handler. When it is a
            :class:`Commands`, the server adds itself to its ``clocks`` (the loop's timers).
        idle_timeout: seconds a connection may stay without a complete request.
        max_clients: connections open at once; beyond, new ones are turned away.

    The master's loop must call :meth:`timeout` and :meth:`tick` on each turn (see
    :class:`Clock`); without them, idle connections stay open and a back-off never ends.
    """

    def __init__(
        self,
        sel: selectors.BaseSelector,
        path: str,
        mode: int,
        handlers: Mapping[str, Handler],
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.path = path
        self.idle_timeout = idle_timeout
        self.max_clients = max_clients
        self._mode = mode
        self._sel = sel
        self._handlers = dict(handlers)
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._sessions: dict[Channel, Session] = {}
        self._resume_at: float | None = None  # the listener is not polled until then
        self._throttle = _Throttle(LOG_EVERY)
        if isinstance(handlers, Commands):
            handlers.clocks.append(self)

    @property
    def clients(self) -> int:
        """Control connections open now."""
        return len(self._sessions)

    @staticmethod
    def check_free(path: str) -> None:
        """Make ``path`` usable: remove a stale socket file, refuse one a live master answers.

        Raises:
            ControlError: another process accepts connections on ``path``, or ``path`` is not a
                socket, or it cannot be examined.
        """
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"control socket {path} exists and is not a socket; remove it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            # Nobody listens: a master that died without cleaning up. Safe to take over.
            log.info("removing the stale control socket %s", path)
            os.unlink(path)
            return
        except OSError as exc:
            raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
        finally:
            probe.close()
        raise ControlError(
            f"another chatd master is running with the control socket {path}; "
            "stop it first (chatctl stop) or give this one another [control] socket"
        )

    def open(self) -> None:
        """Create the socket, listening and registered; call :meth:`check_free` first.

        Raises:
            ControlError: the directory or the socket cannot be created.
        """
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o755, exist_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # Bind under a 0600 umask so the socket is never wider open than configured, even
            # for the instant before chmod. The master is single-threaded: umask is safe here.
            old_umask = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old_umask)
            os.chmod(self.path, self._mode)
            sock.listen(64)
        except OSError as exc:
            raise ControlError(f"control socket {self.path}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        self._inode = os.stat(self.path).st_ino
        self._listener = sock
        self._sel.register(sock, selectors.EVENT_READ, self._on_accept)

    def set_mode(self, mode: int) -> None:
        """Apply new permission bits to the socket file (a reload changed ``[control] mode``)."""
        if mode != self._mode and self._listener is not None:
            try:
                os.chmod(self.path, mode)
            except OSError as exc:
                log.error("control socket %s: cannot change its mode: %s", self.path, exc)
                return
            log.info("control socket %s: mode %04o", self.path, mode)
            self._mode = mode

    def close(self) -> None:
        """Close every client and the listener, and remove the socket file if it is still ours."""
        for client in list(self._sessions):
            client.close()
        if self._listener is None:
            return
        if self._resume_at is None:
            self._sel.unregister(self._listener)
        self._resume_at = None
        self._listener.close()
        self._listener = None
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close_in_child(self) -> None:
        """In a freshly forked worker: close the fds, leave the shared selector and file alone."""
        for client in self._sessions:
            client.close_in_child()
        if self._listener is not None:
            self._listener.close()

    # -- the loop's hooks (Clock) -------------------------------------------------------------

    def timeout(self, now: float, longest: float) -> float:
        """How long the loop may sleep before :meth:`tick` has a connection to close or the
        listener to poll again."""
        due = [longest]
        if self._resume_at is not None:
            due.append(self._resume_at - now)
        for session in self._sessions.values():
            deadline = session.deadline(self.idle_timeout)
            if deadline is not None:
                due.append(deadline - now)
        return max(0.0, min(due))

    def tick(self, now: float) -> None:
        """Close the connections idle for ``idle_timeout``; poll the listener again after a
        back-off."""
        for session in list(self._sessions.values()):
            deadline = session.deadline(self.idle_timeout)
            if deadline is not None and now >= deadline:
                # No log line: an idle chatctl is harmless, and a flood would flood the log.
                session.channel.close()
        if self._resume_at is not None and now >= self._resume_at and self._listener is not None:
            self._resume_at = None
            self._sel.register(self._listener, selectors.EVENT_READ, self._on_accept)

    # -- connections ---------------------------------------------------------------------------

    def _on_accept(self, mask: int) -> None:
        for _ in range(ACCEPT_BATCH):
            if self._listener is None or self._resume_at is not None:
                return
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _STARVED:
                    self._back_off(exc)
                    return
                if exc.errno != errno.ECONNABORTED:
                    held = self._throttle.allow("accept", time.monotonic())
                    if held is not None:
                        log.warning("control socket: accept failed: %s%s", exc, _also(held))
                    return
                continue
            self._admit(sock)

    def _back_off(self, exc: OSError) -> None:
        """Stop polling the listener for ACCEPT_BACKOFF seconds: it stays readable while the
        connections wait in its backlog, and retrying at once would spin the loop."""
        assert self._listener is not None
        now = time.monotonic()
        self._sel.unregister(self._listener)
        self._resume_at = now + ACCEPT_BACKOFF
        held = self._throttle.allow("starved", now)
        if held is not None:
            log.error(
                "control socket: cannot accept connections: %s; trying again every %gs "
                "(chatctl waits meanwhile), the master keeps running%s",
                *(exc.strerror or exc, ACCEPT_BACKOFF, _also(held)),
            )

    def _admit(self, sock: socket.socket) -> None:
        """Serve a new connection, or tell it why not and close it at once."""
        if len(self._sessions) >= self.max_clients or sock.fileno() >= _fd_ceiling():
            held = self._throttle.allow("full", time.monotonic())
            if held is not None:
                log.warning(
                    "control socket: %d connections open, turning new ones away until some close%s",
                    *(len(self._sessions), _also(held)),
                )
            _say_and_close(
                sock,
                {
                    "ok": False,
                    "error": f"too many control connections ({len(self._sessions)} open); "
                    "try again in a few seconds",
                },
            )
            return
        denied = self._refusal(sock)
        if denied is not None:
            _say_and_close(sock, {"ok": False, "error": denied})
            return
        channel = Channel(
            self._sel,
            sock,
            name="control connection",
            on_message=self._dispatch,
            on_close=self._forget,
        )
        self._sessions[channel] = Session(channel, time.monotonic())

    def _forget(self, channel: Channel) -> None:
        self._sessions.pop(channel, None)

    def _refusal(self, sock: socket.socket) -> str | None:
        """Why this peer may not use the socket (logged), or None (see
        :mod:`chatd.master.peercred`)."""
        try:
            peer = peercred.peer_of(sock)
        except OSError as exc:
            log.warning("control socket: cannot read the peer's credentials (%s); refused", exc)
            return "permission denied: the peer's credentials cannot be read"
        try:
            group = os.stat(self.path).st_gid
        except OSError:
            group = os.getegid()
        why = peercred.refusal(
            peer, master_uid=os.getuid(), group=group, groups=peercred.groups_of(peer.pid)
        )
        if why is not None:
            held = self._throttle.allow(f"refused {peer.uid}", time.monotonic())
            if held is not None:
                log.warning(
                    "control socket: refused pid %d (uid %d): %s%s",
                    *(peer.pid, peer.uid, why, _also(held)),
                )
        return why

    def _dispatch(self, channel: Channel, msg: dict[str, Any]) -> None:
        session = self._sessions.get(channel)
        if session is not None:
            session.idle_since = time.monotonic()
        request = Request(channel, msg, session)
        kind = msg.get(proto.T)
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            known = ", ".join(sorted(self._handlers))
            request.fail(f"unknown command {str(kind)[:64]!r} (expected one of: {known})")
            return
        try:
            handler(request)
        except Exception:
            log.exception("control command %r failed", kind)
            if not request.answered:
                request.fail(f"the master failed to run {kind!r}; see its log")


def _fd_ceiling() -> float:
    """The lowest descriptor number a control connection may not have: ``FD_RESERVE`` under
    the soft ``RLIMIT_NOFILE``, read each time (``prlimit`` may change it while we run).
    Descriptors are allocated lowest first, so one at or above it means few are left."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return float("inf") if soft == resource.RLIM_INFINITY else soft - FD_RESERVE


def _say_and_close(sock: socket.socket, msg: Mapping[str, Any]) -> None:
    """Send ``msg`` if the socket takes it at once (a fresh one does), then close it.

    A request the peer sent already stays unread: the peer then reads this frame, and
    ECONNRESET after it instead of EOF; chatctl expects both.
    """
    try:
        sock.setblocking(False)
        sock.send(proto.encode(msg))
    except OSError:
        pass
    finally:
        sock.close()
