"""How a draining worker lets go of its WebSocket connections.

:class:`Closing` serves :meth:`chatd.worker.main.Worker.drain`: each connection goes as soon as
none of its session's replies is in flight here and its frames are written (those idle now at
once, the others when their reply is out: the hub's ``on_session_done``): closed with 1001, or,
with a :class:`~chatd.worker.mover.Mover`, moved to the successor (offered again each time its
session's reply is out, until it moves or falls back to the 1001). Without this, clients
chatting without pause kept a drain waiting its whole graceful time (the hub is never idle
while they send), and their reconnection to the new generation with it.

Then, at the end of a drain or a fast stop: the generations still running are cancelled and
their leases handed back (another worker takes them over at once), and whatever connection is
left is closed with 1001.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from websockets.asyncio.server import ServerConnection

from chatd.proto import chat
from chatd.worker.generation import Hub
from chatd.worker.mover import Mover
from chatd.worker.outbox import Outbox
from chatd.worker.session import WorkerState

log = logging.getLogger("chatd.worker")

GOING_AWAY = "server going away: resume elsewhere"


class Closing:
    """The connections of one draining (or stopping) worker."""

    def __init__(self, state: WorkerState, hub: Hub) -> None:
        self.state = state
        self.hub = hub
        self._closers: set[asyncio.Task[None]] = set()  # 1001 closes in progress

    def fallback(self, ws: ServerConnection, why: str = GOING_AWAY) -> None:
        """Close ``ws`` with 1001 and ``why`` once its queued frames are written."""
        entry = self.state.connections.get(ws)
        if entry is not None:
            task = asyncio.create_task(self._close_one(ws, entry[1], why))
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)

    async def wait_replies(self, deadline: float, mover: Mover | None = None) -> None:
        """Until the hub is idle (and, with ``mover``, every connection moved or fell back) or
        ``deadline``: let each connection go as soon as it is idle (the module docstring)."""
        closing: set[ServerConnection] = set()

        def let_go(ws: ServerConnection, outbox: Outbox) -> None:
            if mover is not None:  # offered again each time its session's reply is out
                mover.offer(ws)
                return
            closing.add(ws)
            self.fallback(ws)

        def session_done(session: str) -> None:
            for ws, (conn, outbox) in list(self.state.connections.items()):
                if conn.session == session and ws not in closing:
                    let_go(ws, outbox)

        hub = self.hub
        hub.on_session_done = session_done
        try:
            busy = {session for session, _ in hub.running}
            for ws, (conn, outbox) in list(self.state.connections.items()):
                if conn.session not in busy:
                    let_go(ws, outbox)
            # No connection is accepted any more: every other one goes by session_done.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await hub.wait_idle()
                    # With a mover: until every connection moved (or fell back). A client
                    # may send again before its turn: its reply runs here, then it moves.
                    while mover is not None:
                        await mover.settle()
                        if not hub.running:
                            break
                        await hub.wait_idle()
        finally:
            hub.on_session_done = None

    @staticmethod
    async def _close_one(ws: ServerConnection, outbox: Outbox, why: str) -> None:
        """Write what is queued for the client (its reply), then close with 1001."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await outbox.wait_empty()
        with contextlib.suppress(Exception):
            await ws.close(chat.CLOSE_GOING_AWAY, why)

    async def close_all(self, within: float) -> None:
        """Close every connection left with 1001, waiting at most ``within`` seconds."""
        clients = list(self.state.connections)  # those the drain did not close yet
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await asyncio.gather(
                    *(ws.close(chat.CLOSE_GOING_AWAY, GOING_AWAY) for ws in clients),
                    return_exceptions=True,
                )

    async def stop_generations(self) -> None:
        """Stop claiming, cancel the generations still running, hand their leases back."""
        hub = self.hub
        hub.sweeping = False
        unanswered = list(hub.running)
        tasks = list(hub.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if unanswered:
            # Stopped before their reply was stored: acknowledged, so another worker must
            # generate them; handing the leases back spares it the wait for them to lapse.
            log.warning("%d acknowledged messages left unanswered: handed over", len(unanswered))
            await hub.hand_back(unanswered)
