"""A worker's part in moving open WebSockets between workers (``[server] handoff``).

:class:`Moves` ties the pieces to the worker: it listens for handoffs from its start
(:mod:`chatd.worker.adopter`; the checks a connection must pass to be adopted here: this
generation's rules), and at a drain with a named successor it moves the worker's connections
there (:mod:`chatd.worker.mover`). Its counters go in the worker's ``stats`` report.

Handoff is off when ``[server] handoff = false``, with ``compression = true`` (a deflate window
cannot move) and with TLS (its state lives in the process): drains close with 1001 as before.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import Server, ServerConnection

from chatd.config import Config
from chatd.proto import adoption
from chatd.proto.chat import CLOSE_GOING_AWAY
from chatd.worker.adopter import Adopter
from chatd.worker.connection import serve_connection
from chatd.worker.front import Front
from chatd.worker.http import frame_limit
from chatd.worker.mover import Mover, MoveStats
from chatd.worker.session import WorkerState, token_hash
from chatd.worker.wsadopt import adopt, adopted_class

log = logging.getLogger("chatd.mover")


class Moves:
    """See the module docstring. ``server`` and ``front`` are set once the worker serves."""

    def __init__(self, cfg: Config, state: WorkerState) -> None:
        self.cfg = cfg
        self.state = state
        server = cfg.server
        self.enabled = server.handoff and not (server.compression or server.tls_cert)
        self.server: Server | None = None
        self.front: Front | None = None
        self._owners = frozenset(token_hash(t) for t in cfg.auth.tokens)
        self.adopter = Adopter(self._check, self._adopt)
        self.mover: Mover | None = None
        self.moved = MoveStats()

    def listen(self) -> None:
        """Accept handoffs from the other workers of this master (from now to the drain)."""
        if self.enabled:
            self.adopter.listen(adoption.address(os.getppid(), os.getpid()))

    def _check(self, sock: socket.socket, moved: adoption.Moved) -> str | None:
        """Why this worker cannot adopt ``moved`` (None: it can): its socket and its peer,
        this worker's room, and whether this generation's auth and origin rules still accept
        it (a reconnect would be refused otherwise: it gets the reason in a 1001 instead)."""
        state, cfg, front = self.state, self.cfg, self.front
        if state.draining or self.server is None or front is None:
            return "the new worker is stopping"
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return "not a TCP socket"
        try:
            peer = sock.getpeername()
        except OSError as exc:
            return f"the client is gone ({exc.strerror or exc})"
        if (str(peer[0]), int(peer[1])) != moved.peer:
            return "the socket's peer is not the one announced"
        limits = cfg.limits
        if limits.max_connections and (
            len(state.connections) + len(front.http) + self.adopter.in_transit
            >= limits.max_connections
        ):
            return "the new worker is at its connection limit: resume elsewhere"
        ip = moved.peer[0]
        if limits.max_connections_per_ip and (
            state.per_ip.get(ip, 0) + front.per_ip.get(ip, 0) >= limits.max_connections_per_ip
        ):
            return f"too many connections from {ip}"
        if state.auth_on and moved.owner not in self._owners:
            return "the new configuration no longer accepts this connection's token"
        origins = cfg.auth.allowed_origins
        if origins and moved.origin is not None and moved.origin not in origins:
            return "the new configuration no longer allows this connection's origin"
        return None

    async def _adopt(self, sock: socket.socket, moved: adoption.Moved) -> None:
        assert self.server is not None and self.front is not None
        state, limits = self.state, self.cfg.limits
        ws = await adopt(
            self.server,
            adopted_class(self.front),
            sock,
            owner=moved.owner,
            origin=moved.origin,
            max_size=frame_limit(self.cfg),
            ping_interval=limits.ping_interval,
            ping_timeout=limits.ping_timeout,
            handler=lambda ws: serve_connection(ws, state, moved),
        )
        if state.draining:  # committed after this worker's own drain began: passed on
            if self.mover is not None:
                self.mover.offer(ws)
            else:
                state.keep(ws.close(CLOSE_GOING_AWAY, "server going away"))

    async def start_moving(
        self, target_pid: int, deadline: float, fallback: Callable[[ServerConnection, str], None]
    ) -> Mover | None:
        """A drain with a successor: the mover of this worker's connections, or None (handoff
        off, or the successor unreachable: the drain closes with 1001)."""
        self.adopter.close()
        if not self.enabled or target_pid <= 0:
            return None
        mover = Mover(self.state, fallback, deadline)
        if not await mover.connect(adoption.address(os.getppid(), target_pid), target_pid):
            return None
        self.mover = mover
        self.moved = mover.stats
        return mover

    def report(self) -> dict[str, Any]:
        """The counters for the ``stats`` report (``proto.control.HANDOFF_KEYS``)."""
        moved, adopter = self.moved, self.adopter
        return {
            "handoff_moved_total": moved.moved,
            "handoff_fell_back_total": moved.fell_back,
            "handoff_deferred_total": moved.deferred,
            "handoff_aborted_total": moved.aborted + adopter.aborted,
            "handoff_adopted_total": adopter.adopted,
            "handoff_refused_total": adopter.refused,
        }
