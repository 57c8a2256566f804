"""The session store's interface, shared by the SQLite and the Redis implementations.

A session is an append-only log of events, numbered by a per-session ``seq`` that starts at 1,
strictly increases and is never reused. Three kinds of events are stored:

- ``user``: a user message (``msg_id`` chosen by the client, unique per session);
- ``reply``: the whole reply to a user message;
- ``error``: a final error that ends a user message instead of a reply.

Contracts every implementation keeps (the store tests check them on each):

1. ``append_user`` is idempotent on ``(session, msg_id)``: a repeated id returns the original
   ``seq`` with ``duplicate=True`` and stores nothing.
2. ``append_final`` stores at most one final event (reply or error) per ``(session, msg_id)``:
   a second call returns the first one's ``seq`` with ``duplicate=True``.
3. A coroutine that returned has committed: the row survives the death of the process.
4. No method blocks the event loop: I/O happens off the loop (a thread or the network).
5. A session unused for ``ttl`` seconds is gone: ``get_session`` returns None for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

EventKind = Literal["user", "reply", "error"]


@dataclass(frozen=True, slots=True)
class Event:
    """One stored event of a session log.

    ``meta`` holds the kind's extra fields: for ``user`` ``{"model": str}``; for ``reply``
    ``{"done_reason": str, "stats": {...}}``; for ``error`` ``{"code": str, "retryable": bool}``.
    """

    seq: int
    kind: EventKind
    msg_id: str
    text: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    ts: float = 0.0


@dataclass(frozen=True, slots=True)
class Appended:
    """Result of an append: the event's ``seq`` and whether it was already stored."""

    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What the store knows of a session (``owner`` is a hash of the auth token, or "")."""

    session: str
    owner: str
    last_seq: int
    updated_at: float


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Introspection for status and benchmarks; latencies in milliseconds."""

    commits: int
    rows: int
    commit_p50_ms: float
    commit_p99_ms: float
    busy_retries: int


class Store(Protocol):
    """What a worker needs from a session store. Every method may raise ``StoreError``."""

    async def open(self) -> None:
        """Connect, create the schema if needed. Called once per worker, after the fork."""

    async def close(self) -> None:
        """Flush pending appends and release connections and threads."""

    async def create_session(self, owner: str) -> str:
        """Create an empty session; return its new id (at least 128 random bits, URL-safe)."""

    async def get_session(self, session: str) -> SessionInfo | None:
        """The session, or None when it never existed or has expired."""

    async def append_user(self, session: str, msg_id: str, text: str, model: str) -> Appended:
        """Append a user message (contract 1). Raises StoreError if the session is unknown."""

    async def append_final(
        self, session: str, msg_id: str, kind: EventKind, text: str, meta: Mapping[str, Any]
    ) -> Appended:
        """Append the reply or final error of ``msg_id`` (contract 2)."""

    async def events_after(self, session: str, after_seq: int) -> list[Event]:
        """Every event with ``seq > after_seq``, in order."""

    async def history(self, session: str, turns: int) -> list[Event]:
        """The last ``turns`` answered turns: each ``user`` event followed by its ``reply``.

        User messages that ended in an error or are not answered yet are left out, so the
        message being answered never appears twice and the model never sees two user turns
        in a row. An unknown session gives ``[]``.
        """

    async def unanswered(self, session: str) -> list[Event]:
        """The ``user`` events that have no final event yet, in order."""

    async def expire(self) -> int:
        """Delete sessions idle for longer than the ttl; return how many were deleted."""

    def statistics(self) -> StoreStats:
        """Counters and commit latency percentiles since ``open``."""
