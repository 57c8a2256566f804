"""chatctl's commands as the control server hands them over: :class:`Request` (answer it
now or later), the handler table :class:`Commands`, and :class:`Clock`, the timers that ride on
the master loop's turns."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from chatd.master.channel import Channel
from chatd.proto import control as proto


class Clock(Protocol):
    """Timers that run on the master loop's turns: it sleeps at most ``timeout(now,
    longest)`` seconds, then calls ``tick(now)`` (``now``: ``time.monotonic()``)."""

    def timeout(self, now: float, longest: float) -> float: ...

    def tick(self, now: float) -> None: ...


class Request:
    """One command from chatctl. The handler answers with :meth:`ok` or :meth:`fail`.

    It may answer later (a reload will answer when the new generation is ready): it keeps the
    request and calls :meth:`ok` then; meanwhile the connection is not idle. If the client has
    gone by then, the answer is dropped.
    """

    def __init__(
        self, channel: Channel, msg: dict[str, Any], session: Session | None = None
    ) -> None:
        self.msg = msg
        self.answered = False
        self._channel = channel
        self._session = session
        if session is not None:
            session.pending += 1

    def ok(self, data: Mapping[str, Any]) -> None:
        self._answered()
        self._channel.send(proto.ok_reply(self.msg, data))

    def fail(self, error: str) -> None:
        self._answered()
        self._channel.send(proto.error_reply(self.msg, error))

    def hold(self) -> None:
        """Keep the connection open after the answer, however long, until the master exits
        (``stop``: the caller waits for EOF to know that the master has gone)."""
        if self._session is not None:
            self._session.held = True

    def _answered(self) -> None:
        if not self.answered and self._session is not None:
            self._session.pending -= 1
            self._session.idle_since = time.monotonic()
        self.answered = True


class Session:
    """What the server knows of one chatctl connection, for the idle timeout."""

    __slots__ = ("channel", "held", "idle_since", "pending")

    def __init__(self, channel: Channel, now: float) -> None:
        self.channel = channel
        self.pending = 0  # requests not answered yet
        self.held = False  # told to stay open until the master exits
        self.idle_since = now  # the last complete request or answer

    def deadline(self, idle_timeout: float) -> float | None:
        """When it is closed for idleness, or None while it waits for something."""
        if self.pending or self.held:
            return None
        return self.idle_since + idle_timeout


Handler = Callable[[Request], None]


class Commands(dict[str, Handler]):
    """The control server's handlers by command type, and the master loop's timers
    (``clocks``: each :class:`Clock` gets ``timeout`` and ``tick`` on every turn) where a
    :class:`ControlServer` built with it adds itself."""

    def __init__(self, handlers: Mapping[str, Handler], clocks: list[Clock]) -> None:
        super().__init__(handlers)
        self.clocks = clocks
