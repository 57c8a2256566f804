"""The adopting side of a connection handoff: open WebSockets offered by an old worker.

Every worker listens, from its start until its drain, on a ``SOCK_SEQPACKET`` socket in the
abstract namespace named by :func:`chatd.proto.adoption.address` (the master's pid and its own):
during a reload the master tells each old worker which new worker takes its connections, and
the old worker connects there (:mod:`chatd.worker.mover`). Only a sibling may hand over: the
peer must run as this worker's uid and be a child of the same master (``SO_PEERCRED``, then its
parent pid): an abstract socket is reachable by any process of the network namespace.

Per channel, batches in turn (:mod:`chatd.proto.adoption`): an ``offer`` with one descriptor per
connection; each is checked without I/O (``check``: a socket of the right kind whose peer is the
one announced, a session this generation's rules still accept, room under the connection
limits) and the answer lists the accepted and refused ones; on ``commit`` the accepted ones are
adopted (``adopt``), on ``abort`` or a channel that ends before the decision their copies are
closed: the old worker still owns them. A malformed message ends the channel (every copy not
committed is closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import psutil

from chatd import faults
from chatd.proto import adoption
from chatd.worker.seqpacket import Channel, ChannelClosed, peer_pid

log = logging.getLogger("chatd.adopt")

Check = Callable[[socket.socket, adoption.Moved], str | None]
Adopt = Callable[[socket.socket, adoption.Moved], Awaitable[None]]


def _sibling(sock: socket.socket) -> str | None:
    """Why the peer of ``sock`` may not hand connections over (None: a sibling worker)."""
    try:
        pid, uid = peer_pid(sock)
        parent = psutil.Process(pid).ppid()
    except (OSError, psutil.Error) as exc:
        return f"its credentials are unreadable ({exc})"
    if uid != os.getuid() or parent != os.getppid():
        return f"pid {pid} (uid {uid}, parent {parent}) is not a worker of this master"
    return None


class Adopter:
    """The listening side (see the module docstring).

    Args:
        check: why a connection cannot be adopted, or None (no I/O, no await).
        adopt: take the socket over and serve it (called once per committed connection).
    """

    def __init__(self, check: Check, adopt: Adopt) -> None:
        self._check = check
        self._adopt = adopt
        self._listener: socket.socket | None = None
        self._channels: set[asyncio.Task[None]] = set()
        self.adopted = 0  # connections committed to this worker
        self.refused = 0  # offered connections this worker refused
        self.aborted = 0  # accepted, then kept by the old worker (or its channel ended)
        # Accepted and not yet committed or aborted, on every channel: they count against
        # the connection limit as if already here (``check`` sees them).
        self.in_transit = 0

    def listen(self, name: str) -> bool:
        """Listen on the abstract socket ``name``; False (logged) if it cannot be bound: this
        worker then adopts nothing, and old workers fall back to closing with 1001."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(name)
            sock.listen(8)
        except OSError as exc:
            sock.close()
            log.warning("cannot listen for connection handoffs (%s): reloads will close them", exc)
            return False
        sock.setblocking(False)
        self._listener = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)
        return True

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("handoff listener: %s", exc)
            return
        task = asyncio.get_running_loop().create_task(self._serve(sock))
        self._channels.add(task)
        task.add_done_callback(self._channels.discard)

    async def _serve(self, sock: socket.socket) -> None:
        why = _sibling(sock)
        if why is not None:
            log.warning("handoff channel refused: %s", why)
            sock.close()
            return
        channel = Channel(sock, adoption.MAX_MESSAGE)
        # Accepted, not yet committed or aborted.
        pending: dict[int, tuple[socket.socket, adoption.Moved]] = {}
        try:
            while True:
                data, fds = await channel.recv()
                try:
                    msg = adoption.decode(data, len(fds))
                except adoption.AdoptionError as exc:
                    for fd in fds:
                        os.close(fd)
                    log.warning("handoff channel: %s: closing it", exc)
                    return
                if msg.kind == adoption.OFFER:
                    answer = self._offered(msg.conns, fds, pending)
                    await faults.handoff_stall("answer")
                    await channel.send(answer)
                elif msg.kind == adoption.COMMIT:
                    await faults.handoff_stall("adopt")
                    for cid in msg.ids:
                        if (entry := pending.pop(cid, None)) is not None:
                            self.in_transit -= 1
                            await self._commit(*entry)
                elif msg.kind == adoption.ABORT:
                    for cid in msg.ids:
                        if (entry := pending.pop(cid, None)) is not None:
                            self.in_transit -= 1
                            self.aborted += 1
                            entry[0].close()
        except ChannelClosed:
            pass
        finally:
            self.aborted += len(pending)
            self.in_transit -= len(pending)
            for left, _ in pending.values():
                left.close()  # never committed: the old worker owned them (if it lives)
            channel.close()

    def _offered(
        self,
        conns: tuple[adoption.Moved, ...],
        fds: list[int],
        pending: dict[int, tuple[socket.socket, adoption.Moved]],
    ) -> bytes:
        accepted: list[int] = []
        refused: dict[int, str] = {}
        for moved, fd in zip(conns, fds, strict=True):
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                os.close(fd)
                refused[moved.id] = f"not a socket ({exc})"
                continue
            why = self._check(sock, moved) if moved.id not in pending else "a duplicate id"
            if why is None:
                pending[moved.id] = (sock, moved)
                self.in_transit += 1
                accepted.append(moved.id)
            else:
                sock.close()
                refused[moved.id] = why
        self.refused += len(refused)
        return adoption.answer(accepted, refused)

    async def _commit(self, sock: socket.socket, moved: adoption.Moved) -> None:
        self.adopted += 1
        try:
            await self._adopt(sock, moved)
        except Exception:
            log.exception("adopting connection of session %s failed", moved.session[:8])
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        """Stop listening (a drain): channels in progress finish their batches."""
        if self._listener is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
