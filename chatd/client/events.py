"""What a :class:`~chatd.client.ChatClient` hands to its caller: typed, immutable events.

Protocol events (``Welcome`` … ``Error``) mirror the server frames of ``docs/protocol.md``;
``Reconnecting`` and ``Closed`` describe the client's own connection. Nothing here imports
the server: the client speaks the protocol from its spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

# orjson when it is installed (several times faster per frame), else the standard library.
loads: Callable[[bytes | str], Any]
dumps: Callable[[Any], bytes]
try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a chatd dependency
    import json

    def _json_dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()

    loads = json.loads
    dumps = _json_dumps
else:
    loads = orjson.loads
    dumps = orjson.dumps


@dataclass(frozen=True, slots=True)
class Welcome:
    """The server accepted ``hello``: ``resumed`` is false for a new session (``last_seq`` 0)."""

    session: str
    last_seq: int  # the highest seq the server has stored for the session
    resumed: bool
    worker: str  # "SLOT/PID" of the serving worker, for diagnostics


@dataclass(frozen=True, slots=True)
class Ack:
    """Message ``id`` is stored (seq ``seq``) and will be answered; ``text`` is set on replay."""

    id: str
    seq: int
    text: str | None = None


@dataclass(frozen=True, slots=True)
class Queued:
    """Message ``id`` waits for an LLM slot; ``position`` 1 is next. Not stored."""

    id: str
    position: int


@dataclass(frozen=True, slots=True)
class Notice:
    """Information while message ``id`` waits (``model_loading``, ``retrying``). Not stored."""

    id: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Token:
    """A piece of the reply to ``id``: a preview only (see ``docs/client.md``, "Tokens")."""

    id: str
    text: str


@dataclass(frozen=True, slots=True)
class Reply:
    """The whole, stored answer to message ``id``: authoritative over its tokens."""

    id: str
    seq: int
    text: str
    done_reason: str  # "stop", "length" or "cancelled"
    stats: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Error:
    """An error from the server.

    ``final`` is true when the error ends message ``id``: it was stored instead of a reply
    (``seq`` set: ``busy``, ``llm_*``, ``internal``), or the message was refused as invalid
    (``bad_request``, ``too_large``: nothing stored). A final error is never resent: retrying
    means sending the text again with a **new** id. Other errors are information (``id`` may
    name a message the client resends by itself, e.g. ``rate_limited``).
    """

    code: str
    message: str
    retryable: bool
    id: str | None = None
    seq: int | None = None
    final: bool = False


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """The connection is down (``reason``); the client tries again in ``delay`` seconds.

    ``attempt`` counts the tries since the last welcome (1 = first). Tokens of replies in
    flight may be missing from here on: wait for their ``Reply``.
    """

    attempt: int
    delay: float
    reason: str


@dataclass(frozen=True, slots=True)
class Closed:
    """The client stopped for good (closed by the caller, gave up, or a fatal refusal).

    Always the last event. Unacknowledged messages are still in ``ChatClient.unacknowledged()``.
    """

    reason: str


Event: TypeAlias = Welcome | Ack | Queued | Notice | Token | Reply | Error | Reconnecting | Closed


class ClientClosed(Exception):
    """The client is closed (``reason`` says why): no more sends, no more answers."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class Statistics:
    """Counters of one client since it was created (``ChatClient.statistics()`` copies them)."""

    connects: int = 0  # connections that got a welcome
    reconnects: int = 0  # of those, the ones after the first
    resumes: int = 0  # welcomes with resumed=true
    duplicates_dropped: int = 0  # stored events seen again (seq <= last_seq), not handed over
    acked: int = 0  # messages of this client acknowledged (removed from the outbox)
    replies: int = 0  # Reply events handed over
    errors: int = 0  # final Error events handed over
    resent: int = 0  # outbox frames written at a welcome or after a rate limit (not by send)
    rate_limited: int = 0  # rate_limited answers (each one resent later)
    stalls: int = 0  # reconnects because answers were awaited and nothing came
    seq_rewinds: int = 0  # welcomes whose last_seq was below ours (the store lost events)
