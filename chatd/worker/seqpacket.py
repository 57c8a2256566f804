"""A ``SOCK_SEQPACKET`` Unix socket on the event loop: whole messages, with descriptors.

Open sockets move between workers on one of these (:mod:`chatd.worker.mover`,
:mod:`chatd.worker.adopter`), not on the msgpack link to the master: on a stream socket the
descriptors attach to a byte range and a plain read (an asyncio transport) drops them, closed;
a seqpacket socket keeps message boundaries, so one ``recvmsg`` is one message and its fds.

Received descriptors are close-on-exec (``MSG_CMSG_CLOEXEC``), and a message whose data or
descriptors were cut (``MSG_TRUNC``, ``MSG_CTRUNC``: more fds than asked, or over the process's
descriptor limit: the kernel closed the extra ones) is an error: its fds are closed.

Who is at the other end: :func:`peer_pid` (``SO_PEERCRED``, taken when the peer connected).
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
import struct

MAX_FDS = 64  # descriptors accepted per message (chatd.proto.adoption.MAX_BATCH)
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


class ChannelClosed(ConnectionError):
    """The other end closed the channel (or it failed)."""


def peer_pid(sock: socket.socket) -> tuple[int, int]:
    """The pid and uid of ``sock``'s peer (SO_PEERCRED); raises OSError."""
    pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return pid, uid


class Channel:
    """One connected seqpacket socket (non-blocking) used from the running loop, one reader
    and one writer at a time."""

    def __init__(self, sock: socket.socket, max_message: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._max = max_message
        self._loop = asyncio.get_running_loop()

    async def recv(self) -> tuple[bytes, list[int]]:
        """The next message and its descriptors (the caller owns them); raises ChannelClosed."""
        fd_size = array.array("i").itemsize
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(
                    self._max, socket.CMSG_SPACE(MAX_FDS * fd_size), socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                await self._wait(readable=True)
                continue
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc
            fds = array.array("i")
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fd_size])
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in fds:
                    os.close(fd)
                raise ChannelClosed("a message was cut (too long, or too many descriptors)")
            if not data and not fds:
                raise ChannelClosed("closed by the peer")
            return data, list(fds)

    async def send(self, data: bytes, fds: list[int] | None = None) -> None:
        """Send one message (with ``fds``, duplicated into the receiver); raises ChannelClosed."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while True:
            try:
                self.sock.sendmsg([data], anc)
                return
            except (BlockingIOError, InterruptedError):
                await self._wait(readable=False)
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc

    async def _wait(self, *, readable: bool) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        fd = self.sock.fileno()
        if fd < 0:
            raise ChannelClosed("closed")

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if readable:
            self._loop.add_reader(fd, ready)
        else:
            self._loop.add_writer(fd, ready)
        try:
            await fut
        finally:
            if readable:
                self._loop.remove_reader(fd)
            else:
                self._loop.remove_writer(fd)

    def close(self) -> None:
        self.sock.close()
