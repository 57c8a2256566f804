"""The chat protocol, version 1, without I/O: client frames in, actions out.

Theory of operation
-------------------
One :class:`ChatConnection` exists per WebSocket connection. The I/O layer
(``chatd.worker.connection``) feeds it every frame it receives (:meth:`ChatConnection.receive_text`,
:meth:`ChatConnection.receive_binary`) and executes the actions it returns, in order:

- :class:`Send`: write this text frame to the client;
- :class:`Close`: close the WebSocket with this code and reason;
- :class:`Hello`: look the session up (or create it), then call
  :meth:`ChatConnection.welcomed` or :meth:`ChatConnection.hello_failed`;
- :class:`Message`: store the user message, acknowledge it, generate the reply;
- :class:`Cancel`: abort the generation of a message.

Rule 1: this module decides *what* happens; it never does it. It holds no socket, no loop, no
clock: time comes in as an argument (``now``, in seconds, monotonic).
Rule 2: a bad frame only ever produces an ``error`` frame (or, after ten in a row, a 1008 close)
on its own connection; nothing here raises into the I/O layer.

The server frames are built by the ``*_frame`` functions at the bottom, as JSON text (UTF-8
bytes, to be sent as *text* frames).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from chatd.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 64
MAX_BAD_FRAMES = 10  # in a row; then close 1008

# Close codes (RFC 6455 and protocol.md).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013

RETRYABLE = {
    "bad_request": False,
    "too_large": False,
    "rate_limited": True,
    "busy": True,
    "llm_timeout": True,
    "llm_unavailable": True,
    "llm_error": False,
    "unknown_session": False,
    "shutting_down": True,
    "store_unavailable": True,
    "internal": True,
}
"""Every error code of the protocol, with whether the client may retry."""


# --- client frames -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """``hello``: resume ``session`` from ``last_seq``, or create a session when None."""

    session: str | None
    last_seq: int


@dataclass(frozen=True, slots=True)
class Message:
    """``message``: a user turn. ``model`` is None for the configured default."""

    id: str
    text: str
    model: str | None


@dataclass(frozen=True, slots=True)
class Cancel:
    """``cancel``: stop generating the reply to message ``id``."""

    id: str


@dataclass(frozen=True, slots=True)
class Ping:
    """``ping``: answered by ``pong``."""


ClientFrame = Hello | Message | Cancel | Ping


@dataclass(frozen=True, slots=True)
class Limits:
    """What the parser and the state machine enforce (from ``[limits]`` and ``[llm]``)."""

    max_message_bytes: int = 16384
    messages_per_minute: int = 60
    models: frozenset[str] = frozenset()


def _bad(message: str) -> ProtocolError:
    return ProtocolError("bad_request", message)


def _get_id(obj: Mapping[str, Any], kind: str) -> str:
    value = obj.get("id")
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_CHARS:
        raise _bad(f"{kind}.id must be a string of 1 to {MAX_ID_CHARS} characters.")
    return value


def parse_frame(data: str | bytes, limits: Limits) -> ClientFrame:
    """Parse and validate one client text frame.

    Raises:
        ProtocolError: with code ``bad_request`` or ``too_large`` and one sentence saying what
            is wrong.
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _bad("The frame is not valid JSON.") from None
    if not isinstance(obj, dict):
        raise _bad("A frame must be a JSON object with a string field 'type'.")
    kind = obj.get("type")
    if kind == "message":
        return _parse_message(obj, limits)
    if kind == "hello":
        return _parse_hello(obj)
    if kind == "cancel":
        return Cancel(_get_id(obj, "cancel"))
    if kind == "ping":
        return Ping()
    if not isinstance(kind, str):
        raise _bad("A frame must be a JSON object with a string field 'type'.")
    raise _bad(f"Unknown frame type {kind[:40]!r}: expected hello, message, cancel or ping.")


def _parse_hello(obj: Mapping[str, Any]) -> Hello:
    session = obj.get("session")
    if session is not None and (not isinstance(session, str) or not 1 <= len(session) <= 128):
        raise _bad("hello.session must be a session id string, or absent for a new session.")
    last_seq = obj.get("last_seq", 0)
    if not isinstance(last_seq, int) or isinstance(last_seq, bool) or last_seq < 0:
        raise _bad("hello.last_seq must be an integer >= 0.")
    return Hello(session, last_seq)


def _parse_message(obj: Mapping[str, Any], limits: Limits) -> Message:
    msg_id = _get_id(obj, "message")
    text = obj.get("text")
    if not isinstance(text, str) or not text:
        raise _bad("message.text must be a non-empty string.")
    if len(text) > limits.max_message_bytes or len(text.encode()) > limits.max_message_bytes:
        raise ProtocolError(
            "too_large",
            f"message.text is over the limit of {limits.max_message_bytes} bytes: "
            "shorten it or split it into several messages.",
        )
    model = obj.get("model")
    if model is not None and (not isinstance(model, str) or model not in limits.models):
        names = ", ".join(sorted(limits.models))
        raise _bad(f"message.model {str(model)[:60]!r} is not configured (available: {names}).")
    return Message(msg_id, text, model)


# --- actions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``frame`` (JSON text, UTF-8) to the client as a text frame."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Close the WebSocket with ``code`` and ``reason``."""

    code: int
    reason: str


Action = Send | Close | Hello | Message | Cancel


class State(enum.Enum):
    """Where a connection is: waiting for ``hello``, resolving it, open, or closed."""

    AWAITING_HELLO = "awaiting_hello"
    RESOLVING = "resolving"  # hello sent to the store; frames wait for the answer
    OPEN = "open"
    CLOSED = "closed"


class ChatConnection:
    """The state of one client connection (see the module docstring for the contract).

    Args:
        limits: what frames are accepted.
        now: the monotonic time the connection opened (the rate limiter starts full).
    """

    # Slots: one per open connection, so its instance dict (~100 bytes) counts per client.
    __slots__ = ("_refilled", "_tokens", "bad_in_a_row", "limits", "opened", "session", "state")

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.state = State.AWAITING_HELLO
        self.session: str | None = None
        self.bad_in_a_row = 0
        self.opened = now  # carried on when the connection moves to another worker
        # Token bucket: messages_per_minute tokens, refilled continuously.
        self._tokens = float(limits.messages_per_minute)
        self._refilled = now

    def receive_text(self, data: str | bytes, now: float) -> list[Action]:
        """Handle one text frame; returns the actions to execute, in order."""
        if self.state is State.CLOSED:
            return []
        try:
            frame = parse_frame(data, self.limits)
        except ProtocolError as exc:
            return self._bad_frame(exc.code, exc.message)
        return self._dispatch(frame, now)

    def receive_binary(self) -> list[Action]:
        """Handle one binary frame: a protocol error (text frames only)."""
        if self.state is State.CLOSED:
            return []
        return self._bad_frame("bad_request", "Binary frames are not supported: send JSON text.")

    def _dispatch(self, frame: ClientFrame, now: float) -> list[Action]:
        if isinstance(frame, Ping):
            self.bad_in_a_row = 0
            return [Send(PONG)]
        if isinstance(frame, Hello):
            if self.state is not State.AWAITING_HELLO:
                return self._bad_frame("bad_request", "hello was already received.")
            self.bad_in_a_row = 0
            self.state = State.RESOLVING
            return [frame]
        if self.state is not State.OPEN:
            return self._bad_frame("bad_request", "The first frame must be hello.")
        self.bad_in_a_row = 0
        if isinstance(frame, Message) and not self._take_token(now):
            return [
                Send(
                    error_frame(
                        "rate_limited",
                        f"More than {self.limits.messages_per_minute} messages a minute on this "
                        "connection: wait a few seconds and resend with the same id.",
                        msg_id=frame.id,
                    )
                )
            ]
        return [frame]

    def _take_token(self, now: float) -> bool:
        rate = self.limits.messages_per_minute / 60.0
        cap = float(self.limits.messages_per_minute)
        self._tokens = min(cap, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _bad_frame(self, code: str, message: str) -> list[Action]:
        self.bad_in_a_row += 1
        actions: list[Action] = [Send(error_frame(code, message))]
        if self.bad_in_a_row >= MAX_BAD_FRAMES:
            self.state = State.CLOSED
            actions.append(Close(CLOSE_POLICY, f"{MAX_BAD_FRAMES} bad frames in a row"))
        return actions

    def limiter_state(self, now: float) -> tuple[float, float]:
        """The rate limiter as it stands at ``now``: its tokens and the seconds since their
        last refill (a connection that moves carries them: :mod:`chatd.proto.adoption`)."""
        return self._tokens, max(0.0, now - self._refilled)

    def adopted(
        self, session: str, tokens: float, refill_age: float, bad: int, age: float, now: float
    ) -> None:
        """Open on ``session`` as moved from another worker: no hello; the limiter, the
        bad-frame count and the connection's age carried on (the tokens clamped to this
        connection's limit)."""
        self.welcomed(session)
        self.opened = now - age
        self._tokens = min(float(self.limits.messages_per_minute), tokens)
        self._refilled = now - refill_age
        self.bad_in_a_row = bad

    def welcomed(self, session: str) -> None:
        """The store resolved the hello: the connection is open on ``session``."""
        self.state = State.OPEN
        self.session = session

    def hello_failed(self) -> None:
        """The hello named an unknown session: wait for another hello."""
        self.state = State.AWAITING_HELLO

    def session_gone(self) -> None:
        """The open session expired (the store no longer has it): wait for a new hello, as
        after an ``unknown_session`` answer to one (its deadline starts again)."""
        self.state = State.AWAITING_HELLO
        self.session = None

    def hello_timed_out(self) -> list[Action]:
        """The I/O layer's hello timer fired: close 1008 unless a hello came."""
        if self.state is not State.AWAITING_HELLO:
            return []
        self.state = State.CLOSED
        return [Close(CLOSE_POLICY, "no hello in time")]

    def closed(self) -> None:
        """The connection is gone; later frames are ignored."""
        self.state = State.CLOSED


# --- server frames -------------------------------------------------------------------------

PONG = b'{"type":"pong"}'


def _dump(obj: Mapping[str, Any]) -> bytes:
    return orjson.dumps(obj)


def welcome_frame(session: str, last_seq: int, resumed: bool, worker: str) -> bytes:
    """``welcome``: the answer to ``hello``."""
    return _dump(
        {
            "type": "welcome",
            "session": session,
            "last_seq": last_seq,
            "resumed": resumed,
            "worker": worker,
            "protocol": PROTOCOL_VERSION,
        }
    )


def ack_frame(msg_id: str, seq: int, text: str | None = None) -> bytes:
    """``ack``: the message is committed; ``text`` is included when replaying a stored one."""
    obj: dict[str, Any] = {"type": "ack", "id": msg_id, "seq": seq}
    if text is not None:
        obj["text"] = text
    return _dump(obj)


def queued_frame(msg_id: str, position: int) -> bytes:
    """``queued``: the message waits for an LLM slot; ``position`` 1 is next."""
    return _dump({"type": "queued", "id": msg_id, "position": position})


def notice_frame(msg_id: str, code: str, message: str) -> bytes:
    """``notice``: information while a message waits (``model_loading``, ``retrying``)."""
    return _dump({"type": "notice", "id": msg_id, "code": code, "message": message})


def token_frame(msg_id: str, text: str) -> bytes:
    """``token``: a streamed piece of the reply (several tokens may be merged into one)."""
    return _dump({"type": "token", "id": msg_id, "text": text})


def reply_frame(
    msg_id: str, seq: int, text: str, done_reason: str, stats: Mapping[str, Any]
) -> bytes:
    """``reply``: the whole stored answer to message ``msg_id``."""
    return _dump(
        {
            "type": "reply",
            "id": msg_id,
            "seq": seq,
            "text": text,
            "done_reason": done_reason,
            "stats": stats,
        }
    )


def error_frame(
    code: str, message: str, *, msg_id: str | None = None, seq: int | None = None
) -> bytes:
    """``error``: ``code`` from the protocol's table, one clear sentence, and ``retryable``."""
    obj: dict[str, Any] = {
        "type": "error",
        "code": code,
        "message": message,
        "retryable": RETRYABLE[code],
    }
    if msg_id is not None:
        obj["id"] = msg_id
    if seq is not None:
        obj["seq"] = seq
    return _dump(obj)


def stored_event_frame(
    kind: str, msg_id: str, seq: int, text: str, meta: Mapping[str, Any]
) -> bytes:
    """The frame that replays one stored event: ``ack`` with text, ``reply`` or ``error``."""
    if kind == "user":
        return ack_frame(msg_id, seq, text)
    if kind == "reply":
        return reply_frame(
            msg_id, seq, text, meta.get("done_reason", "stop"), meta.get("stats", {})
        )
    code = meta.get("code", "internal")
    return error_frame(code if code in RETRYABLE else "internal", text, msg_id=msg_id, seq=seq)
