"""Component tests of chatd.relay.pool, the relay's lean keep-alive HTTP/1.1 client.

Each test runs the Pool against a tiny asyncio HTTP server defined here, whose answer to
each request is a small coroutine (so every wire case is exact: how the body is delimited,
where the connection is cut). Runs on both asyncio's loop and uvloop (the workers' loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from chatd.relay.conn import HIGH_WATER, BrokenResponse, ConnectError, Response
from chatd.relay.pool import Pool

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
    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
    ) -> AsyncIterator[Server]:
        server = await asyncio.start_server(self._serve, host, port, ssl=tls)
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


# -- how a body ends (RFC 9112 §6.3) ---------------------------------------------------


def reset(w: Writer) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()


def test_a_reset_in_a_close_delimited_body_is_an_error_not_its_end() -> None:
    async def main() -> None:
        got_part = asyncio.Event()  # set once the client has read the part sent

        async def part_then_reset(w: Writer, n: int, req: bytes) -> bool:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\npart")
            await w.drain()
            await got_part.wait()
            reset(w)
            return False

        server = Server(part_then_reset)
        async with server.serve():
            pool = pool_of(server)
            async with await pool.request(pool.head("POST", "/", "*/*"), b"{}") as resp:
                assert resp.status == 200
                assert await resp.readany() == b"part"
                got_part.set()
                with pytest.raises(BrokenResponse, match="reset"):
                    await resp.readany()
                assert not resp.at_eof()
            assert not pool.conns
            pool.close()

    both(main)


def raw(data: bytes, keep: bool = False) -> Answer:
    """Answer with exactly ``data``; keep the connection open or not."""

    async def answer(w: Writer, n: int, req: bytes) -> bool:
        w.write(data)
        await w.drain()
        return keep

    return answer


def test_a_clean_eof_ends_a_close_delimited_body_after_interim_responses() -> None:
    async def main() -> None:
        server = Server(
            raw(
                b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                keep=True,
            ),
            raw(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\n\r\nuntil EOF"),
        )
        async with server.serve():
            pool = pool_of(server)
            assert await post(pool) == (200, b"ok")  # the interim heads are skipped
            assert await post(pool) == (200, b"until EOF")  # same connection: kept alive
            assert server.connections == 1
            pool.close()

    both(main)


@pytest.mark.parametrize(
    ("head", "words"),
    [
        (b"garbage\r\n\r\n", "invalid HTTP response"),
        (b"HTTP/1.1 2OO OK\r\n\r\n", "invalid HTTP response"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "invalid HTTP response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid HTTP response"),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: upgrade\r\n\r\n",
            "switched protocols",
        ),
    ],
)
def test_a_malformed_head_is_a_clear_broken_response(
    head: bytes, words: str, caplog: pytest.LogCaptureFixture
) -> None:
    """llhttp's verdict becomes BrokenResponse, and nothing escapes into the event loop (which
    would log "Fatal error: protocol.data_received() call failed")."""

    async def main() -> None:
        server = Server(raw(head))
        async with server.serve():
            pool = pool_of(server)
            with pytest.raises(BrokenResponse, match=words):
                await post(pool)
            assert not pool.conns
            pool.close()

    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        both(main)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_second_response_in_the_same_read_closes_the_connection() -> None:
    async def main() -> None:
        sized = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n"
        server = Server(raw(sized + b"x" + sized + b"y", keep=True))
        async with server.serve():
            pool = pool_of(server)
            assert await post(pool) == (200, b"x")  # whole, before the unasked-for bytes
            assert await post(pool) == (200, b"x")  # on a new connection
            assert server.connections == 2
            pool.close()

    both(main)


def test_a_sized_body_cut_short_says_so() -> None:
    async def main() -> None:
        server = Server(raw(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))
        async with server.serve():
            pool = pool_of(server)
            with pytest.raises(BrokenResponse, match="shorter than its Content-Length"):
                await post(pool)
            pool.close()

    both(main)


def test_headers_go_on_every_request_and_cannot_inject_lines() -> None:
    async def main() -> None:
        server = Server(content_length(b"{}"))
        async with server.serve():
            url = f"http://127.0.0.1:{server.port}"
            pool = Pool(url, connect_timeout=1.0, headers={"Authorization": "Bearer k1"})
            assert await post(pool) == (200, b"{}")
            async with await pool.request(pool.head("GET", "/api/ps", "*/*")) as resp:
                await read_all(resp)
            assert all(b"\r\nAuthorization: Bearer k1\r\n" in h for h, _ in server.requests)
            assert "k1" not in repr(pool)
            pool.close()
        for bad in ({"Authorization": "Bearer k\r\nX-Evil: 1"}, {"X:Y": "v"}, {"": "v"}):
            with pytest.raises(ValueError) as info:
                Pool("http://127.0.0.1:1", connect_timeout=1.0, headers=bad)
            assert "X-Evil" not in str(info.value)

    both(main)


def test_an_idle_connection_is_closed_after_idle_timeout_and_not_reused() -> None:
    async def main() -> None:
        server = Server(content_length(b"ok"))
        async with server.serve():
            url = f"http://127.0.0.1:{server.port}"
            pool = Pool(url, connect_timeout=1.0, idle_timeout=0.05)
            assert await post(pool) == (200, b"ok")
            # The pool closes it (the server would keep it open forever).
            assert await eventually(lambda: server.open_conns == 0 and not pool.conns)
            assert await post(pool) == (200, b"ok")
            assert server.connections == 2
            pool.close()
            # With no idle time allowed, a connection is never reused, whichever of the
            # sweeper and the next request sees it first.
            server.connections = 0
            pool = Pool(url, connect_timeout=1.0, idle_timeout=0.0)
            for _ in range(3):
                assert await post(pool) == (200, b"ok")
            assert server.connections == 3
            pool.close()

    both(main)


def test_an_ipv6_literal_url() -> None:
    async def main() -> None:
        server = Server(content_length(b"v6"))
        async with server.serve(host="::1"):
            pool = Pool(f"http://[::1]:{server.port}/p", connect_timeout=1.0)
            assert await post(pool) == (200, b"v6")
            head, _ = server.requests[0]
            assert head.startswith(b"POST /p/api/chat HTTP/1.1\r\n")
            assert f"\r\nHost: [::1]:{server.port}\r\n".encode() in head
            pool.close()

    both(main)


def blackholed_ipv6() -> tuple[socket.socket, list[socket.socket]]:
    """A listener on ::1 whose accept queue is full: the kernel drops further SYNs, so a
    connect to it hangs, like one to a blackholed address (on loopback, sending nothing out)."""
    lsock = socket.socket(socket.AF_INET6)
    lsock.bind(("::1", 0))
    lsock.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket(socket.AF_INET6)
        s.setblocking(False)
        s.connect_ex(lsock.getsockname()[:2])
        fillers.append(s)
    return lsock, fillers


def test_happy_eyeballs_a_blackholed_ipv6_address_does_not_eat_the_connect_timeout() -> None:
    """A name resolving to a hanging ::1 first and a listening 127.0.0.1 second (as
    getaddrinfo orders a dual-stack name): the connect goes over IPv4 well within
    connect_timeout, where trying the addresses in turn would spend it all on ::1."""
    lsock, fillers = blackholed_ipv6()
    port = lsock.getsockname()[1]

    async def main() -> None:
        server = Server(content_length(b"v4"))
        try:
            ctx = server.serve(port=port)
            await ctx.__aenter__()
        except OSError:
            pytest.skip(f"127.0.0.1:{port} is taken")
        try:
            pool = Pool(f"http://dual-stack.test:{port}", connect_timeout=10.0)

            async def addresses() -> list[tuple[Any, ...]]:
                tcp = (socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
                return [
                    (socket.AF_INET6, *tcp, ("::1", port, 0, 0)),
                    (socket.AF_INET, *tcp, ("127.0.0.1", port)),
                ]

            pool._addresses = addresses  # type: ignore[method-assign]
            assert await post(pool) == (200, b"v4")
            head, _ = server.requests[0]
            assert f"\r\nHost: dual-stack.test:{port}\r\n".encode() in head
            pool.close()
        finally:
            await ctx.__aexit__(None, None, None)

    try:
        # Under 10 s each (both()'s bound): sequential attempts would need the whole 10 s.
        both(main)
    finally:
        for s in (lsock, *fillers):
            s.close()


def test_https_with_a_verified_certificate(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TLS backend (certificate from trustme's throwaway CA, trusted via SSL_CERT_FILE):
    requests, keep-alive, a reset body over TLS; an untrusted certificate is a ConnectError."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(tls)
    untrusted = Pool("https://localhost:1", connect_timeout=1.0)._ssl  # the system's CAs
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))

    async def main() -> None:
        got_part = asyncio.Event()

        async def part_then_reset(w: Writer, n: int, req: bytes) -> bool:
            w.write(b"HTTP/1.1 200 OK\r\n\r\npart")
            await w.drain()
            await got_part.wait()
            reset(w)
            return False

        server = Server(content_length(b"secure"), content_length(b"again"), part_then_reset)
        async with server.serve(tls=tls):
            pool = Pool(f"https://localhost:{server.port}", connect_timeout=2.0)
            assert await post(pool) == (200, b"secure")
            assert await post(pool) == (200, b"again")
            assert server.connections == 1
            async with await pool.request(pool.head("POST", "/", "*/*"), b"{}") as resp:
                assert await resp.readany() == b"part"
                got_part.set()
                with pytest.raises(BrokenResponse):
                    await resp.readany()
            pool.close()

            pool = Pool(f"https://localhost:{server.port}", connect_timeout=2.0)
            pool._ssl = untrusted
            with pytest.raises(
                ConnectError, match=r"TLS handshake failed \(certificate verify failed: "
            ):
                await post(pool)
            pool.close()

    both(main)
