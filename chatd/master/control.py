"""Master side of the control channel: framed connections, the chatctl listener, status.

Everything here runs inside the master's single-threaded ``selectors`` loop (no asyncio, no
threads): each socket is registered with a callback as its selector ``data``, and the master's
loop calls ``key.data(mask)``.

* :class:`Channel` is one non-blocking, msgpack-framed connection: a worker's link (the master's
  end of its socketpair) or one chatctl client.
* :class:`ControlServer` is the Unix socket chatctl connects to. It turns each frame into a
  :class:`Request` and dispatches it by its ``t`` to a handler the master registered. A garbage
  or oversized frame closes that one connection and is logged; nothing else is affected.
  Each peer's credentials are checked when it connects (:mod:`chatd.master.peercred`): a peer that
  is not allowed gets ``{"ok": false, "error": "permission denied: ..."}`` and is closed.

The ``status`` document itself is built in :mod:`chatd.master.status`.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import stat
from collections.abc import Callable, Mapping
from typing import Any

from chatd.errors import ControlError
from chatd.master import peercred
from chatd.proto import control as proto

log = logging.getLogger("chatd.control")

MAX_PENDING_OUT = 4 * proto.MAX_FRAME
"""Bytes queued for a peer that does not read before its connection is closed."""


class Channel:
    """One framed connection registered in the master's selector.

    Messages go to ``on_message(channel, msg)`` in order. When the connection ends, for any
    reason (EOF, a write error, garbage from the peer, :meth:`close`), ``on_close(channel)`` is
    called exactly once.
    """

    def __init__(
        self,
        sel: selectors.BaseSelector,
        sock: socket.socket,
        *,
        name: str,
        on_message: Callable[[Channel, dict[str, Any]], None],
        on_close: Callable[[Channel], None],
        max_frame: int = proto.MAX_FRAME,
    ) -> None:
        self.name = name
        self.sock = sock
        self.closed = False
        self._sel = sel
        self._decoder = proto.Decoder(max_frame)
        self._max_frame = max_frame
        self._out = bytearray()
        self._on_message = on_message
        self._on_close = on_close
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, self._on_event)

    def send(self, msg: Mapping[str, Any]) -> bool:
        """Queue ``msg`` for the peer; False when the channel is closed (or closes on the way)."""
        if self.closed:
            return False
        data = proto.encode(msg, max_frame=self._max_frame)
        if not self._out:
            try:
                data = data[self.sock.send(data) :]
            except BlockingIOError:
                pass
            except OSError as exc:
                log.debug("%s: write failed: %s", self.name, exc)
                self.close()
                return False
        if data:
            if len(self._out) + len(data) > MAX_PENDING_OUT:
                log.warning("%s: the peer does not read its replies; closing", self.name)
                self.close()
                return False
            self._out += data
            self._sel.modify(
                self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self._on_event
            )
        return True

    def close(self) -> None:
        """Unregister and close the socket, then call ``on_close`` (once)."""
        if self.closed:
            return
        self.closed = True
        self._sel.unregister(self.sock)
        self.sock.close()
        self._on_close(self)

    def close_in_child(self) -> None:
        """In a freshly forked worker: drop the fd, but leave the selector alone.

        The epoll instance is shared with the master across the fork, so unregistering here
        would unregister the master's socket too.
        """
        self.closed = True
        self.sock.close()

    def _on_event(self, mask: int) -> None:
        if not self.closed and mask & selectors.EVENT_WRITE:
            self._flush()
        if not self.closed and mask & selectors.EVENT_READ:
            self._read()

    def _flush(self) -> None:
        try:
            del self._out[: self.sock.send(self._out)]
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("%s: write failed: %s", self.name, exc)
            self.close()
            return
        if not self._out:
            self._sel.modify(self.sock, selectors.EVENT_READ, self._on_event)

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("%s: read failed: %s", self.name, exc)
            self.close()
            return
        if not data:
            self.close()
            return
        try:
            messages = self._decoder.feed(data)
        except ControlError as exc:
            log.warning("%s: %s; closing this connection", self.name, exc)
            self.close()
            return
        for msg in messages:
            if self.closed:
                break
            self._on_message(self, msg)


class Request:
    """One command from chatctl. The handler answers with :meth:`ok` or :meth:`fail`.

    It may answer later (a reload will answer when the new generation is ready): it keeps the
    request and calls :meth:`ok` then. If the client has gone by then, the answer is dropped.
    """

    def __init__(self, channel: Channel, msg: dict[str, Any]) -> None:
        self.msg = msg
        self.answered = False
        self._channel = channel

    def ok(self, data: Mapping[str, Any]) -> None:
        self.answered = True
        self._channel.send(proto.ok_reply(self.msg, data))

    def fail(self, error: str) -> None:
        self.answered = True
        self._channel.send(proto.error_reply(self.msg, error))


Handler = Callable[[Request], None]


class ControlServer:
    """The chatctl listener at ``[control] socket`` and its client connections.

    Args:
        sel: the master's selector.
        path: where the socket lives; the parent directory is created when missing.
        mode: permission bits applied to the socket file.
        handlers: command type (``"status"``, ...) -> handler.
    """

    def __init__(
        self,
        sel: selectors.BaseSelector,
        path: str,
        mode: int,
        handlers: Mapping[str, Handler],
    ) -> None:
        self.path = path
        self._mode = mode
        self._sel = sel
        self._handlers = dict(handlers)
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._clients: set[Channel] = set()

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
        for client in list(self._clients):
            client.close()
        if self._listener is None:
            return
        self._sel.unregister(self._listener)
        self._listener.close()
        self._listener = None
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close_in_child(self) -> None:
        """In a freshly forked worker: close the fds, leave the shared selector and file alone."""
        for client in self._clients:
            client.close_in_child()
        if self._listener is not None:
            self._listener.close()

    def _on_accept(self, mask: int) -> None:
        if self._listener is None:
            return
        try:
            sock, _ = self._listener.accept()
        except OSError as exc:
            # EMFILE and friends: log and keep serving the connections we have.
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED):
                log.warning("control socket: accept failed: %s", exc)
            return
        denied = self._refusal(sock)
        client = Channel(
            self._sel,
            sock,
            name="control connection",
            # A refused peer's request is read (closing a Unix socket with unread data would
            # turn our answer into ECONNRESET on its side), then the connection is closed.
            on_message=self._dispatch if denied is None else lambda ch, _: ch.close(),
            on_close=self._clients.discard,
        )
        self._clients.add(client)
        if denied is not None:
            client.send({"ok": False, "error": denied})

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
            log.warning("control socket: refused pid %d (uid %d): %s", peer.pid, peer.uid, why)
        return why

    def _dispatch(self, channel: Channel, msg: dict[str, Any]) -> None:
        request = Request(channel, msg)
        kind = msg.get(proto.T)
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            known = ", ".join(sorted(self._handlers))
            request.fail(f"unknown command {kind!r} (expected one of: {known})")
            return
        try:
            handler(request)
        except Exception:
            log.exception("control command %r failed", kind)
            if not request.answered:
                request.fail(f"the master failed to run {kind!r}; see its log")
