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
4. No method blocks the event loop: nothing waits on the loop for a lock, a disk flush or the
   network (SQLite writes its page cache on the loop, in one short statement per batch, and
   retries a held lock later; reads, checkpoints and fsyncs run in threads; Redis is the
   network).
5. A session unused for ``ttl`` seconds is gone: ``get_session`` returns None for it.
6. Every unanswered user message has an *owner lease*: the store instance (one per worker
   process, named by its ``owner`` id, unique across hosts and restarts) that generates its
   reply, until a deadline. ``append_user`` of a new message gives the lease to the appending
   store for ``lease_s`` seconds, atomically with the append; ``renew`` extends it; the final
   event releases it; once it lapsed, ``claim`` hands it to exactly one claimer (atomic: two
   stores never both claim one message). So two live workers never generate one message, and
   a message whose worker died is generated again within about one lease. ``release(owner)``
   makes every lease of a store whose process is known to be dead lapse at once, so a worker
   death seen by the master costs no wait for the lease at all.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from chatd import faults
from chatd.errors import SessionGone

LEASE_S = faults.lease_seconds(2.0)
"""Seconds a worker owns an unanswered message it acknowledged or claimed (contract 6).

A generation renews its lease every :data:`RENEW_S`; a worker that died (or stalled for a
whole lease) lets it lapse, and the message is claimed by the worker its session resumes on,
or by some worker's periodic sweep. A worker that dies on a live host does not make anyone
wait for it: its master reaps it and has another worker :meth:`Store.release` its leases at
once. The lease is for what no master sees: a whole host dying (its master with it), a
network split. So it bounds the takeover after a host death (issue #14: regeneration within
3 s: the lease, then a sweep, ``chatd.worker.generation.SWEEP_S``), against the cost of
renewing every running message's lease every :data:`RENEW_S` (Redis: a script call per
session with a running generation, two writes per message; SQLite: one UPDATE per worker),
measured in docs/benchmarks.md. Three renewals in a row may fail (a store
hiccup, a busy loop) before it lapses; a worker stalled longer loses its generations to
another worker, which answers them instead (never both: contract 2). Tests may change it with
``CHATD_TEST_LEASE`` (:func:`chatd.faults.lease_seconds`)."""
RENEW_S = LEASE_S / 4.0
"""Seconds between two lease renewals of a worker's generations (a quarter of the lease)."""


def new_owner_id() -> str:
    """An owner id unique across hosts and restarts: ``hostname:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"


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
    session: str = ""
    """Filled by :meth:`Store.claim` only (a sweep claims across sessions); "" elsewhere."""


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
    lock_waits: int = 0  # batches that found the write gate held and waited for it (SQLite)


log = logging.getLogger("chatd.store")


class Health:
    """Whether the store works, as its own operations show: an outage made visible.

    Every read and write of a store ends in :meth:`ok` or :meth:`failed`. One failure makes
    the store *unavailable* (``chatctl status`` degraded, ``/readyz`` 503, ``chatd_store_up``
    0); only a successful :meth:`Store.probe` makes it available again (:meth:`recovered`),
    which the worker tries every second meanwhile, so it recovers by itself without client
    traffic, and a nearly full disk that lets some small writes through does not make it
    flap. One log line when it goes down and one when it comes back, not one per failure.
    """

    __slots__ = ("down_since", "failures_total", "healthy", "last_error")

    def __init__(self) -> None:
        self.healthy = True
        self.failures_total = 0
        self.last_error = ""
        self.down_since = 0.0  # monotonic(), while unhealthy

    def ok(self) -> None:
        """An operation succeeded (an unavailable store stays so until a probe passes)."""

    def recovered(self) -> None:
        """A probe passed: the store is available."""
        if not self.healthy:
            self.healthy = True
            log.warning(
                "session store available again after %.1fs",
                time.monotonic() - self.down_since,
            )

    def failed(self, exc: BaseException) -> None:
        """An operation failed (an unknown session is an answer, not a failure)."""
        if isinstance(exc, SessionGone):
            return
        self.failures_total += 1
        self.last_error = (str(exc) or type(exc).__name__)[:300]
        if self.healthy:
            self.healthy = False
            self.down_since = time.monotonic()
            log.error("session store unavailable: %s", self.last_error)


class Store(Protocol):
    """What a worker needs from a session store. Every method may raise ``StoreError``."""

    health: Health
    """Updated by every read and write (see :class:`Health`)."""

    async def probe(self) -> None:
        """A write that changes no session: succeeds when the store takes writes now (a full
        disk, a Redis that refuses writes fail it), else raises StoreError."""

    async def open(self) -> None:
        """Connect, create the schema if needed. Called once per worker, after the fork."""

    async def close(self) -> None:
        """Flush pending appends and release connections and threads."""

    async def create_session(self, owner: str) -> str:
        """Create an empty session; return its new id (at least 128 random bits, URL-safe)."""

    async def get_session(self, session: str) -> SessionInfo | None:
        """The session, or None when it never existed or has expired."""

    @property
    def owner(self) -> str:
        """This store instance's owner id in leases (contract 6), unique across hosts and
        restarts (:func:`new_owner_id` unless given to the constructor)."""

    async def append_user(
        self, session: str, msg_id: str, text: str, model: str, lease_s: float = LEASE_S
    ) -> Appended:
        """Append a user message (contract 1). Raises StoreError if the session is unknown.

        A new message is leased to this store for ``lease_s`` seconds, in the same atomic
        write (contract 6); a duplicate changes no lease.
        """

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

    async def claim(self, session: str | None, lease_s: float, limit: int) -> list[Event]:
        """Take the lease of up to ``limit`` unanswered user messages whose lease lapsed.

        In ``session``, or with None across every session (the periodic sweep: one query,
        not one per session). Atomic: a message is claimed by one store only, and its lease
        is then this store's for ``lease_s`` seconds. Returns the claimed ``user`` events,
        each with its ``session`` filled in, in (session, seq) order. A message whose lease
        is held (by anyone, this store included) is not claimed. A claim whose answer was
        lost (a connection error) leaves the messages leased to this store until the lease
        lapses; then they are claimable again: late, never twice at once.
        """

    async def renew(self, session: str, msg_ids: Sequence[str], lease_s: float) -> set[str]:
        """Extend this store's leases on ``msg_ids`` of ``session`` to now + ``lease_s``.

        Returns the ids whose lease this store still held (lapsed but not yet claimed by
        another counts as held); a missing id was answered or claimed by another store: its
        generation here should stop. ``lease_s`` 0 hands the leases over at once (a worker
        that stops before answering: the next claim takes them). Calls made in the same
        event-loop tick share one store round trip.
        """

    async def release(self, owner: str) -> int:
        """Make every lease ``owner`` (another store's id) holds lapse now; return how many.

        For the leases of a store whose process is known to be dead (the master reaped it):
        the next ``claim`` takes them, instead of one a lease later. Only leases still held
        by ``owner`` change (one it lost to a claim since is the claimer's, untouched); the
        messages stay unanswered and leased to nobody until claimed. Never call it for a
        store that may still be alive: its generations would be claimed by another while
        they run, two workers generating one message (the very thing leases prevent).
        """

    async def expire(self) -> int:
        """Delete sessions idle for longer than the ttl; return how many were deleted."""

    def statistics(self) -> StoreStats:
        """Counters and commit latency percentiles since ``open``."""
