"""The session half of :class:`~chatd.client.ChatClient`: outbox, seq, frames, timers.

:class:`SessionState` keeps what outlives a connection (the outbox of unacknowledged
messages, the highest seq handed over, the acked messages awaiting answers) and turns each
server frame into at most one event. :class:`~chatd.client.core.ChatClient` adds the
connection task and the caller's API on top of it.

Per frame the work is one JSON decode (done by the caller of the handlers), one dict lookup
and one event object: the load generator runs thousands of clients in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from chatd.client.events import (
    Ack,
    Error,
    Event,
    Notice,
    Queued,
    Reply,
    Statistics,
    Token,
    Welcome,
)

log = logging.getLogger("chatd.client")

Frame = dict[str, Any]
# The answers to a message frame other than its ack: the message was not stored. The server
# answers message frames in order, so one without an id is the oldest written and unanswered.
_REFUSALS = frozenset({"bad_request", "too_large", "internal", "rate_limited", "store_unavailable"})


class Stop(Exception):
    """Ends one connection: ``fatal`` stops the client, else it reconnects."""

    def __init__(self, reason: str, *, fatal: bool = False, immediate: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.fatal, self.immediate = reason, fatal, immediate


class SessionState:
    """Everything of a client that survives reconnects, and the handling of server frames.

    Handlers are sync (one frame in, at most one event out) except where they must write:
    ``welcome`` (resend the outbox) and ``unknown_session`` (a new hello).
    """

    def __init__(
        self,
        session: str | None,
        last_seq: int,
        on_event: Callable[[Event], object] | None,
        queue_events: bool | None,
        new_session_on_unknown: bool,
        rate_limit_delay: float,
        max_delay: float,
        stall_timeout: float | None,
    ) -> None:
        self._session = session
        self._last_seq = last_seq
        self._on_event = on_event
        self._queue: deque[Event] | None = (
            deque() if (on_event is None if queue_events is None else queue_events) else None
        )
        self._wake: asyncio.Future[None] | None = None
        self._new_session_on_unknown = new_session_on_unknown
        self._rate_delay, self._max_delay = rate_limit_delay, max_delay
        self._stall_timeout = stall_timeout
        # The outbox: message id -> its encoded frame, in send order, until acked or refused.
        self._outbox: dict[str, bytes] = {}
        # Ids written on this connection awaiting ack/refusal, in write order: the server
        # answers message frames in order, which attributes the id-less refusals.
        self._sent: dict[str, None] = {}
        self._unanswered: set[str] = set()  # our acked ids without a reply or final error yet
        self._waiters: dict[str, asyncio.Future[Reply | Error]] = {}
        self._ws: ClientConnection | None = None
        self._open = False  # welcomed on self._ws: messages may be written
        self._welcomed = False  # self._ws got a welcome (even if it is gone now)
        self._going_away = False  # shutting_down/stall: reconnect without backoff
        self._throttled = False  # rate limited: hold new writes until the timer resends
        self._throttle_n = 0
        self._throttle_timer: asyncio.TimerHandle | None = None
        self._resend_task: asyncio.Task[None] | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._rx = False  # a frame arrived since the stall timer was armed
        self._seen_above: set[int] = set()  # seqs handed over above the contiguous last_seq
        self._gap_since: float | None = None  # since when a seq is missing below one seen
        self._worker = ""
        self._stats = Statistics()
        self._ready: asyncio.Future[None] | None = None  # set by the first welcome
        self.handlers: dict[str, Callable[[Frame], Awaitable[None] | None]] = {
            "token": self._on_token,
            "ack": self._on_ack,
            "reply": self._on_reply,
            "queued": lambda f: self._emit(Queued(f["id"], f["position"])),
            "notice": lambda f: self._emit(Notice(f["id"], f["code"], f["message"])),
            "error": self._on_error,
            "welcome": self._on_welcome,
        }

    def abort_connection(self) -> None:
        """Drop the connection abruptly, as a network failure would (tests, chaos runs)."""
        ws = self._ws
        if ws is not None:
            self._open = False
            ws.transport.abort()

    # -- delivery ---------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("on_event raised; event %s", type(event).__name__)
        if self._queue is not None:
            self._queue.append(event)
            wake = self._wake
            if wake is not None and not wake.done():
                wake.set_result(None)

    def _stored(self, seq: int) -> bool:
        """Seq bookkeeping of a stored event: false for one already handed over.

        ``last_seq`` is the end of the *contiguous* run of seqs handed over (what ``hello``
        resumes from); seqs above it that arrived are kept in ``_seen_above``. A gap happens
        when an event was stored where this connection does not hear of it live (a reply
        regenerated by another worker after a takeover) while later events arrive: resuming
        from the contiguous end gets it replayed, and the seen ones are dropped here.
        """
        if seq <= self._last_seq or seq in self._seen_above:
            self._stats.duplicates_dropped += 1
            return False
        if seq == self._last_seq + 1:
            self._last_seq = seq
            while self._last_seq + 1 in self._seen_above:
                self._last_seq += 1
                self._seen_above.discard(self._last_seq)
        else:
            self._seen_above.add(seq)
        if not self._seen_above:
            self._gap_since = None
        elif self._gap_since is None:
            self._gap_since = time.monotonic()
        return True

    def _answer(self, msg_id: str, answer: Reply | Error) -> None:
        self._unanswered.discard(msg_id)
        self._emit(answer)
        future = self._waiters.get(msg_id)
        if future is not None and not future.done():
            future.set_result(answer)

    # -- frames ------------------------------------------------------------------------------

    def _on_token(self, f: Frame) -> None:
        self._emit(Token(f["id"], f["text"]))

    def _on_ack(self, f: Frame) -> None:
        msg_id, seq = f["id"], f["seq"]
        if "text" not in f:  # a live ack answers a frame we wrote (a replayed one carries text)
            self._sent.pop(msg_id, None)
        ours = self._outbox.pop(msg_id, None) is not None
        if ours:
            self._stats.acked += 1
            self._throttle_n = 0
        if self._stored(seq):
            if ours:
                self._unanswered.add(msg_id)
                self._arm_stall()
            self._emit(Ack(msg_id, seq, f.get("text")))

    def _on_reply(self, f: Frame) -> None:
        if self._stored(f["seq"]):
            self._stats.replies += 1
            self._answer(f["id"], Reply(f["id"], f["seq"], f["text"], f["done_reason"], f["stats"]))

    def _on_error(self, f: Frame) -> Awaitable[None] | None:
        code, message, retryable = f["code"], f["message"], bool(f["retryable"])
        msg_id: str | None = f.get("id")
        seq: int | None = f.get("seq")
        if seq is not None:  # stored: it ends message msg_id
            if self._stored(seq):
                self._stats.errors += 1
                self._answer(str(msg_id), Error(code, message, retryable, msg_id, seq, True))
            return None
        if code == "shutting_down":  # 1001 follows: resume elsewhere at once
            self._going_away = True
            return None
        if code == "unknown_session":
            return self._on_unknown_session(Error(code, message, retryable))
        if not self._open:  # e.g. internal while resolving hello: start over
            raise Stop(f"{code} before welcome: {message}")
        if msg_id is None and code in _REFUSALS and self._sent:
            msg_id = next(iter(self._sent))  # answers come in order: the oldest unanswered
        # A refusal of a message still in the outbox (a replayed ack may have come first).
        if (
            code in _REFUSALS
            and msg_id is not None
            and self._sent.pop(msg_id, 0) is None
            and msg_id in self._outbox
        ):
            if code in ("bad_request", "too_large"):  # invalid: resending would repeat it
                del self._outbox[msg_id]
                self._stats.errors += 1
                self._answer(msg_id, Error(code, message, retryable, msg_id, None, True))
                return None
            self._stats.rate_limited += code == "rate_limited"
            self._throttle()  # rate_limited, internal: not stored; resend the same id later
        self._emit(Error(code, message, retryable, msg_id))
        return None

    async def _on_unknown_session(self, error: Error) -> None:
        self._emit(error)
        for msg_id in self._unanswered:  # acked in a session that is gone: never answered
            future = self._waiters.get(msg_id)
            if future is not None and not future.done():
                future.set_result(error)
        self._unanswered.clear()
        if not self._new_session_on_unknown:
            raise Stop("unknown_session: the session expired or does not exist", fatal=True)
        # (Mid-session too: a message on a session that expired while connected.) Nothing
        # is written until the new session's welcome: the server waits for the hello.
        self._open = False
        self._sent.clear()  # written for the session that is gone: resent in the new one
        self._session, self._last_seq = None, 0
        self._seen_above.clear()
        self._gap_since = None
        assert self._ws is not None
        await self._ws.send(b'{"type":"hello"}', text=True)

    async def _on_welcome(self, f: Frame) -> None:
        self._open = self._welcomed = True
        self._session, self._worker = f["session"], f["worker"]
        if f["last_seq"] < self._last_seq:  # the store lost events: take its numbering
            self._stats.seq_rewinds += 1
            self._last_seq = f["last_seq"]
            self._seen_above.clear()
            self._gap_since = None
        stats = self._stats
        stats.connects += 1
        stats.reconnects += stats.connects > 1
        stats.resumes += bool(f["resumed"])
        self._emit(Welcome(f["session"], f["last_seq"], bool(f["resumed"]), f["worker"]))
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        self._arm_stall()
        await self._resend()

    # -- writing -------------------------------------------------------------------------------

    async def _write(self, ws: ClientConnection, msg_id: str, frame: bytes) -> None:
        self._sent[msg_id] = None  # before the write: the order of _sent is the wire order
        with contextlib.suppress(ConnectionClosed):  # stays in the outbox: resent on welcome
            await ws.send(frame, text=True)

    async def _resend(self) -> None:
        """Write every outbox message not yet written on this connection, in send order."""
        self._throttled = False
        if self._throttle_timer is not None:
            self._throttle_timer.cancel()
            self._throttle_timer = None
        ws = self._ws
        for msg_id, frame in list(self._outbox.items()):
            if not self._open or self._throttled or ws is not self._ws or ws is None:
                return
            if msg_id in self._outbox and msg_id not in self._sent:
                self._stats.resent += 1
                await self._write(ws, msg_id, frame)

    def _throttle(self) -> None:
        """Hold writes, and resend the outbox after a jittered, doubling delay."""
        self._throttled = True
        if self._throttle_timer is None:
            base = min(self._max_delay, self._rate_delay * 2.0 ** min(self._throttle_n, 16))
            self._throttle_n += 1
            self._throttle_timer = asyncio.get_running_loop().call_later(
                base * random.uniform(0.5, 1.0), self._throttle_over
            )

    def _throttle_over(self) -> None:
        self._throttle_timer = None
        self._throttled = False
        if self._open:  # the task is kept: the loop holds only a weak reference to it
            self._resend_task = asyncio.get_running_loop().create_task(self._resend())

    def _arm_stall(self) -> None:
        if self._stall_timeout is not None and self._stall_timer is None and self._unanswered:
            self._rx = False
            loop = asyncio.get_running_loop()
            self._stall_timer = loop.call_later(self._stall_timeout, self._check_stall)

    def _check_stall(self) -> None:
        self._stall_timer = None
        if not self._unanswered or not self._open:
            return
        gap = self._gap_since is not None and (
            time.monotonic() - self._gap_since >= (self._stall_timeout or 0.0)
        )
        if self._rx and not gap:  # something came meanwhile: look again one period later
            self._arm_stall()
            return
        # Answers are awaited and nothing came for a whole period: the reply may be generated
        # on another worker (only the worker generating it streams it live): resume again.
        self._stats.stalls += 1
        self._going_away = True
        self.abort_connection()
