"""Bounds on what a client may make a worker hold, before the WebSocket upgrade.

- Request headers: more than ``max_header_count`` lines, or more than ``max_header_bytes`` in
  all, get HTTP 431 and the connection is closed (120 headers of 8 KB each used to be
  accepted, and each such connection kept ~1 MB of the worker).
- ``max_connections_per_ip``: one more connection from that address gets 429 with
  Retry-After, before the upgrade; once one closes, the next is admitted.
- A burst of 5,000 connections at once, and handshakes left half-sent: honest clients are
  still welcomed and /healthz answers.
"""

from __future__ import annotations

import asyncio
import resource
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread, expected_reply
from tests.support import Chatd, Client, http_get, running_chatd, t, wait_for

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama(["qwen2.5-coder:7b"], tokens=4)) as f:
        yield f


def raw_request(d: Chatd, head: bytes) -> bytes:
    """Send a request head as is; return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=t(10)) as s:
        s.sendall(head)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def upgrade_head(d: Chatd, extra: list[tuple[str, str]]) -> bytes:
    lines = [
        "GET /ws HTTP/1.1",
        f"Host: 127.0.0.1:{d.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in extra),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_oversized_headers_get_431_and_the_connection_closes(
    tmp_path: Path, fake: FakeOllama
) -> None:
    with running_chatd(tmp_path, fake.url, workers=1) as d:
        many = [(f"X-Pad-{i}", "v" * 8000) for i in range(120)]  # over the count (64)
        answer = raw_request(d, upgrade_head(d, many))  # read to EOF: the server closed it
        assert answer.startswith(b"HTTP/1.1 431 ")
        big = [(f"X-Pad-{i}", "w" * 1000) for i in range(40)]  # 40 lines, 40 KB in all
        answer = raw_request(d, upgrade_head(d, big))
        assert answer.startswith(b"HTTP/1.1 431 ") and b"at most 32768" in answer
        # The same on a plain HTTP endpoint.
        head = upgrade_head(d, big).replace(b"GET /ws ", b"GET /healthz ")
        assert raw_request(d, head).startswith(b"HTTP/1.1 431 ")
        # A request within the bounds is served.
        fine = [(f"X-Pad-{i}", "z" * 100) for i in range(40)]
        c = Client(d.url, additional_headers=fine)
        c.hello()
        assert c.ask("a", "within bounds")[-1]["text"] == expected_reply("within bounds", 4)
        c.close()


def test_connections_per_ip_are_capped_with_429(tmp_path: Path, fake: FakeOllama) -> None:
    with running_chatd(tmp_path, fake.url, workers=1, limits={"max_connections_per_ip": 3}) as d:
        clients = [Client(d.url) for _ in range(3)]
        for c in clients:
            c.hello()
        with pytest.raises(InvalidStatus) as refused:
            Client(d.url)
        response = refused.value.response
        assert response.status_code == 429 and response.headers["Retry-After"] == "10"
        assert b"max_connections_per_ip 3" in response.body
        clients.pop().close()

        def admitted() -> bool:
            try:
                c = Client(d.url)
            except InvalidStatus:
                return False
            clients.append(c)
            return True

        wait_for(admitted, 10, "a connection admitted once one closed")
        for c in clients:
            c.close()


async def _burst(port: int, n: int, half_open: int) -> tuple[int, int]:
    """Open ``n`` connections at once (each sends a complete handshake) and ``half_open``
    more that send half a request and stop; returns (upgraded, refused or reset)."""
    head = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    upgraded = failed = 0
    stalled: list[asyncio.StreamWriter] = []

    async def one() -> None:
        nonlocal upgraded, failed
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            failed += 1
            return
        try:
            writer.write(head)
            line = await asyncio.wait_for(reader.readline(), t(60))
            if line.startswith(b"HTTP/1.1 101"):
                upgraded += 1
            else:
                failed += 1
        except (OSError, TimeoutError):
            failed += 1
        finally:
            writer.close()

    async def half() -> None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        writer.write(head[:40])
        stalled.append(writer)

    await asyncio.gather(*(half() for _ in range(half_open)))
    await asyncio.gather(*(one() for _ in range(n)))
    for w in stalled:
        w.close()
    return upgraded, failed


def test_a_burst_of_5000_connections_and_half_open_handshakes(
    tmp_path: Path, fake: FakeOllama
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 12000
    if hard < want:
        pytest.skip(f"NOT TESTED: RLIMIT_NOFILE hard limit {hard} < {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # chatd inherits it
    try:
        with running_chatd(tmp_path, fake.url, workers=2, limits={"hello_timeout": 30.0}) as d:
            upgraded, failed = asyncio.run(_burst(d.port, 5000, 500))
            # Every complete handshake of the burst was upgraded: none refused, none reset.
            assert (upgraded, failed) == (5000, 0)
            assert http_get(f"{d.http}/healthz")[0] == 200
            c = Client(d.url)
            c.hello()
            assert c.ask("h", "honest client")[-1]["text"] == expected_reply("honest client", 4)
            c.close()
            st = d.status()
            assert st is not None and all(w["state"] == "ready" for w in st["workers"])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
