"""Component tests of chatd.relay.pool, the relay's lean keep-alive HTTP/1.1 client.

Each test runs the Pool against a tiny asyncio HTTP server defined here, whose answer to
each request is a small coroutine (so every wire case is exact: how the body is delimited,
where the connection is cut). Runs on both asyncio's loop and uvloop (the workers' loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from chatd.relay.pool import HIGH_WATER, BrokenResponse, ConnectError, Pool, Response

pytestmark = pytest.mark.timeout(30)

Writer = asyncio.StreamWriter
# An answer: (writer, request number on its connection from 0, request body) -> keep open?
Answer = Callable[[Writer, int, bytes], Awaitable[bool]]


def both(make: Callable[[], Coroutine[Any, Any, Any]]) -> None:
    """Run the test body on asyncio's loop, then on uvloop, bounded to 10 s each."""
    asyncio.run(asyncio.wait_for(make(), 10))
    uvloop.run(asyncio.wait_for(make(), 10))


class Server:
    """Counts connections and requests; answers request i with ``answers[i]`` (the last one
    repeats). ``open_conns`` are the connections the server still has open."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        self.open_conns = 0
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        self.connections += 1
        self.open_conns += 1
        try:
            for n in range(1000):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                size = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        size = int(line.split(b":")[1])
                body = await reader.readexactly(size)
                self.requests.append((head, body))
                answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
                if not await answer(writer, n, body):
                    return
        finally:
            self.open_conns -= 1
            writer.close()

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[Server]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()


def content_length(body: bytes, extra: bytes = b"") -> Answer:
    async def answer(w: Writer, n: int, req: bytes) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body))
        await w.drain()
        return b"close" not in extra

    return answer


def chunked(*pieces: bytes, pause: float = 0.0, end: bool = True) -> Answer:
    async def answer(w: Writer, n: int, req: bytes) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for p in pieces:
            w.write(b"%x\r\n%s\r\n" % (len(p), p))
            await w.drain()
            await asyncio.sleep(pause)
        if end:
            w.write(b"0\r\n\r\n")
        await w.drain()
        return end

    return answer


async def eof_body(w: Writer, n: int, req: bytes) -> bool:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
    await w.drain()
    return False  # the server closes: that ends the body


async def close_silently(w: Writer, n: int, req: bytes) -> bool:
    return False


async def read_all(resp: Response) -> bytes:
    buf = b""
    while data := await resp.readany():
        buf += data
    return buf


async def post(pool: Pool, body: bytes = b"{}") -> tuple[int, bytes]:
    async with await pool.request(pool.head("POST", "/api/chat", "*/*"), body) as resp:
        return resp.status, await read_all(resp)


def pool_of(server: Server, prefix: str = "") -> Pool:
    return Pool(f"http://127.0.0.1:{server.port}{prefix}", connect_timeout=1.0)


async def eventually(check: Callable[[], bool]) -> bool:
    for _ in range(100):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


def test_keep_alive_reuses_one_connection_and_sends_one_exact_request() -> None:
    async def main() -> None:
        server = Server(content_length(b'{"ok":1}'))
        async with server.serve():
            pool = pool_of(server, "/base")
            for i in range(5):
                assert await post(pool, b'{"n":%d}' % i) == (200, b'{"ok":1}')
            assert server.connections == 1 and len(server.requests) == 5
            head, body = server.requests[-1]
            assert head.startswith(b"POST /base/api/chat HTTP/1.1\r\n")
            assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in head
            assert b"Content-Type: application/json\r\n" in head
            assert b"Content-Length: 7\r\n" in head and body == b'{"n":4}'
            pool.close()

    both(main)


def test_chunked_content_length_and_eof_bodies() -> None:
    async def main() -> None:
        server = Server(
            chunked(b"ab", b"c" * 70_000, pause=0.01),
            content_length(b"x" * 100_000),
            eof_body,
            content_length(b"", b"Connection: close\r\n"),
            content_length(b"after"),
        )
        async with server.serve():
            pool = pool_of(server)
            assert await post(pool) == (200, b"ab" + b"c" * 70_000)
            assert await post(pool) == (200, b"x" * 100_000)
            assert server.connections == 1
            assert await post(pool) == (200, b"until the end")
            assert await post(pool) == (200, b"")  # Connection: close: not reused
            assert await post(pool) == (200, b"after")
            assert server.connections == 3
            pool.close()

    both(main)


def test_a_get_without_body() -> None:
    async def main() -> None:
        server = Server(content_length(b"{}"))
        async with server.serve():
            pool = pool_of(server)
            async with await pool.request(pool.head("GET", "/api/ps", "*/*")) as resp:
                assert (resp.status, await read_all(resp)) == (200, b"{}")
            head, body = server.requests[0]
            assert head.startswith(b"GET /api/ps HTTP/1.1\r\n") and body == b""
            assert b"Content-Length" not in head
            pool.close()

    both(main)


def test_an_idle_connection_closed_by_the_server_is_dropped() -> None:
    async def main() -> None:
        async def answer_then_close(w: Writer, n: int, req: bytes) -> bool:
            await content_length(b"one")(w, n, req)
            return False  # the server closes the idle connection without saying so

        server = Server(answer_then_close, content_length(b"two"))
        async with server.serve():
            pool = pool_of(server)
            assert await post(pool) == (200, b"one")
            assert await eventually(lambda: not pool.conns)  # seen closed: dropped
            assert await post(pool) == (200, b"two")
            assert server.connections == 2 and len(server.requests) == 2
            pool.close()

    both(main)


def test_the_keep_alive_race_is_retried_once_on_a_new_connection() -> None:
    async def main() -> None:
        # The connection dies when the 2nd request arrives on it, before any answer.
        async def first_only(w: Writer, n: int, req: bytes) -> bool:
            if n > 0:
                return False
            return await content_length(b"ok")(w, n, req)

        server = Server(first_only)
        async with server.serve():
            pool = pool_of(server)
            assert await post(pool) == (200, b"ok")
            assert await post(pool) == (200, b"ok")  # sent again on a fresh connection
            assert (server.connections, len(server.requests)) == (2, 3)
            pool.close()

    both(main)


def test_no_retry_on_a_fresh_connection_or_after_a_response_byte() -> None:
    async def main() -> None:
        server = Server(close_silently)
        async with server.serve():
            pool = pool_of(server)
            with pytest.raises(BrokenResponse, match="before the response"):
                await post(pool)
            assert (server.connections, len(server.requests)) == (1, 1)

            async def half_head(w: Writer, n: int, req: bytes) -> bool:
                if n == 0:
                    return await content_length(b"ok")(w, n, req)
                w.write(b"HTTP/1.1 200 OK\r\nContent-Le")
                await w.drain()
                return False

            server.answers = [half_head]
            assert await post(pool) == (200, b"ok")
            with pytest.raises(BrokenResponse):
                await post(pool)
            assert (server.connections, len(server.requests)) == (2, 3)  # not sent again
            pool.close()

    both(main)


def test_a_response_cut_mid_body_raises_after_the_bytes_received() -> None:
    async def cut_sized(w: Writer, n: int, req: bytes) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"y" * 50)
        await w.drain()
        await asyncio.sleep(0.05)
        return False

    async def main() -> None:
        for answer in (cut_sized, chunked(b"z" * 50, pause=0.05, end=False)):
            server = Server(answer)
            async with server.serve():
                pool = pool_of(server)
                async with await pool.request(pool.head("POST", "/", "*/*"), b"{}") as resp:
                    got = b""
                    with pytest.raises(BrokenResponse, match="middle of the response"):
                        while data := await resp.readany():
                            got += data
                    assert got == (b"y" if answer is cut_sized else b"z") * 50
                assert not pool.conns
                pool.close()

    both(main)


def test_cancelling_a_read_closes_the_connection() -> None:
    async def main() -> None:
        server = Server(chunked(*[b"tok"] * 100, pause=0.05))
        async with server.serve():
            pool = pool_of(server)
            started = asyncio.Event()

            async def reader() -> None:
                async with await pool.request(pool.head("POST", "/", "*/*"), b"{}") as resp:
                    await resp.readany()
                    started.set()
                    await read_all(resp)

            task = asyncio.create_task(reader())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await eventually(lambda: server.open_conns == 0)
            assert not pool.conns
            pool.close()

    both(main)


def test_cancelling_while_waiting_for_the_head_closes_the_connection() -> None:
    async def never(w: Writer, n: int, req: bytes) -> bool:
        await asyncio.sleep(5)
        return False

    async def main() -> None:
        server = Server(never)
        async with server.serve():
            pool = pool_of(server)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await post(pool)
            assert not pool.conns
            pool.close()

    both(main)


def test_flow_control_pauses_a_body_nobody_reads() -> None:
    big = bytes(range(256)) * (3 * HIGH_WATER // 256)

    async def main() -> None:
        server = Server(content_length(big), content_length(b"next"))
        async with server.serve():
            pool = pool_of(server)
            async with await pool.request(pool.head("POST", "/", "*/*"), b"{}") as resp:
                await asyncio.sleep(0.2)  # the server writes all it can meanwhile
                (conn,) = pool.conns
                assert conn.resp is resp  # not all received: reading was paused
                assert await read_all(resp) == big
            assert await post(pool) == (200, b"next")
            assert server.connections == 1
            pool.close()

    both(main)


def test_connect_errors_and_close() -> None:
    async def main() -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))  # bound, never listening: refused
            pool = Pool(f"http://127.0.0.1:{sock.getsockname()[1]}", connect_timeout=1.0)
            with pytest.raises(ConnectError) as info:
                await post(pool)
            assert info.value.reason.startswith("connecting failed: ")
        pool = Pool("http://no-such-host.invalid:1", connect_timeout=2.0)
        with pytest.raises(ConnectError, match="does not resolve"):
            await post(pool)
        server = Server(chunked(*[b"tok"] * 100, pause=0.05))
        async with server.serve():
            pool = pool_of(server)
            async with await pool.request(pool.head("POST", "/", "*/*"), b"{}") as resp:
                pool.close()  # an in-flight response fails
                with pytest.raises(BrokenResponse):
                    await read_all(resp)
            with pytest.raises(BrokenResponse, match="closed"):
                await post(pool)

    both(main)
