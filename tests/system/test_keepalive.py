"""WebSocket keepalive: a peer that never answers pings is dropped; the session survives."""

from __future__ import annotations

import base64
import os
import socket
import time
from pathlib import Path

import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from tests.support import Client, running_chatd, t

pytestmark = pytest.mark.system


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""
    head = sock.recv(2, socket.MSG_WAITALL)
    if len(head) < 2:
        return -1, b""
    length = head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(sock.recv(2, socket.MSG_WAITALL), "big")
    payload = sock.recv(length, socket.MSG_WAITALL) if length else b""
    return head[0] & 0x0F, payload


def test_peer_that_never_pongs_is_closed(tmp_path: Path) -> None:
    """ping_interval=0.5, ping_timeout=0.5: a raw client that ignores pings is cut off."""
    with (
        FakeOllamaThread(FakeOllama()) as fake,
        running_chatd(
            tmp_path, fake.url, workers=1, limits={"ping_interval": 0.5, "ping_timeout": 0.5}
        ) as d,
    ):
        session = Client(d.url).hello()["session"]
        sock = socket.create_connection(("127.0.0.1", d.port), timeout=t(10))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += sock.recv(1024)
        assert response.startswith(b"HTTP/1.1 101")
        started = time.monotonic()
        opcodes = []
        while True:
            opcode, _ = read_frame(sock)
            opcodes.append(opcode)
            if opcode in (-1, 0x8):  # EOF or close frame
                break
            assert time.monotonic() - started < t(10), "never dropped"
        assert 0x9 in opcodes, f"no ping seen: {opcodes}"
        sock.close()
        resumed = Client(d.url)
        assert resumed.hello(session)["resumed"] is True
        resumed.close()
