"""What a client connection's frames do: hello, messages and cancels against the hub and the
store, and what every connection of a worker shares.

:func:`run_actions` executes the actions the protocol core
(:class:`chatd.proto.chat.ChatConnection`) returns for a frame: a ``hello`` creates or resumes
the session (welcome, then the replay of what the client missed), a message is stored and
acknowledged and handed to the hub, a cancel reaches it. :class:`WorkerState` is what every
connection shares, :class:`WsSink` how an outbox writes to a connection; the connection's
own life (reading frames, the hello deadline, cleanup) is :mod:`chatd.worker.connection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from chatd.errors import SessionGone, StoreError
from chatd.logs import about
from chatd.proto import adoption, chat
from chatd.store.base import Event, Store
from chatd.worker.generation import Hub
from chatd.worker.http import token_of
from chatd.worker.outbox import OutboundBudget, Outbox

log = logging.getLogger("chatd.session")


@dataclass(slots=True)
class WorkerState:
    """What every connection of a worker shares."""

    hub: Hub
    store: Store
    limits: chat.Limits
    hello_timeout: float
    worker_name: str  # "SLOT/PID", sent in welcome
    budget: OutboundBudget  # the bounds on what slow readers leave unread
    auth_on: bool = False
    draining: bool = False
    handover: bool = False  # draining because another worker takes over (not a stop)
    # Set once a drain's graceful time is over: messages are no longer acknowledged (the
    # client resends them, same id, where it resumes), as the generations left are handed
    # over to other workers and the connections close.
    closing: bool = False
    # Each open connection, with its protocol state and outbox (a drain closes those with
    # nothing in flight first).
    connections: dict[ServerConnection, tuple[chat.ChatConnection, Outbox]] = field(
        default_factory=dict
    )
    connections_total: int = 0
    bad_frames_total: int = 0
    # Open connections per client address (max_connections_per_ip).
    per_ip: dict[str, int] = field(default_factory=dict)
    # Tasks the connections start and nobody awaits (closes of slow readers, gap fills,
    # hello deadlines): kept referenced until done (:meth:`keep`).
    closers: set[asyncio.Task[None]] = field(default_factory=set)
    # Connections handed over to another worker (chatd.worker.mover): they end quietly here.
    handed_off: set[ServerConnection] = field(default_factory=set)

    def keep(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task held in :attr:`closers` until it is done (the event loop
        holds tasks only weakly: one nobody references may be collected mid-way)."""
        task = asyncio.ensure_future(work)
        self.closers.add(task)
        task.add_done_callback(self.closers.discard)


class WsSink:
    """The outbox's :class:`~chatd.worker.outbox.FrameSink` on a websockets connection.

    :meth:`write` frames the messages with the connection's sans-I/O protocol object and
    hands all the bytes to the transport in one ``writelines`` (one system call for a tick's
    frames), which is what websockets' own ``send`` does per message, minus its per-call
    context manager and flow-control wait: the caller only writes when :meth:`writable`, so
    there is nothing to wait for. :meth:`send` is websockets' ``send``, flow control included.
    """

    __slots__ = ("_ws",)

    def __init__(self, ws: ServerConnection) -> None:
        self._ws = ws

    def writable(self) -> bool:
        ws = self._ws
        transport = ws.transport
        return (
            ws.protocol.state is State.OPEN
            and not transport.is_closing()
            and transport.get_write_buffer_size() < transport.get_write_buffer_limits()[1]
        )

    def write(self, frames: Sequence[bytes]) -> None:
        protocol = self._ws.protocol
        for frame in frames:
            protocol.send_text(frame)
        # While OPEN, data_to_send() holds frames only (no end-of-stream marker).
        self._ws.transport.writelines(protocol.data_to_send())

    async def send(self, frame: bytes) -> None:
        await self._ws.send(frame, text=True)

    def buffered(self) -> int:
        return self._ws.transport.get_write_buffer_size()


def owner_of(ws: ServerConnection, auth_on: bool) -> str:
    """A hash of the auth token the connection presented ("" when auth is off); for a
    connection moved from another worker, the hash it carried (the token never travels)."""
    carried: str | None = getattr(ws, "carried_owner", None)
    if carried is not None:
        return carried if auth_on else ""
    if not auth_on or ws.request is None:
        return ""
    token = token_of(ws.request)
    return token_hash(token) if token else ""


def token_hash(token: str) -> str:
    """The owner of the sessions a token creates: its SHA-256, 32 hex digits."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def client_key(ws: ServerConnection, auth_on: bool) -> str:
    """The key the master's slot queue serves round robin and bounds per client: the hash of
    the auth token (:func:`owner_of`) when auth is on, else the peer's address."""
    if auth_on:
        return owner_of(ws, auth_on)
    return ws.remote_address[0] if ws.remote_address else ""


def _session_expired(
    state: WorkerState, conn: chat.ChatConnection, outbox: Outbox, msg_id: str
) -> bytes:
    """The error frame for a message whose session expired; the connection waits for a new
    hello (the frames after this one in the same batch of actions are dropped: they need a
    session)."""
    assert conn.session is not None
    state.hub.unsubscribe(conn.session, outbox)
    log.info("session %s expired while connected", conn.session[:12], extra=about(conn.session))
    conn.session_gone()
    outbox.restore(0, ())  # what was sent is by seq of that session: the next one starts at 1
    state.hub.stats.error("unknown_session")
    return chat.error_frame(
        "unknown_session",
        "This session expired (idle for longer than the server keeps sessions): the message "
        "was not stored. Send hello without a session to start a new one.",
        msg_id=msg_id,
    )


def store_unavailable(
    state: WorkerState, exc: StoreError, session: str | None, msg_id: str | None
) -> bytes:
    """The error frame for a store failure (``msg_id``: the message not acknowledged),
    counted, and logged with a reference the client sees. The store's own health turns
    unavailable with the failure (:class:`chatd.store.base.Health`): status, /readyz and
    /metrics show it."""
    ref = f"{os.getpid()}-{int(time.time() * 1000) % 100000000}"
    log.warning(
        "session store failed (log reference %s): %s", ref, exc, extra=about(session, msg_id)
    )
    state.hub.stats.error("store_unavailable")
    if msg_id is not None:
        what = "the message was not stored: send it again with the same id in a moment"
    else:
        what = "send hello again in a moment"
    return chat.error_frame(
        "store_unavailable",
        f"The session store is unavailable (log reference {ref}): {what}.",
        msg_id=msg_id,
    )


def too_slow(ws: ServerConnection, state: WorkerState, unread: int, total: int) -> None:
    """The outbox is over a bound: close the connection with 1008. Its replies stay in the
    store for its resume. The close frame may never get through to a client that reads
    nothing, so the connection is aborted if the close takes longer than a moment."""
    peer = ws.remote_address[0] if ws.remote_address else "?"
    budget = state.budget
    log.warning(
        "connection from %s closed: %d bytes unread (max_outbound_bytes %d); all slow "
        "readers of this worker: %d bytes queued (max_worker_outbound_bytes %d)",
        *(peer, unread, budget.per_connection, total, budget.per_worker),
    )
    reason = f"too slow: {unread} bytes unread; resume to get the rest"

    async def close() -> None:
        try:
            async with asyncio.timeout(2.0):
                await ws.close(chat.CLOSE_POLICY, reason)
        except (TimeoutError, ConnectionClosed):
            pass
        finally:
            ws.transport.abort()

    state.keep(close())


async def run_actions(
    actions: list[chat.Action],
    ws: ServerConnection,
    state: WorkerState,
    conn: chat.ChatConnection,
    outbox: Outbox,
) -> None:
    """Execute the protocol core's actions, in order."""
    for action in actions:
        if isinstance(action, chat.Send):
            if action.frame.startswith(b'{"type":"error"'):
                state.bad_frames_total += 1
            outbox.put(action.frame)
        elif isinstance(action, chat.Close):
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(1.0):
                    await outbox.wait_empty()
            await ws.close(action.code, action.reason)
        elif isinstance(action, chat.Hello):
            try:
                await _hello(action, ws, state, conn, outbox)
            except StoreError:
                # Back to waiting for hello, so the client can simply say hello again.
                if conn.session is not None:
                    state.hub.unsubscribe(conn.session, outbox)
                    conn.session = None
                outbox.discard_held()  # the live frames of a session it is not welcomed to
                conn.hello_failed()
                raise
        elif isinstance(action, chat.Message):
            assert conn.session is not None
            # Acknowledged even while draining (protocol.md, shutting_down): the reply is
            # generated here if the graceful timeout allows; otherwise the drain hands its
            # lease back and another worker takes it over (Hub.take_over).
            if state.closing or ws.protocol.state is not State.OPEN:
                # Past the graceful time the connection is about to close with 1001, or its
                # close frame is out already (a drain's fallback, a failed handoff): not
                # stored, not acknowledged (the client would not see the ack); the client
                # resends it (same id) where it resumes.
                log.debug(
                    "closing: message %s not accepted; the client will resend",
                    action.id,
                    extra=about(conn.session, action.id),
                )
                continue
            try:
                key = client_key(ws, state.auth_on)
                appended = await state.hub.submit(conn.session, action, key, time.monotonic())
            except SessionGone:
                # Expired while the connection was open (idle past [sessions] ttl): the store
                # answered, it did not fail, so no "try again" that could never succeed.
                outbox.put(_session_expired(state, conn, outbox, action.id))
                return
            except StoreError as exc:
                # Not acknowledged: the client resends it, same id, once the store is back
                # (the id makes a resend of a message that was stored after all harmless).
                outbox.put(store_unavailable(state, exc, conn.session, action.id))
                continue
            # With its seq: a moved connection is not sent it again from the log, and a reply
            # stored meanwhile by another worker (seq below it) reaches the client first.
            # A resent id is acknowledged again (protocol.md); a new one once.
            ack = chat.ack_frame(action.id, appended.seq)
            outbox.put(ack, appended.seq, again=appended.duplicate)
        elif isinstance(action, chat.Cancel):
            assert conn.session is not None
            state.hub.cancel(conn.session, action.id)


def _unsent(events: Sequence[Event], outbox: Outbox) -> list[bytes]:
    """The replay frames of ``events`` the connection was not sent yet (a resume, a moved
    connection's catch-up, a gap filled from the log), in seq order."""
    return [
        chat.stored_event_frame(ev.kind, ev.msg_id, ev.seq, ev.text, ev.meta)
        for ev in events
        if not outbox.was_sent(ev.seq)
    ]


async def fill_gap(
    state: WorkerState, conn: chat.ChatConnection, outbox: Outbox, floor: int
) -> None:
    """A stored event reached the outbox with an event below it the client has not seen
    (stored by another worker, or sent by another connection of the session): what the log
    holds after ``floor`` goes out first, in seq order, then what the outbox held back."""
    session = conn.session
    if session is None:
        outbox.release(floor, gaps=False)
        return
    try:
        events = await state.store.events_after(session, floor)
    except Exception as exc:  # what is held goes out as it is; the client's resume fixes it
        log.warning("reading the log of %s failed: %s", session[:8], exc, extra=about(session))
        outbox.release(floor, gaps=False)
        return
    frames = _unsent(events, outbox)
    # gaps=False when the log holds nothing new (an expired session): no read loop.
    outbox.release(max([floor, *(ev.seq for ev in events)]), frames, gaps=bool(events))


async def catch_up(moved: adoption.Moved, state: WorkerState, outbox: Outbox) -> None:
    """A moved connection's resume, run server-side: what its session stored since the old
    worker's last frame (from the floor it carried, minus the seqs it sent above that) is
    sent, then live events, each once; the replies generated elsewhere come as on a resume."""
    session = moved.session
    outbox.restore(moved.floor, moved.sent)
    outbox.hold()
    state.hub.subscribe(session, outbox)
    try:
        events = await state.store.events_after(session, moved.floor)
    except StoreError:
        outbox.discard_held()
        raise
    frames = _unsent(events, outbox)
    outbox.release(max([moved.floor, *(ev.seq for ev in events)]), frames)
    if moved.watched:  # a reply of it is generated elsewhere: as on a resume
        with contextlib.suppress(StoreError):  # (the sweep and the client's fallback cover it)
            await state.hub.take_over(session)
        with contextlib.suppress(StoreError):
            await state.hub.watch(session)


async def _hello(
    hello: chat.Hello,
    ws: ServerConnection,
    state: WorkerState,
    conn: chat.ChatConnection,
    outbox: Outbox,
) -> None:
    """Resolve a hello: create or resume the session, welcome, replay what the client missed."""
    if state.draining:
        # A connection accepted just before this worker stopped accepting. When another
        # worker takes over (reload, recycle, scale), a bare 1001 sends the client there at
        # once: it did nothing wrong, so it gets no error. When the daemon stops, it is told.
        if not state.handover:
            outbox.put(
                chat.error_frame(
                    "shutting_down",
                    "This worker is shutting down: reconnect and send hello again.",
                )
            )
            await outbox.wait_empty()
        await ws.close(chat.CLOSE_GOING_AWAY, "worker going away: reconnect and resume")
        return
    owner = owner_of(ws, state.auth_on)
    if hello.session is None:
        session = await state.store.create_session(owner)
        state.hub.new_session(session)
        conn.welcomed(session)
        state.hub.subscribe(session, outbox)
        outbox.put(chat.welcome_frame(session, 0, False, state.worker_name))
        return
    info = await state.store.get_session(hello.session)
    if info is None or info.owner != owner:
        conn.hello_failed()
        outbox.put(
            chat.error_frame(
                "unknown_session",
                "That session does not exist or has expired: send hello without a session "
                "to start a new one.",
            )
        )
        return
    if hello.last_seq > info.last_seq:
        # Taken as is, it would raise the outbox's floor past the log: every event stored
        # afterwards, up to that seq, would be dropped as "already sent", and the client hang.
        conn.hello_failed()
        outbox.put(
            chat.error_frame(
                "bad_request",
                f"hello.last_seq {hello.last_seq} is beyond the end of the session's log "
                f"(last seq {info.last_seq}): resume with a last_seq the server sent.",
            )
        )
        return
    # Subscribe before reading the log, holding live frames back: an event committed while
    # the log is read is then either in the replay or in the held frames, never lost; the
    # outbox drops the held ones the replay already carried (by seq).
    conn.welcomed(info.session)
    outbox.hold()
    state.hub.subscribe(info.session, outbox)
    events = await state.store.events_after(info.session, hello.last_seq)
    last_seq = max([info.last_seq, *(ev.seq for ev in events)])
    frames = [chat.welcome_frame(info.session, last_seq, True, state.worker_name)]
    frames.extend(_unsent(events, outbox))
    outbox.release(max([hello.last_seq, *(ev.seq for ev in events)]), frames)
    # Messages whose worker died (lease lapsed) are generated here, after the replay: the
    # client sees their ack replayed, then tokens and the reply live.
    try:
        await state.hub.take_over(info.session)
    except StoreError as exc:  # not fatal to the hello: the sweep will take them later
        log.warning(
            "takeover on resume of %s failed: %s", info.session[:8], exc, extra=about(info.session)
        )
    # Messages another worker is still generating (it lives, or a sweep took them): the
    # master forwards the notice of their stored reply here, and it is published live (or,
    # stored since the replay, it is read now: Hub.watch).
    try:
        await state.hub.watch(info.session)
    except StoreError as exc:  # not fatal: the client's stall fallback resumes it later
        log.warning(
            "watch on resume of %s failed: %s", info.session[:8], exc, extra=about(info.session)
        )
