"""One framed connection in the master's selector: a worker's link, or a chatctl client.

:class:`Channel` is non-blocking and msgpack-framed (:mod:`chatd.proto.control`): it queues
what the peer does not take at once (up to MAX_PENDING_OUT bytes, then the connection is
closed) and hands each decoded message to its callback. Runs in the master's loop only.
"""

from __future__ import annotations

import logging
import selectors
import socket
from collections.abc import Callable, Mapping
from typing import Any

from chatd.errors import ControlError
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
        self._decoder_fed = 0  # bytes read so far
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
        try:
            data = proto.encode(msg, max_frame=self._max_frame)
        except ControlError as exc:  # e.g. an answer echoing a huge id: that peer's problem
            log.warning("%s: cannot send a reply (%s); closing", self.name, exc)
            self.close()
            return False
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

    def read_remaining(self) -> None:
        """Handle what the peer wrote before it went away (its process has exited: its last
        messages, a final ``stats`` or ``handoff_done``, may still be in the socket), then
        stop at the end of the data."""
        while not self.closed:
            before = self._decoder_fed
            self._read()
            if self._decoder_fed == before:
                return

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
        self._decoder_fed += len(data)
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
