"""Open WebSockets that leave this worker, and open WebSockets it adopts: websockets' side.

A WebSocket moves between workers as its TCP socket (by ``SCM_RIGHTS``, :mod:`chatd.worker.mover`
and :mod:`chatd.worker.adopter`) plus its chat state; nothing of websockets' own state travels,
so a connection may move only when websockets holds nothing of it in user space
(:func:`movable`): bytes the kernel holds are the socket's, and whoever reads next gets them.
The new worker wraps the socket in an :class:`AdoptedConnection`, a websockets
``ServerConnection`` that starts OPEN (the sans-I/O ``ServerProtocol(state=OPEN)``, documented)
and skips the handshake (``connection_made``, not documented), registered with its ``Server`` as
``serve()``'s own handler would (``all_connections``, ``handler_tasks``: not documented), so a
later drain closes it like any other. Every such internal is pinned by
``tests/unit/worker/test_websockets_internals.py``: an upgrade that changes one fails there.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import cast

from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from chatd.worker.front import Front, FrontConnection

log = logging.getLogger("chatd.adopt")


def movable(ws: ServerConnection) -> str | None:
    """Why ``ws`` cannot leave now (None: it can). Call with its reading paused: the checks
    hold until reading resumes.

    websockets must hold nothing of the connection: OPEN, no extension (a deflate window
    cannot move), every byte read parsed into whole frames (:class:`FrontConnection` counts),
    no fragmented message half received, every message taken by the reader, which waits for
    the next one, nothing being sent or waiting in the transport."""
    protocol = ws.protocol
    if protocol.state is not State.OPEN:
        return "not open"
    if protocol.extensions:
        return "compression"
    fc = cast(FrontConnection, ws)
    if fc.fed != fc.parsed:
        return "mid-frame"
    if protocol.current_size is not None or protocol.expect_continuation_frame:
        return "mid-message"
    messages = ws.recv_messages
    if len(messages.frames) or not messages.get_in_progress or messages.paused:
        return "message being handled"
    if ws.send_in_progress is not None or ws.transport.get_write_buffer_size():
        return "sending"
    return None


class AdoptedConnection(FrontConnection):
    """A connection handed over by another worker: already OPEN, no handshake, no sniffing.
    ``carried_owner``: its session's owner as it travelled (the token never does;
    :func:`chatd.worker.session.owner_of` reads it)."""

    carried_owner: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Connection.connection_made(self, transport)  # not the handshake task: it is open


def _request(path: str, origin: str | None) -> Request:
    """The upgrade request as the adopting worker keeps it: its path and Origin, no secret
    (the session's owner travels as a hash)."""
    headers = Headers()
    if origin is not None:
        headers["Origin"] = origin
    return Request(path, headers)


def adopted_class(front: Front) -> type[AdoptedConnection]:
    """The class of this worker's adopted connections (its :class:`Front`, as
    :func:`chatd.worker.front.connection_class` gives to those it accepts)."""
    return type("WorkerAdoptedConnection", (AdoptedConnection,), {"front": front})


async def adopt(
    server: Server,
    conn_class: type[AdoptedConnection],
    sock: socket.socket,
    *,
    owner: str,
    origin: str | None,
    max_size: int | None,
    ping_interval: float | None,
    ping_timeout: float | None,
    handler: Callable[[ServerConnection], Awaitable[None]],
) -> ServerConnection:
    """Make ``sock`` an open WebSocket of ``server`` served by ``handler``, as if ``serve()``
    had accepted it (``conn_class``: :func:`adopted_class`). The transport takes ``sock``
    over; the first bytes it reads are the client's next frame."""
    loop = asyncio.get_running_loop()
    protocol = ServerProtocol(state=State.OPEN, max_size=max_size)
    ws = conn_class(protocol, server, ping_interval=ping_interval, ping_timeout=ping_timeout)
    ws.carried_owner = owner
    ws.request = _request("/ws", origin)
    ws.request_rcvd.set_result(None)
    await loop.connect_accepted_socket(lambda: ws, sock)
    task = loop.create_task(_serve(server, ws, handler))
    server.handler_tasks.add(task)
    return ws


async def _serve(
    server: Server, ws: ServerConnection, handler: Callable[[ServerConnection], Awaitable[None]]
) -> None:
    """What ``serve()``'s handler does after the handshake (websockets.asyncio.server)."""
    try:
        server.all_connections.add(ws)
        ws.start_keepalive()
        try:
            async with ws:
                await handler(ws)
        except Exception:
            log.exception("adopted connection handler failed")
        finally:
            server.all_connections.discard(ws)
    except Exception:
        ws.transport.abort()
    finally:
        server.handler_tasks.discard(cast(asyncio.Task[None], asyncio.current_task()))
