"""The life of one client connection: frames in, the protocol core's actions run, cleanup.

:func:`serve_connection` runs for the life of one WebSocket connection. It feeds every frame
to a :class:`chatd.proto.chat.ChatConnection` and runs the actions it returns
(:func:`chatd.worker.session.run_actions`: hello, messages, cancels); frames to the client go
through an :class:`~chatd.worker.outbox.Outbox` (written once per event-loop tick, through
:class:`~chatd.worker.session.WsSink`), so a slow client never blocks a generation. The
connection never owns a generation: when it closes, replies in progress go on and are stored
for its resume. It keeps the hello deadline, and the worker's tables of open connections.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from chatd.errors import StoreError
from chatd.logs import about
from chatd.proto import adoption, chat
from chatd.worker import session
from chatd.worker.outbox import Outbox
from chatd.worker.session import WorkerState, WsSink

log = logging.getLogger("chatd.session")  # its lines were always chatd.session's


def serve_connection(
    ws: ServerConnection, state: WorkerState, moved: adoption.Moved | None = None
) -> Coroutine[Any, Any, None]:
    """Serve one client until it leaves, breaks the protocol, the worker drains, or the
    connection moves to another worker. ``moved``: a connection adopted from another worker
    (:mod:`chatd.worker.adopter`), open on its session already. Returns the coroutine that
    serves it (websockets' handler: awaited as it is, with no frame of its own around it)."""
    return _Client(ws, state).serve(moved)


class _Client:
    """One connection's parts, and the callbacks its outbox and its hello deadline call.

    Memory per idle connection is a product figure (docs/benchmarks.md): the callbacks are
    bound methods of this one slotted object, not closures (each closure, with its cells,
    cost a few hundred bytes per open connection), the hello deadline's timer is dropped
    once a hello is in, and frames are read with ``recv`` (``async for`` keeps an async
    generator per connection).
    """

    __slots__ = ("conn", "hello_timer", "outbox", "peer", "state", "ws")

    def __init__(self, ws: ServerConnection, state: WorkerState) -> None:
        self.ws = ws
        self.state = state
        self.conn = chat.ChatConnection(state.limits, time.monotonic())
        self.outbox = Outbox(WsSink(ws), state.budget, self.too_slow, self.fill_gap)
        # The hello deadline: None once a hello was accepted (and until the first is due).
        self.hello_timer: asyncio.TimerHandle | None = None
        self.peer: str = ws.remote_address[0] if ws.remote_address else "?"

    def too_slow(self, unread: int, total: int) -> None:
        session.too_slow(self.ws, self.state, unread, total)

    def fill_gap(self, floor: int) -> None:
        self.state.keep(session.fill_gap(self.state, self.conn, self.outbox, floor))

    def _arm_hello(self) -> None:
        loop = asyncio.get_running_loop()
        self.hello_timer = loop.call_later(self.state.hello_timeout, self._hello_timed_out)

    def _disarm_hello(self) -> None:
        if self.hello_timer is not None:
            self.hello_timer.cancel()
            self.hello_timer = None

    def _hello_timed_out(self) -> None:
        # The fired handle stays set: no deadline is armed again after this one.
        actions = self.conn.hello_timed_out()
        self.state.keep(session.run_actions(actions, self.ws, self.state, self.conn, self.outbox))

    async def serve(self, moved: adoption.Moved | None) -> None:
        ws, state, conn, outbox, peer = self.ws, self.state, self.conn, self.outbox, self.peer
        state.connections[ws] = (conn, outbox)
        state.per_ip[peer] = state.per_ip.get(peer, 0) + 1
        if moved is None:
            self._arm_hello()
            state.connections_total += 1
            log.info("connection open from %s", peer)
        else:
            conn.adopted(
                moved.session,
                *(moved.tokens, moved.refill_age, moved.bad_in_a_row, moved.age, time.monotonic()),
            )
            log.debug("connection from %s adopted on session %s", peer, moved.session[:12])
        try:
            if moved is not None:
                try:
                    await session.catch_up(moved, state, outbox)
                except StoreError as exc:
                    log.warning("adopted connection: session store failed: %s", exc)
                    await ws.close(chat.CLOSE_GOING_AWAY, "session store unavailable: resume")
            while True:  # until ConnectionClosed, as ``async for`` would (OK or not)
                await self._receive(await ws.recv())
        except ConnectionClosed:
            pass
        finally:
            self._disarm_hello()
            self._closed()

    async def _receive(self, data: str | bytes) -> None:
        """One frame from the client: through the protocol core, its actions executed."""
        conn = self.conn
        if isinstance(data, str):
            actions = conn.receive_text(data, time.monotonic())
        else:
            actions = conn.receive_binary()
        if conn.state is not chat.State.AWAITING_HELLO:
            self._disarm_hello()
        try:
            await session.run_actions(actions, self.ws, self.state, conn, self.outbox)
        except StoreError as exc:  # during a hello: the client may simply say hello again
            self.outbox.put(session.store_unavailable(self.state, exc, conn.session, None))
        if conn.state is chat.State.AWAITING_HELLO and self.hello_timer is None:
            self._arm_hello()  # a hello refused: the next one has a deadline

    def _closed(self) -> None:
        ws, state, conn, outbox, peer = self.ws, self.state, self.conn, self.outbox, self.peer
        conn.closed()
        outbox.close()
        if conn.session is not None:
            state.hub.unsubscribe(conn.session, outbox)
        state.connections.pop(ws, None)
        left = state.per_ip.pop(peer, 1) - 1
        if left:
            state.per_ip[peer] = left
        if ws in state.handed_off:
            state.handed_off.discard(ws)
            log.debug("connection from %s moved to another worker", peer)
        else:
            log.info(
                "connection closed from %s session %s code %s after %.1fs",
                peer,
                (conn.session or "-")[:12],
                ws.close_code,
                time.monotonic() - conn.opened,
                extra=about(conn.session),
            )
