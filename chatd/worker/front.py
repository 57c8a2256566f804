"""The front of a worker's port: each new connection goes to WebSocket or to plain HTTP.

websockets' server accepts every connection on the slot's socket and builds its
``ServerConnection`` for it. :class:`FrontConnection` is that connection, with one more step
before websockets sees anything: it reads the first request head and

* a WebSocket upgrade (``Upgrade: websocket``) goes on exactly as before: websockets parses
  the same bytes, runs ``process_request`` (limits, origin, auth) and the handshake, and the
  connection is a ``ServerConnection`` for its whole life (so the sans-I/O protocol stays
  websockets', which a later handoff of open WebSockets between workers relies on);
* anything else becomes an :class:`~chatd.worker.httpconn.HttpConnection` (the same
  transport, the bytes read so far), which answers the HTTP endpoints today and can stream
  responses (chunked: the NDJSON and SSE the Ollama/OpenAI APIs will need), something
  websockets' ``process_request`` cannot: it answers whole responses only.

Why this and not aiohttp.web for both: measured (docs/benchmarks.md, "HTTP front"), the
WebSocket path stays websockets' own, byte for byte after the head, so its cost and its
per-connection memory do not change; and aiohttp's WebSocket could not adopt an already-open
connection handed over from another process without private internals.

The hook is websockets' documented ``create_connection`` argument of ``serve`` ("a wrapper or a
subclass to customize connection handling"); what it relies on beyond that (``connection_made``
starting the handshake task, ``data_received`` feeding the sans-I/O parser) is pinned by
``tests/unit/worker/test_websockets_internals.py``.

Bounds before the handover: a head over ``max_header_bytes`` gets 431 and is closed; a
connection that sends no complete head within ``open_timeout`` is closed (websockets' own
``open_timeout`` starts only after the handover).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ClassVar, cast

from websockets.asyncio.server import ServerConnection
from websockets.frames import Frame
from websockets.protocol import Event

from chatd.proto.httpapi import ApiError, ollama_error, openai_error
from chatd.worker.httpconn import MAX_BODY, Handler, HttpConnection, Refuser


class Front:
    """What the front and its HTTP connections need of their worker: the HTTP handler, the
    bounds, and the count of open HTTP connections (in all and per client address: they count
    against ``max_connections`` and ``max_connections_per_ip`` like WebSockets do, with
    ``others`` and ``others_from``, the worker's WebSocket counts)."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_header_bytes: int,
        max_header_count: int,
        open_timeout: float,
        max_connections: int = 0,
        max_per_ip: int = 0,
        max_outbound: int = 16 * 1024 * 1024,
        max_body: int = MAX_BODY,
        refuse: Refuser | None = None,
        others: Callable[[], int] = lambda: 0,
        others_from: Callable[[str], int] = lambda _ip: 0,
    ) -> None:
        self.handler = handler
        self.max_header_bytes = max_header_bytes
        self.max_header_count = max_header_count
        self.open_timeout = open_timeout
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.max_outbound = max_outbound
        self.max_body = max_body
        self.refuse = refuse
        self._others, self._others_from = others, others_from
        self.draining = False  # new HTTP connections answer once, then close
        self.http: set[HttpConnection] = set()
        self.per_ip: dict[str, int] = {}
        self.sniffing: dict[FrontConnection, _Sniff] = {}  # connections before the handover

    def opened(self, conn: HttpConnection) -> None:
        self.http.add(conn)
        self.per_ip[conn.peer] = self.per_ip.get(conn.peer, 0) + 1

    def closed(self, conn: HttpConnection) -> None:
        if conn in self.http:
            self.http.discard(conn)
            left = self.per_ip.pop(conn.peer, 1) - 1
            if left:
                self.per_ip[conn.peer] = left

    def refusal(self, peer: str, target: bytes = b"") -> bytes | None:
        """The answer for a new HTTP connection over a bound (503 or 429), or None. For a
        request of the Ollama or OpenAI API (``target``: its request target), in that API's
        error shape, so its official clients read (and retry) it as their own."""
        if self.max_connections and len(self.http) + self._others() >= self.max_connections:
            text = "this worker is at its connection limit: retry later"
            return _raw_response(503, "Service Unavailable", text, 5, _api_of(target))
        if self.max_per_ip:
            count = self.per_ip.get(peer, 0) + self._others_from(peer)
            if count >= self.max_per_ip:
                text = f"too many connections from {peer}: retry later"
                return _raw_response(429, "Too Many Requests", text, 5, _api_of(target))
        return None

    def close_http(self) -> None:
        """A drain: close the idle HTTP connections now, the others after their response, and
        the ones to come after their first."""
        self.draining = True
        for conn in list(self.http):
            conn.close_when_idle()

    def abort_http(self) -> None:
        """The end of a stop: whatever HTTP connection is left, or is still being read, is
        closed at once."""
        for conn in list(self.http):
            if conn.transport is not None:
                conn.transport.abort()
        for sniff in list(self.sniffing.values()):
            sniff.transport.abort()


def _api_of(target: bytes) -> str:
    """Which API a request target belongs to: "openai", "ollama" or "" (none)."""
    path = target.split(b"?", 1)[0].lstrip(b"/")
    if path.startswith(b"v1/"):
        return "openai"
    return "ollama" if path.startswith(b"api/") else ""


def _raw_response(
    status: int, reason: str, text: str, retry_after: int | None = None, api: str = ""
) -> bytes:
    """A whole response that closes the connection (the front answers before any
    HttpConnection exists): plain text, or the ``api``'s JSON error shape."""
    if api:
        kind = "rate_limited" if status == 429 else "busy" if status == 503 else "bad_request"
        err = ApiError(kind, text, status=status)
        body, ctype = (openai_error(err) if api == "openai" else ollama_error(err)), _JSON
    else:
        body, ctype = f"{text}\n".encode(), "text/plain; charset=utf-8"
    extra = ""
    if retry_after is not None:  # x-should-retry: the openai SDK retries on it
        extra = f"Retry-After: {retry_after}\r\nx-should-retry: true\r\n"
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n{extra}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


_JSON = "application/json"


def _is_upgrade(head: bytes) -> bool:
    """Whether a request head asks for a WebSocket (an ``Upgrade`` header naming it)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


class _Sniff:
    """A connection's state while its first request head is read, or after a refusal."""

    __slots__ = ("head", "refused", "timer", "transport")

    def __init__(self, transport: asyncio.Transport, timer: asyncio.TimerHandle) -> None:
        self.transport = transport
        self.timer: asyncio.TimerHandle | None = timer
        self.head = bytearray()
        self.refused = False  # a 431 was written: the rest is read and dropped

    def timer_off(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class FrontConnection(ServerConnection):
    """websockets' connection, which first reads the request head (see the module).

    It adds no attribute to the connection: the state of a connection being sniffed lives in
    :attr:`Front.sniffing` until the handover (a WebSocket then costs exactly what it cost
    before, per message and in memory)."""

    front: ClassVar[Front]
    """Set on a subclass per worker (:func:`connection_class`)."""

    # Bytes of WebSocket frames fed to websockets, and of frames it parsed: equal exactly at a
    # frame boundary, where the connection may move to another worker
    # (:func:`chatd.worker.wsadopt.movable`). Class defaults: no memory until the first frame.
    fed: int = 0
    parsed: int = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not websockets' yet: its handshake task starts only for an upgrade.
        # cast: uvloop's TCPTransport has Transport's methods without subclassing it.
        t = cast(asyncio.Transport, transport)
        timer = self.loop.call_later(self.front.open_timeout, t.abort)
        self.front.sniffing[self] = _Sniff(t, timer)

    def data_received(self, data: bytes) -> None:
        sniff = self.front.sniffing.get(self)
        if sniff is None:
            self.fed += len(data)
            super().data_received(data)  # a WebSocket: websockets' from the first byte on
            return
        if sniff.refused:
            return  # dropped until the client stops sending
        head = sniff.head
        head += data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > self.front.max_header_bytes:
                self._refuse(sniff)
            return
        del self.front.sniffing[self]
        sniff.timer_off()
        buffered = bytes(head)
        transport = sniff.transport
        if _is_upgrade(buffered[:end]):
            super().connection_made(transport)
            self.fed = len(buffered) - end - 4  # what follows the head: frames, if any
            super().data_received(buffered)
            return
        front = self.front
        peer = transport.get_extra_info("peername")
        target = buffered.split(b" ", 2)[1] if buffered.count(b" ") >= 2 else b""
        refused = front.refusal(str(peer[0]) if isinstance(peer, tuple) and peer else "?", target)
        if refused is not None:
            transport.write(refused)
            transport.close()
            return
        http = HttpConnection(front)
        transport.set_protocol(http)
        http.connection_made(transport)
        http.data_received(buffered)

    def _refuse(self, sniff: _Sniff) -> None:
        """431, then a lingering close: the client still sending its headers would get a
        reset (not the answer) if the socket closed with its data unread, so the rest is read
        and dropped for a moment, after the write side is shut."""
        sniff.refused = True
        sniff.head = bytearray()
        sniff.timer_off()
        transport = sniff.transport
        transport.write(_TOO_LARGE)
        if transport.can_write_eof():
            transport.write_eof()
            sniff.timer = self.loop.call_later(2.0, transport.close)
        else:
            transport.close()

    def process_event(self, event: Event) -> None:
        if isinstance(event, Frame):
            self.parsed += wire_size(event)
        super().process_event(event)

    def eof_received(self) -> None:
        if self not in self.front.sniffing:
            super().eof_received()
        # Else closed before a whole head, or after a refusal: the transport closes.

    def connection_lost(self, exc: Exception | None) -> None:
        sniff = self.front.sniffing.pop(self, None)
        if sniff is None:
            super().connection_lost(exc)
        else:
            sniff.timer_off()

    def pause_writing(self) -> None:
        if self not in self.front.sniffing:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self not in self.front.sniffing:
            super().resume_writing()


_TOO_LARGE = _raw_response(431, "Request Header Fields Too Large", "request headers over the limit")


def wire_size(frame: Frame) -> int:
    """The bytes a client's frame took on the wire: 2 header bytes, 0, 2 or 8 of extended
    length, 4 of mask, the payload (exact with no extension, the only case that moves; a
    client's needlessly long length encoding only makes a boundary look further away)."""
    n = len(frame.data)
    return 6 + n + (0 if n < 126 else 2 if n < 65536 else 8)


def connection_class(front: Front) -> type[FrontConnection]:
    """The ``create_connection`` class for websockets' ``serve``, bound to this worker's
    :class:`Front`."""
    return type("WorkerFrontConnection", (FrontConnection,), {"front": front})
