"""The worker's front on a real socket: WebSocket upgrades go to websockets as before, anything
else to the plain HTTP connection (whole and streamed responses, keep-alive, HEAD, bounds, and
a client that leaves cancelling its request). This also pins the websockets internals the front
relies on (``create_connection``, a deferred ``connection_made``): an upgrade changing them
fails here."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from chatd.worker import httpconn
from chatd.worker.front import Front, connection_class
from chatd.worker.httpconn import Request, Responder

pytestmark = pytest.mark.timeout(30)


class App:
    """An HTTP handler recording what it saw; /stream streams, /wait waits until cancelled."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.waiting = asyncio.Event()
        self.seen: list[tuple[str, str, bytes]] = []

    async def __call__(self, req: Request, resp: Responder) -> None:
        self.seen.append((req.method, req.target, req.body))
        if req.target == "/stream":
            await resp.start(200, [("Content-Type", "application/x-ndjson")])
            for i in range(3):
                await resp.write(b'{"n":%d}\n' % i)
            await resp.end()
        elif req.target == "/wait":
            self.waiting.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        elif req.target == "/fail":
            raise ValueError("a bug")
        else:
            body = b"hello " + req.body
            await resp.send(200, [("Content-Type", "text/plain")], body)


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def started(app: App, **limits: Any) -> AsyncIterator[tuple[int, Front]]:
    front = Front(
        app,
        max_header_bytes=limits.get("max_header_bytes", 4096),
        max_header_count=limits.get("max_header_count", 16),
        open_timeout=limits.get("open_timeout", 5.0),
        max_connections=limits.get("max_connections", 0),
        max_per_ip=limits.get("max_per_ip", 0),
        max_body=limits.get("max_body", 1024 * 1024),
    )
    async with serve(echo, "127.0.0.1", 0, create_connection=connection_class(front)) as server:
        yield server.sockets[0].getsockname()[1], front


def run(test: Callable[[int, Front, App], Any], **limits: Any) -> None:
    async def main() -> None:
        app = App()
        async for port, front in started(app, **limits):
            await test(port, front, app)

    asyncio.run(main())


def blocking(fn: Callable[[], Any]) -> Any:
    return asyncio.to_thread(fn)


def test_whole_and_streamed_responses_on_one_keep_alive_connection() -> None:
    async def test(port: int, front: Front, app: App) -> None:
        def client() -> list[Any]:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("POST", "/x", body=b"world")
            r1 = c.getresponse()
            first = (r1.status, r1.read())
            c.request("GET", "/stream")
            r2 = c.getresponse()
            second = (r2.status, r2.getheader("Transfer-Encoding"), r2.read())
            c.request("HEAD", "/x")
            r3 = c.getresponse()
            third = (r3.status, r3.getheader("Content-Length"), r3.read())
            c.close()
            return [first, second, third]

        got = await blocking(client)
        assert got[0] == (200, b"hello world")
        assert got[1] == (200, "chunked", b'{"n":0}\n{"n":1}\n{"n":2}\n')
        assert got[2] == (200, "6", b"")  # HEAD: the length a GET would have, no body
        assert [s[:2] for s in app.seen] == [("POST", "/x"), ("GET", "/stream"), ("HEAD", "/x")]
        assert len(front.http) <= 1

    run(test)


def test_a_websocket_upgrade_still_goes_to_websockets() -> None:
    async def test(port: int, front: Front, app: App) -> None:
        async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send("ping me")
            assert await ws.recv() == "ping me"
        assert app.seen == [] and not front.http

    run(test)


def test_a_client_that_leaves_cancels_its_request() -> None:
    async def test(port: int, front: Front, app: App) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(app.waiting.wait(), 5)
        writer.close()
        await asyncio.wait_for(app.cancelled.wait(), 5)

    run(test)


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def raw_one(port: int, data: bytes) -> bytes:
    """Send one request; return the answer's head and first bytes (the connection stays)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        return s.recv(65536)


def test_bounds_and_bad_requests() -> None:
    async def test(port: int, front: Front, app: App) -> None:
        big = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(60))
        assert (await blocking(lambda: raw(port, big + b"\r\n"))).startswith(b"HTTP/1.1 431 ")
        many = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(20)) + b"\r\n"
        assert (await blocking(lambda: raw(port, many))).startswith(b"HTTP/1.1 431 ")
        junk = b"FROB /x HTTP/9.9\r\n\r\n"
        assert (await blocking(lambda: raw(port, junk))).startswith(b"HTTP/1.1 400 ")
        failing = b"GET /fail HTTP/1.1\r\nHost: x\r\n\r\n"
        answer = await blocking(lambda: raw(port, failing))
        assert answer.startswith(b"HTTP/1.1 500 ") and b"log reference" in answer
        # Two requests in one write (pipelining): the first is answered, then the connection
        # closes; the second is not served.
        two = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
        answer = await blocking(lambda: raw(port, two))
        assert answer.count(b"HTTP/1.1 200 ") == 1 and b"Connection: close" in answer
        assert ("GET", "/b", b"") not in app.seen

    run(test, max_header_bytes=4096, max_header_count=16)


def test_a_body_over_the_limit_is_refused() -> None:
    async def test(port: int, front: Front, app: App) -> None:
        req = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"b" * 5000
        assert (await blocking(lambda: raw(port, req))).startswith(b"HTTP/1.1 413 ")
        assert app.seen == []

    run(test, max_body=1000)


def test_a_silent_connection_is_closed_at_the_open_timeout() -> None:
    async def test(port: int, front: Front, app: App) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTT")  # never finished
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
        writer.close()

    run(test, open_timeout=0.3)


def test_later_requests_are_bounded_too() -> None:
    """A keep-alive connection's second request: a head over the bound is refused (431), a
    body promised and never sent is cut at the open timeout, a WebSocket upgrade gets 503
    (only a first request may become one)."""

    async def test(port: int, front: Front, app: App) -> None:
        first = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"
        big = b"GET /y HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 20_000 + b"\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(first)
        assert (await reader.readuntil(b"hello ")).startswith(b"HTTP/1.1 200 ")
        writer.write(big)
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 431 ")
        writer.close()
        # A large body in the same read as its head is no large head.
        post = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n" + b"b" * 50_000
        assert (await blocking(lambda: raw_one(port, post))).startswith(b"HTTP/1.1 200 ")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(first + b"POST /z HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        got = await asyncio.wait_for(reader.read(), 5)  # cut: the body never came
        assert got.count(b"HTTP/1.1 200 ") == 1
        writer.close()
        upgrade = (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(first)
        assert (await reader.readuntil(b"hello ")).startswith(b"HTTP/1.1 200 ")
        writer.write(upgrade)
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"new connection" in answer
        writer.close()

    run(test, max_header_bytes=4096, open_timeout=0.5)


def test_http_connections_count_against_the_limits() -> None:
    async def test(port: int, front: Front, app: App) -> None:
        held = []
        for _ in range(2):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await r.readuntil(b"hello ")).startswith(b"HTTP/1.1 200 ")
            held.append(w)
        answer = await blocking(lambda: raw(port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert answer.startswith(b"HTTP/1.1 429 ") and b"Retry-After: 5" in answer
        assert b"text/plain" in answer
        # A request of an API gets the refusal in its API's shape, retryable.
        openai = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n"
        answer = await blocking(lambda: raw(port, openai))
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 429 ") and b"x-should-retry: true" in head
        assert json.loads(body)["error"]["type"] == "rate_limit_error"
        answer = await blocking(lambda: raw(port, b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {
            "error": "too many connections from 127.0.0.1: retry later"
        }
        for w in held:
            w.close()

    run(test, max_per_ip=2)


def test_a_client_that_stops_reading_a_response_is_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpconn, "DRAIN_TIMEOUT", 0.3)

    class Big(App):
        async def __call__(self, req: Request, resp: Responder) -> None:
            await resp.start(200, [("Content-Type", "text/plain")])
            try:
                for _ in range(10_000):
                    await resp.write(b"x" * 65536)
            except ConnectionError:
                self.cancelled.set()
                raise

    async def main() -> None:
        app = Big()
        async for port, _front in started(app):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
            await asyncio.wait_for(app.cancelled.wait(), 10)
            s.close()

    asyncio.run(main())
