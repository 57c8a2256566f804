"""A lean HTTP/1.1 client for the relay's hot path: the streaming ``POST`` of a generation.

aiohttp's general machinery (ClientRequest, payload writers, header multidicts, URL
building, StreamReader) cost about 300 µs of worker CPU per relayed message, more than
anything else left on that path. This module does only what :class:`chatd.relay.generate.Relay`
needs for a generation: a POST of a JSON body (and the ``GET /api/ps`` before it) on a
keep-alive connection, the response parsed by ``httptools`` (llhttp, the C parser uvicorn
uses), the body handed over as it arrives. aiohttp stays in use for the rare requests
(health checks, prewarm).

Contracts:

* :class:`Pool` keeps keep-alive connections to one backend, reused LIFO, without a limit
  (the master's LLM slots bound the requests in flight). A connection goes back to the pool
  only when its response was complete and keep-alive; one whose response was not read to
  the end, that got ``Connection: close`` or failed is closed. An idle connection the server
  closes is dropped as soon as the loop sees it.
* :meth:`Pool.request` sends the head and body with one ``transport.write`` and returns
  once the response head is in. If a *reused* connection breaks before any response byte
  came back (the server closed it while we were sending: the keep-alive race, which
  llama.cpp's server invites, closing the connection after each streamed response although
  it announces keep-alive), the request is sent once more on a new connection: nothing of a
  reply was received. Never after a response byte, never twice.
* Failures raise :class:`ConnectError` (connecting failed; ``reason`` is a phrase for the
  user) or :class:`BrokenResponse` (reset, truncated or malformed response); both are
  ConnectionErrors. Cancelling the awaiting task closes the connection at once.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from types import TracebackType
from typing import cast
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 1 << 20
"""Unread body bytes above which the socket stops being read (resumed once read)."""


class ConnectError(ConnectionError):
    """No connection to the backend could be made.

    Attributes:
        reason: what went wrong, as a phrase ("connecting failed: Connection refused").
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BrokenResponse(ConnectionError):
    """The connection broke, or the server broke HTTP, before the response was whole."""


class _Stale(BrokenResponse):
    """A reused connection closed before any response byte: the request may be sent again."""


class Response:
    """One response: ``status``, then the body through :meth:`readany`.

    Use as ``async with``: on exit the connection is closed unless the response was complete
    (then it is back in the pool already), so leaving early, on an error or a cancellation,
    never leaves a half-read connection to be reused.
    """

    __slots__ = ("_buf", "_conn", "_eof", "_exc", "_size", "_waiter", "status")

    def __init__(self, conn: _Conn) -> None:
        self.status = 0
        self._conn: _Conn | None = conn  # None once the response is complete or closed
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
        self._waiter = asyncio.get_running_loop().create_future()
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


class _Conn(asyncio.Protocol):
    """One connection: an asyncio Protocol and the httptools parser's callbacks.

    ``resp`` is the response being received (None while idle). ``got_bytes`` says whether any
    byte of that response came back, which decides whether a failure may be retried.
    """

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.resp: Response | None = None
        self.reused = self.lost = self.got_bytes = self._paused = False
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
        except httptools.HttpParserError as exc:
            resp._end(BrokenResponse(f"invalid HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._pool.drop(self)
        resp, self.resp = self.resp, None
        if resp is None:
            return
        if resp.status and not (self._sized or self._chunked):
            resp._end()  # a body delimited by the end of the connection: it is whole
        elif resp.status:
            resp._end(BrokenResponse("the connection closed in the middle of the response"))
        elif self.reused and not self.got_bytes:
            resp._end(_Stale("a kept-alive connection was closed before the response"))
        else:
            why = f" ({exc})" if exc else ""
            resp._end(BrokenResponse(f"the connection closed before the response{why}"))

    # -- httptools callbacks (called from feed_data) ----------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            self._sized = True
        elif name == b"transfer-encoding":
            self._chunked = b"chunked" in value.lower()

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
        self._pool.drop(self)
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Keep-alive connections to one backend (``base_url``: scheme, host, port, prefix).

    Requests are built by :meth:`head` (once per route, by the caller) and sent by
    :meth:`request`. ``connect_timeout`` bounds each connect (DNS included). Use from one
    event loop; :meth:`close` closes every connection, and the responses still being
    received then fail with BrokenResponse.
    """

    def __init__(self, base_url: str, *, connect_timeout: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._connect_timeout = connect_timeout
        self._prefix = parts.path.rstrip("/")
        self._netloc = parts.netloc.rpartition("@")[2]
        self._idle: list[_Conn] = []  # LIFO: the most recently used is the least likely stale
        self.conns: set[_Conn] = set()  # every open connection, idle or busy
        self._closed = False

    def head(self, method: str, path: str, accept: str) -> bytes:
        """The request head for ``method path`` (below the base URL's path), without the
        blank line that ends it; :meth:`request` adds Content-Length (and Content-Type:
        application/json) when there is a body."""
        return (
            f"{method} {self._prefix}{path} HTTP/1.1\r\nHost: {self._netloc}\r\n"
            f"User-Agent: chatd\r\nAccept: {accept}\r\n"
        ).encode("latin-1")

    async def request(self, head: bytes, body: bytes | None = None) -> Response:
        """Send the request (``body``: JSON); the response once its head is in.

        Raises:
            ConnectError: no connection could be made (refused, DNS, connect timeout).
            BrokenResponse: the connection broke before the response head was whole.
        """
        if self._closed:
            raise BrokenResponse("the connection pool is closed")
        if body is None:
            data = head + b"\r\n"
        else:  # one buffer, so one write (and one segment for a small request)
            data = b"%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
                head,
                len(body),
                body,
            )
        while self._idle:
            conn = self._idle.pop()
            if conn.lost:
                continue
            try:
                return await self._send(conn, data)
            except _Stale:
                break  # the keep-alive race: once more, on a new connection
        conn = await self._connect()
        try:
            return await self._send(conn, data)
        except _Stale as exc:  # cannot happen on a fresh connection; said plainly anyway
            raise BrokenResponse(str(exc)) from None

    async def _send(self, conn: _Conn, data: bytes) -> Response:
        resp = conn.start(data)
        try:
            while not resp.status and resp._exc is None:
                await resp._wait()
        except BaseException:  # a cancellation: never leave the request half done
            conn.close()
            raise
        if resp._exc is not None:
            raise resp._exc
        return resp

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )
        except socket.gaierror:
            raise ConnectError("its host name does not resolve") from None
        except TimeoutError:
            raise ConnectError("it did not accept the connection in time") from None
        except OSError as exc:
            raise ConnectError(f"connecting failed: {exc.strerror or exc}") from exc
        if self._closed:
            conn.close()
            raise BrokenResponse("the connection pool is closed")
        return conn

    def release(self, conn: _Conn) -> None:
        """Put a connection whose response is complete back for the next request."""
        conn.reused = True
        if not self._closed and not conn.lost:
            self._idle.append(conn)
        else:
            conn.close()

    def drop(self, conn: _Conn) -> None:
        """Forget a connection that is closing (idempotent)."""
        self.conns.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        """Close every connection; later :meth:`post` calls raise BrokenResponse."""
        self._closed = True
        for conn in list(self.conns):
            conn.close()
        self._idle.clear()
