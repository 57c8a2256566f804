"""One plain HTTP/1.1 connection on a worker's port: requests in, whole or streamed responses out.

The front (:mod:`chatd.worker.front`) hands over every connection whose first request is not a
WebSocket upgrade, with the bytes read so far. :class:`HttpConnection` parses requests with
``httptools`` (llhttp, as the relay's pool does), one at a time: a request that arrives while
one is answered (pipelining, which none of the API clients does) closes the connection after
the current response, unanswered (the client sends it again). Each request runs as a task of
the handler; its :class:`Responder` writes either a whole response (``Content-Length``) or a
stream (``Transfer-Encoding: chunked``), waiting for flow control while the client reads
slowly (at most DRAIN_TIMEOUT).

Contracts:

* The client going away cancels the request's task at once (reading goes on while a request
  is answered, so its going is seen): a handler waiting for something stops waiting.
* Bounds: every request's head by ``max_header_bytes`` (the first one by the front) and
  ``max_header_count`` lines (431), its body by ``max_body`` (413), the whole request by
  ``open_timeout`` (then the connection is cut); one request at a time; a connection idle
  between requests for ``IDLE_TIMEOUT`` is closed; a later request asking for a WebSocket gets
  503 (only a connection's first request may become one).
* :meth:`HttpConnection.close_when_idle` (a draining worker): closed now if idle, else after its
  current response, which then says ``Connection: close``.
* A handler that fails before answering gets a 500 with a log reference; after a stream began,
  the stream is cut (the API layer writes its own in-band error first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import httptools
from websockets.datastructures import Headers

log = logging.getLogger("chatd.http")

MAX_BODY = 1024 * 1024
"""Bytes of request body accepted by default (beyond: 413); ``[api] max_body_bytes``."""

IDLE_TIMEOUT = 15.0
"""Seconds a keep-alive connection may wait for its next request."""

DRAIN_TIMEOUT = 30.0
"""Seconds a response may wait for a client that does not read before the connection is cut."""

_REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def single(headers: Headers, name: str) -> str:
    """A header's value; "" when it is absent or sent more than once (two ``Authorization``
    headers are ambiguous: neither is believed). websockets' ``Headers.get`` raises on a
    repeated header, which must never reach a handler as a 500."""
    values = headers.get_all(name)
    return values[0] if len(values) == 1 else ""


class Request:
    """One parsed request: ``method`` ("GET"...), ``target`` (the raw path and query),
    ``headers`` (websockets' Headers, case-insensitive), ``body``, ``peer`` (client IP)."""

    __slots__ = ("body", "headers", "method", "peer", "target")

    def __init__(self, method: str, target: str, headers: Headers, body: bytes, peer: str):
        self.method, self.target, self.headers, self.body, self.peer = (
            method,
            target,
            headers,
            body,
            peer,
        )


class Responder:
    """Writes the response to one request: :meth:`send` a whole one, or :meth:`start` a
    stream, :meth:`write` its pieces and :meth:`end` it."""

    __slots__ = ("_conn", "closing", "done", "head_only", "started")

    def __init__(self, conn: HttpConnection, head_only: bool) -> None:
        self._conn = conn
        self.head_only = head_only  # HEAD: headers as for GET, no body
        self.started = False
        self.done = False
        self.closing = False  # the connection closes after this response

    def _head(self, status: int, headers: Iterable[tuple[str, str]], framing: str) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(framing)
        if self.closing or self._conn.closing:
            self.closing = True
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def send(self, status: int, headers: Iterable[tuple[str, str]], body: bytes) -> None:
        """The whole response at once."""
        assert not self.started
        self.started = True
        head = self._head(status, headers, f"Content-Length: {len(body)}")
        self._conn.write(head if self.head_only else head + body)
        self.done = True
        await self._conn.drain()

    async def start(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        """The head of a streamed response (chunked)."""
        self.begin(status, headers)

    def begin(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        """:meth:`start`, for a callback that cannot wait (the head is only buffered)."""
        assert not self.started
        self.started = True
        self._conn.write(self._head(status, headers, "Transfer-Encoding: chunked"))

    def push(self, data: bytes) -> None:
        """One piece of a streamed body, buffered at once, for a callback that cannot wait
        (the relay's chunk callback). The bound replaces the wait: once more than the
        connection's ``max_outbound`` bytes are buffered unread, the connection is cut and
        :class:`ClientGone` raised, as a WebSocket over ``max_outbound_bytes`` is closed."""
        if self._conn.lost:
            raise ClientGone("the client went away")
        if data and not self.head_only:
            self._conn.write(b"%x\r\n%s\r\n" % (len(data), data))
            self._conn.check_outbound()

    async def write(self, data: bytes) -> None:
        """One piece of a streamed body (an empty piece is not written: it would end it)."""
        if data and not self.head_only:
            self._conn.write(b"%x\r\n%s\r\n" % (len(data), data))
            await self._conn.drain()

    async def end(self) -> None:
        """The end of a streamed body."""
        if not self.done:
            self.done = True
            if not self.head_only:
                self._conn.write(b"0\r\n\r\n")
            await self._conn.drain()


class ClientGone(Exception):
    """The client went away, or stopped reading past the bound, while a stream was pushed
    (not an OSError: the relay must not take it for a failure of the backend)."""


Handler = Callable[[Request, Responder], Awaitable[None]]
Refuser = Callable[[Request, Responder, int, str], Awaitable[None]]
"""Writes the answer to a request refused before its handler (413, 431, 400, 503), so that an
API request gets it in its API's shape."""


class Limits(Protocol):
    """What a connection needs of its worker's front (:class:`chatd.worker.front.Front`)."""

    handler: Handler
    max_header_count: int
    max_header_bytes: int
    open_timeout: float  # a request's head and body must come within it
    max_outbound: int  # bytes a pushed stream may leave unread (beyond: cut)
    max_body: int  # bytes of a request body (beyond: 413)
    draining: bool
    refuse: Refuser | None  # writes a refused request's answer (else plain text)

    def opened(self, conn: HttpConnection) -> None: ...

    def closed(self, conn: HttpConnection) -> None: ...


class HttpConnection(asyncio.Protocol):
    """An HTTP/1.1 connection (see the module docstring), bound by its front's ``limits``
    (which also counts it: a drain closes the open ones)."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._handler = limits.handler
        self._max_headers = limits.max_header_count
        self._max_header_bytes = limits.max_header_bytes
        self._head_bytes = 0  # bytes of the current request until its head is complete
        self._in_head = True
        self._deadline: asyncio.TimerHandle | None = None
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.closing = False  # close after the current response
        self._task: asyncio.Task[None] | None = None
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._error: tuple[int, str] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._idle: asyncio.TimerHandle | None = None
        self._lost = False
        self._pipelined = False  # a request arrived while one was being answered

    # -- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        self.closing = self._limits.draining
        self._limits.opened(self)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            # Bounded before the parser sees it: httptools keeps a header line whole in memory
            # until it ends, and the URL is no header at all. (Only up to the end of the head:
            # a body in the same read is no head.)
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end
            if self._head_bytes > self._max_header_bytes + 8192:  # + the request line
                self._fail(431, f"request head over {self._max_header_bytes} bytes")
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "an upgrade other than to WebSocket on /ws is not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")

    def eof_received(self) -> bool | None:
        return None  # close: a half-closed client gets its answer only if already written

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._limits.closed(self)
        for timer in (self._idle, self._deadline):
            if timer is not None:
                timer.cancel()
        self._writable.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client left: a queued request leaves the queue

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._task is not None:
            # Pipelined: no client of these APIs does it. The connection closes after the
            # current response; the client sends the request again on a new one.
            self._pipelined = self.closing = True
            return
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._url, self._headers, self._body, self._size = b"", [], [], 0
        # The whole request (head and body) must come within open_timeout.
        loop = asyncio.get_running_loop()
        if self._deadline is None and self.transport is not None:
            self._deadline = loop.call_later(self._limits.open_timeout, self.transport.abort)

    def on_url(self, url: bytes) -> None:
        if not self._pipelined and len(self._url) <= self._max_header_bytes:
            self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._pipelined:
            return
        if self._error is not None:
            return
        if len(self._headers) >= self._max_headers:
            self._error = (431, f"more than {self._max_headers} header lines")
        else:
            self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        # A client that waits for leave to send its body (curl does, for a large one): given at
        # once, unless the body is already refused (then the answer comes instead).
        if self._error is None and not self._pipelined and self.transport is not None:
            fields = {name.lower(): value for name, value in self._headers}
            if fields.get("expect", "").lower() == "100-continue":
                length = fields.get("content-length", "0")
                if length.isdigit() and int(length) > self._limits.max_body:
                    self._error = (413, f"request body over {self._limits.max_body} bytes")
                else:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._pipelined:
            return
        self._size += len(body)
        if self._size > self._limits.max_body:
            if self._error is None:
                self._error = (413, f"request body over {self._limits.max_body} bytes")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        if self._pipelined:
            return
        self._in_head, self._head_bytes = True, 0
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        # Reading goes on while the request is answered (not paused): a client that leaves
        # must be seen at once, so that its request leaves the queue or stops generating.
        method = self._parser.get_method().decode("ascii", "replace")
        if not self._parser.should_keep_alive():
            self.closing = True
        request = Request(method, self._url.decode("latin-1"), Headers(self._headers),
                          b"".join(self._body), self.peer)  # fmt: skip
        responder = Responder(self, head_only=method == "HEAD")
        error, self._error = self._error, None
        upgrade = ",".join(request.headers.get_all("Upgrade")).lower()
        if error is None and "websocket" in upgrade:
            # Only a connection's first request may become a WebSocket (the front decides).
            self.closing = True
            error = (503, "send the WebSocket upgrade on a new connection")
        self._task = asyncio.get_running_loop().create_task(self._serve(request, responder, error))

    # -- serving ----------------------------------------------------------------------------

    async def _serve(
        self, request: Request, responder: Responder, error: tuple[int, str] | None
    ) -> None:
        try:
            if error is not None:
                responder.closing = True
                refuse = self._limits.refuse
                if refuse is not None:
                    await refuse(request, responder, *error)
                else:
                    await _plain(responder, *error)
            else:
                await self._handler(request, responder)
                if not responder.started:
                    await _plain(responder, 500, "the handler sent no response")
                elif not responder.done:
                    await responder.end()
        except asyncio.CancelledError:
            self._abort()
            return
        except (ConnectionError, ClientGone) as exc:  # the client left while we wrote
            log.debug("HTTP response not written whole: %r", exc)
            self._abort()
            return
        except Exception:
            ref = f"{os.getpid()}-{int(time.time() * 1000) % 100000000}"
            log.exception("HTTP handler failed (log reference %s)", ref)
            if responder.started:
                self._abort()
                return
            responder.closing = True
            with contextlib.suppress(Exception):
                await _plain(responder, 500, f"internal error (log reference {ref})")
        finally:
            self._task = None
        self._next(responder.closing)

    def _next(self, close: bool) -> None:
        """The response is written: read the next request, or close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if close or self.closing:
            transport.close()
            return
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(IDLE_TIMEOUT, transport.close)

    def _fail(self, status: int, why: str) -> None:
        """A request that cannot be parsed: answer it (when no response is under way) and
        close."""
        self.closing = True
        if self._task is None and self.transport is not None and not self.transport.is_closing():
            responder = Responder(self, head_only=False)
            responder.closing = True
            self._task = asyncio.get_running_loop().create_task(
                self._serve(
                    Request("GET", self._url.decode("latin-1") or "/", Headers(), b"", self.peer),
                    responder,
                    (status, why),
                )
            )

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- writing ------------------------------------------------------------------------------

    @property
    def lost(self) -> bool:
        return self._lost

    def write(self, data: bytes) -> None:
        if self._lost or self.transport is None:
            raise ConnectionResetError("the client went away")
        self.transport.write(data)

    def check_outbound(self) -> None:
        """Cut the connection when more than ``max_outbound`` bytes wait unwritten."""
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() > self._limits.max_outbound:
            log.info("HTTP client %s stopped reading a stream: cut", self.peer)
            transport.abort()
            raise ClientGone("the client stopped reading")

    async def drain(self) -> None:
        """Wait while the client does not read (flow control), until it does, goes away, or
        DRAIN_TIMEOUT passes (then the connection is cut)."""
        if not self._writable.is_set():
            try:
                async with asyncio.timeout(DRAIN_TIMEOUT):
                    await self._writable.wait()
            except TimeoutError:
                self._abort()
                raise ConnectionResetError("the client stopped reading") from None
        if self._lost:
            raise ConnectionResetError("the client went away")

    def close_when_idle(self) -> None:
        """A drain: close now when no request is being answered, else after its response."""
        self.closing = True
        if self._task is None and self.transport is not None:
            self.transport.close()


async def _plain(responder: Responder, status: int, text: str, **extra: Any) -> None:
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
    headers += [(k.replace("_", "-"), str(v)) for k, v in extra.items()]
    await responder.send(status, headers, (text + "\n").encode())
