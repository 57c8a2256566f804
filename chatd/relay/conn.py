"""One keep-alive HTTP/1.1 connection of the relay's :mod:`~chatd.relay.pool`, and its response.

:class:`Conn` is the asyncio protocol of one connection: it writes a request, parses the
response with ``httptools`` (llhttp) and decides how the body ends (RFC 9112 §6.3, see the
pool's docstring); :class:`Response` hands the body over as it arrives, with flow control
(HIGH_WATER). The errors are the pool's: :class:`ConnectError`, :class:`BrokenResponse`.
"""

from __future__ import annotations

import asyncio
import socket
from types import TracebackType
from typing import Protocol, cast

import httptools

HIGH_WATER = 1 << 20
"""Unread body bytes above which the socket stops being read (resumed once read)."""


class Owner(Protocol):
    """What a connection needs of its pool."""

    conns: set[Conn]

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def release(self, conn: Conn) -> None: ...

    def drop(self, conn: Conn) -> None: ...


class ConnectError(ConnectionError):
    """No connection to the backend could be made.

    Attributes:
        reason: what went wrong, as a phrase ("connecting failed: Connection refused").
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BrokenResponse(ConnectionError):
    """The connection broke, or the server broke HTTP, before the response was whole.

    The message says which: ``invalid HTTP response: ...``, ``... closed before the
    response``, ``... in the middle of the response body ...`` (reset, or shorter than
    announced), ``the connection pool is closed``.
    """


class Stale(BrokenResponse):
    """A reused connection closed before any response byte: the request may be sent again."""


class Response:
    """One response: ``status``, then the body through :meth:`readany`.

    Use as ``async with``: on exit the connection is closed unless the response was complete
    (then it is back in the pool already), so leaving early, on an error or a cancellation,
    never leaves a half-read connection to be reused.
    """

    __slots__ = ("_buf", "_conn", "_eof", "_exc", "_size", "_waiter", "status")

    def __init__(self, conn: Conn) -> None:
        self.status = 0
        self._conn: Conn | None = conn  # None once the response is complete or closed
        self._buf: list[bytes] = []
        self._size = 0
        self._eof = False
        self._exc: BrokenResponse | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def readany(self) -> bytes:
        """The body bytes received since the last call (waits for some); b"" at the end.

        Raises BrokenResponse when the body was cut, after the bytes received before the cut.
        """
        while True:
            buf = self._buf
            if buf:
                data = buf[0] if len(buf) == 1 else b"".join(buf)
                buf.clear()
                if self._size > HIGH_WATER and self._conn is not None:
                    self._conn.resume()
                self._size = 0
                return data
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            await self._wait()

    def at_eof(self) -> bool:
        """Whether the whole body has been received and read."""
        return self._eof and not self._buf

    def close(self) -> None:
        """Close the connection unless the response was complete (then it is pooled)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def _wait(self) -> None:
        conn = self._conn  # its pool's loop: no lookup of the running loop (Pool.loop)
        loop = conn._pool.loop if conn is not None else asyncio.get_running_loop()
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._buf.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _end(self, exc: BrokenResponse | None = None) -> None:
        if self._eof or self._exc is not None:
            return  # the first end (whole, or the first failure) is the one that counts
        if exc is None:
            self._eof = True
        else:
            self._exc = exc
        self._wake()


class Conn(asyncio.Protocol):
    """One connection: an asyncio Protocol and the httptools parser's callbacks.

    ``resp`` is the response being received (None while idle). ``got_bytes`` says whether any
    byte of that response came back, which decides whether a failure may be retried.
    """

    def __init__(self, pool: Owner) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.resp: Response | None = None
        self.reused = self.lost = self.got_bytes = self._paused = self._closing = False
        self.idle_since = 0.0  # loop time of the last release to the pool
        # Per response: how its body ends (llhttp does it, but it cannot be told about EOF).
        self._sized = self._chunked = self._interim = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast: uvloop's TCPTransport has Transport's methods without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Both loops set it already; it is stated here because the head and body are one
            # write and the first token must not wait for a delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pool.conns.add(self)

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # bytes nobody asked for: this connection is out of step
            self.close()
            return
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            # One of our callbacks raised (a second response in one read): say that, not
            # httptools' "User callback error".
            why = exc.__context__ if isinstance(exc.__context__, BrokenResponse) else exc
            resp._end(BrokenResponse(f"invalid HTTP response: {why}"))
            self.close()
        except httptools.HttpParserError as exc:
            resp._end(BrokenResponse(f"invalid HTTP response: {exc}"))
            self.close()
        except httptools.HttpParserUpgrade:  # not an HttpParserError: it must not escape
            resp._end(BrokenResponse("invalid HTTP response: the server switched protocols"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._pool.drop(self)
        resp, self.resp = self.resp, None
        if resp is None:
            return
        if resp.status:  # in the body (the head is complete)
            resp._end(self._body_end(exc))
        elif self.reused and not self.got_bytes:
            resp._end(Stale("a kept-alive connection was closed before the response"))
        else:
            why = f" ({exc})" if exc else ""
            resp._end(BrokenResponse(f"the connection closed before the response{why}"))

    def _body_end(self, exc: Exception | None) -> BrokenResponse | None:
        """What the end of the connection means for the body being received: None if it
        ends the body (a clean EOF of a close-delimited one), else the error."""
        if exc is not None:
            return BrokenResponse(
                "the connection was reset in the middle of the response body "
                f"({type(exc).__name__}: {exc})"
            )
        if self._closing:
            return BrokenResponse("the connection was closed in the middle of the response body")
        if self._sized:
            return BrokenResponse(
                "the connection closed in the middle of the response body "
                "(shorter than its Content-Length)"
            )
        if self._chunked:
            return BrokenResponse(
                "the connection closed in the middle of the response body (before its last chunk)"
            )
        return None  # a body delimited by the end of the connection: it is whole

    # -- httptools callbacks (called from feed_data) ----------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            self._sized = True
        elif name == b"transfer-encoding":
            # Chunked only when chunked is the last coding (RFC 9112 §6.3), as llhttp reads it.
            self._chunked = value.rpartition(b",")[2].strip().lower() == b"chunked"

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # "100 Continue" and friends: the real head follows
            self._interim = True
            return
        resp = self._current()
        resp.status = status
        resp._wake()

    def on_body(self, body: bytes) -> None:
        self._current()._feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = self._sized = self._chunked = False
            return
        resp = self._current()
        self.resp = resp._conn = None  # the response no longer owns the connection
        resp._end()
        if self._parser.should_keep_alive():
            self.resume()  # a body held back by flow control is all in the buffer now
            self._pool.release(self)
        else:
            self.close()

    def _current(self) -> Response:
        if self.resp is None:  # raised through feed_data: data_received closes the connection
            raise BrokenResponse("the server sent more than one response")
        return self.resp

    # -- used by Pool and Response ---------------------------------------------------------

    def start(self, data: bytes) -> Response:
        """Send one request (head and body in ``data``); its response is returned."""
        assert self.transport is not None
        resp = self.resp = Response(self)
        self.got_bytes = self._sized = self._chunked = self._interim = False
        self.transport.write(data)
        return resp

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.lost:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Close at once; the pending response (if any) fails when connection_lost runs."""
        self._closing = True
        self._pool.drop(self)
        if self.transport is not None:
            self.transport.close()


async def read_capped(resp: Response, limit: int) -> bytes:
    """Up to ``limit`` bytes of a body (a huge error body is not worth more)."""
    buf = bytearray()
    while len(buf) < limit:
        data = await resp.readany()
        if not data:
            break
        buf += data
    return bytes(buf[:limit])


async def drain(resp: Response, within: float) -> None:
    """Wait at most ``within`` seconds for the end of the body (after a reply's done chunk), so
    that the connection goes back to the pool; a body kept open longer is cut."""
    if resp.at_eof():
        return
    try:
        async with asyncio.timeout(within):
            while await resp.readany():
                pass
    except (TimeoutError, OSError):
        resp.close()
