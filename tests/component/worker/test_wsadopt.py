"""An open WebSocket handed between two servers in one process, over a real loopback TCP
connection and a real seqpacket socketpair (chatd.worker.wsadopt, chatd.worker.seqpacket).

The client notices nothing: no close frame, the same local port, its next send and receive work
on the new server; bytes it sends while the connection is in transit reach the new server once;
a connection in the middle of a frame is not movable until the frame is whole. On asyncio's loop
and on uvloop (the workers' loop). This also pins the websockets internals the handoff relies on
(``ServerProtocol(state=OPEN)``, ``connection_made`` without the handshake, ``recv_messages``,
``Server.all_connections``/``handler_tasks``): an upgrade that changes them fails here.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve

from chatd.worker.front import Front, connection_class
from chatd.worker.seqpacket import Channel
from chatd.worker.wsadopt import adopt, adopted_class, movable
from tests.support import until

pytestmark = pytest.mark.timeout(30)

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


async def no_http(*_: Any) -> None:
    raise AssertionError("no HTTP here")


def front() -> Front:
    return Front(no_http, max_header_bytes=4096, max_header_count=32, open_timeout=5.0)


class Side:
    """One server: echoes each message prefixed with its name; keeps its open connections."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.front = front()
        self.open: list[ServerConnection] = []
        self.server: Server

    async def handler(self, ws: ServerConnection) -> None:
        self.open.append(ws)
        async for message in ws:
            await ws.send(f"{self.name}:{message}")

    async def start(self) -> None:
        self.server = await serve(
            self.handler,
            "127.0.0.1",
            0,
            compression=None,  # chatd's default: a deflate window cannot move
            create_connection=connection_class(self.front),
        )

    @property
    def port(self) -> int:
        port: int = self.server.sockets[0].getsockname()[1]
        return port


async def hand_over(old: Side, new: Side, ws: ServerConnection) -> ServerConnection:
    """What chatd.worker.mover and chatd.worker.adopter do, minus the chat state: the fd over
    a seqpacket socketpair, the old copy aborted, the new one adopted."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sender, receiver = Channel(a, 1024), Channel(b, 1024)
    await sender.send(b"offer", [ws.transport.get_extra_info("socket").fileno()])
    data, fds = await receiver.recv()
    assert data == b"offer" and len(fds) == 1
    assert os.get_inheritable(fds[0]) is False  # MSG_CMSG_CLOEXEC
    ws.transport.abort()  # the old copy: close(), no FIN (the new worker holds the socket)
    adopted = await adopt(
        new.server,
        adopted_class(new.front),
        socket.socket(fileno=fds[0]),
        owner="",
        origin=None,
        max_size=1 << 20,
        ping_interval=20,
        ping_timeout=20,
        handler=new.handler,
    )
    sender.close()
    receiver.close()
    return adopted


def run(test: Callable[[Side, Side], Awaitable[None]], loop: str) -> None:
    async def main() -> None:
        old, new = Side("old"), Side("new")
        await old.start()
        await new.start()
        try:
            await test(old, new)
        finally:
            old.server.close()
            new.server.close()
            await old.server.wait_closed()
            await new.server.wait_closed()

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_the_client_sees_nothing_but_a_new_server(loop: str) -> None:
    async def test(old: Side, new: Side) -> None:
        async with connect(f"ws://127.0.0.1:{old.port}/ws") as client:
            local = client.transport.get_extra_info("sockname")
            await client.send("1")
            assert await client.recv() == "old:1"
            ws = old.open[0]
            await until(lambda: ws.recv_messages.get_in_progress, "the handler waiting")
            ws.transport.pause_reading()
            assert movable(ws) is None
            await client.send("in transit")  # stays in the kernel: the new server reads it
            adopted = await hand_over(old, new, ws)
            assert await client.recv() == "new:in transit"
            await client.send("2")
            assert await client.recv() == "new:2"
            assert client.transport.get_extra_info("sockname") == local
            assert client.close_code is None
            assert adopted in new.server.all_connections and ws not in old.server.all_connections
            await until(lambda: not old.server.handler_tasks, "the old handler to end")
        # The client's close reached the new server: its handler ended, the connection closed.
        await until(lambda: not new.server.handler_tasks, "the new handler to end")
        assert adopted.close_code == 1000

    run(test, loop)


def masked_text(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    body = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    assert len(payload) < 126
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + body


@pytest.mark.parametrize("loop", LOOPS)
def test_a_connection_in_the_middle_of_a_frame_waits_for_its_end(loop: str) -> None:
    async def test(old: Side, new: Side) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", old.port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        frame = masked_text(b"split")
        writer.write(frame[:3])  # the header and one byte of the mask
        await writer.drain()
        await until(lambda: old.open and old.open[0].fed == 3, "the partial frame read")
        ws = old.open[0]
        ws.transport.pause_reading()
        assert movable(ws) == "mid-frame"
        ws.transport.resume_reading()
        writer.write(frame[3:])
        assert await reader.readexactly(11) == b"\x81\x09old:split"
        await until(lambda: ws.recv_messages.get_in_progress, "the handler waiting")
        ws.transport.pause_reading()
        assert movable(ws) is None
        await hand_over(old, new, ws)
        writer.write(masked_text(b"next"))
        assert await reader.readexactly(10) == b"\x81\x08new:next"
        writer.close()

    run(test, loop)
