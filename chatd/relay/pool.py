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
  closes is dropped as soon as the loop sees it; one left idle for ``idle_timeout`` is closed
  by the pool (servers close idle keep-alives after a few seconds, llama.cpp's after 5 s, and
  a request sent on one that is half closed costs an attempt).
* Connecting resolves the host and tries its addresses with Happy Eyeballs (RFC 8305, by
  ``aiohappyeyeballs``, what aiohttp uses; uvloop's ``create_connection`` has no
  ``happy_eyeballs_delay``): a dual-stack name whose IPv6 address is blackholed connects
  over IPv4 after :data:`HAPPY_EYEBALLS_DELAY` instead of spending the connect timeout.
* How a body ends (RFC 9112 §6.3): at its Content-Length, at its last chunk, or, with
  neither, at the end of the connection. A clean EOF ends such a close-delimited body; a
  reset (ECONNRESET) does not, nor does a close by the pool itself: the response fails with
  BrokenResponse, as does a sized body shorter than announced or a chunked one without its
  last chunk. (Over TLS, asyncio does not tell an EOF with close_notify from one without, so
  a close-delimited body there ends at either.) Interim responses (1xx) before the final
  one are skipped; ``101 Switching Protocols`` is a BrokenResponse.
* :meth:`Pool.request` sends the head and body with one ``transport.write`` and returns
  once the response head is in. If a *reused* connection breaks before any response byte
  came back (the server closed it while we were sending: the keep-alive race, which
  llama.cpp's server invites, closing the connection after each streamed response although
  it announces keep-alive), the request is sent once more on a new connection: nothing of a
  reply was received. Never after a response byte, never twice.
* ``headers`` (such as ``Authorization``) go on every request of the pool.
* Failures raise :class:`ConnectError` (connecting failed; ``reason`` is a phrase for the
  user) or :class:`BrokenResponse` (reset, truncated or malformed response); both are
  ConnectionErrors, and no other exception leaves the pool for anything the server sends.
  Cancelling the awaiting task closes the connection at once.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohappyeyeballs

from chatd.relay.conn import BrokenResponse, Conn, ConnectError, Response, Stale

HAPPY_EYEBALLS_DELAY = 0.25
"""Seconds before the next address is tried while a connect is still pending (RFC 8305's
recommended 250 ms, also aiohttp's and asyncio's usual value)."""

IDLE_TIMEOUT = 4.0
"""Default seconds a kept-alive connection may sit unused before the pool closes it. Below
the shortest common server keep-alive timeout (llama.cpp's and uvicorn's 5 s): reusing a
connection the server is closing wastes an attempt, and a new connection on a LAN costs far
less than the generation it carries."""


class Pool:
    """Keep-alive connections to one backend (``base_url``: scheme, host, port, prefix).

    Requests are built by :meth:`head` (once per route, by the caller) and sent by
    :meth:`request`. ``connect_timeout`` bounds each connect (DNS and TLS included);
    ``idle_timeout`` is how long a connection may stay unused in the pool; ``headers`` are
    sent with every request (values must not contain CR or LF: ValueError). ``https`` URLs
    are verified against the system's CAs (``SSL_CERT_FILE`` is honoured). Use from one event
    loop; :meth:`close` closes every connection, and the responses still being received then
    fail with BrokenResponse.
    """

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        idle_timeout: float = IDLE_TIMEOUT,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._prefix = parts.path.rstrip("/")
        self._netloc = parts.netloc.rpartition("@")[2]
        extra = []
        for name, value in (headers or {}).items():
            if any(c in f"{name}{value}" for c in "\r\n\0") or not name or ":" in name:
                # Named, never shown: a header value may be a credential.
                raise ValueError(f"the {name!r} header is not a valid HTTP header")
            extra.append(f"{name}: {value}\r\n")
        self._extra = "".join(extra)
        self._idle: list[Conn] = []  # LIFO: the most recently used is the least likely stale
        self._sweeper: asyncio.TimerHandle | None = None  # closes idle connections in time
        self.conns: set[Conn] = set()  # every open connection, idle or busy
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the pool is used on, found at its first use and kept.

        Not ``asyncio.get_running_loop()`` at each use: on CPython 3.11 that is a system call
        (it compares the loop's pid with ``getpid()``, which glibc does not cache), and a
        message's path made a dozen of them: measured with ``py-spy record --native`` on a
        worker under ``chatd-bench run closed``, 5.4 % of its event-loop thread. (3.12 dropped
        the check.) A pool serves one loop: its connections and futures belong to it.
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def __repr__(self) -> str:  # never the headers: they may carry a credential
        return f"<Pool {self._netloc} conns={len(self.conns)} idle={len(self._idle)}>"

    def head(self, method: str, path: str, accept: str) -> bytes:
        """The request head for ``method path`` (below the base URL's path), with the pool's
        ``headers``, without the blank line that ends it; :meth:`request` adds
        Content-Length (and Content-Type: application/json) when there is a body."""
        return (
            f"{method} {self._prefix}{path} HTTP/1.1\r\nHost: {self._netloc}\r\n"
            f"User-Agent: chatd\r\nAccept: {accept}\r\n{self._extra}"
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
            if self._expired(conn, self.loop.time()):
                self._close_idle()  # the others were released before it: expired too
                conn.close()
                break
            try:
                return await self._send(conn, data)
            except Stale:
                break  # the keep-alive race: once more, on a new connection
        conn = await self._connect()
        try:
            return await self._send(conn, data)
        except Stale as exc:  # cannot happen on a fresh connection; said plainly anyway
            raise BrokenResponse(str(exc)) from None

    async def _send(self, conn: Conn, data: bytes) -> Response:
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

    async def _addresses(self) -> list[tuple[Any, ...]]:
        """The host's addresses, in getaddrinfo's order (RFC 6724: IPv6 first, usually)."""
        loop = asyncio.get_running_loop()
        return await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)

    async def _connect(self) -> Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                infos = await self._addresses()
                try:
                    sock = await aiohappyeyeballs.start_connection(
                        infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1
                    )
                except RuntimeError as exc:  # uvloop raises some connect errors as these
                    raise OSError(str(exc)) from exc
                # From here the transport owns the socket (and closes it on failure).
                _, conn = await loop.create_connection(
                    lambda: Conn(self),
                    sock=sock,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )
        except socket.gaierror:
            raise ConnectError("its host name does not resolve") from None
        except TimeoutError:
            raise ConnectError("it did not accept the connection in time") from None
        except ssl.SSLCertVerificationError as exc:  # an OSError too, whose text says little
            why = f"certificate verify failed: {exc.verify_message}"
            raise ConnectError(f"the TLS handshake failed ({why})") from exc
        except ssl.SSLError as exc:
            raise ConnectError(f"the TLS handshake failed ({exc.reason or exc})") from exc
        except OSError as exc:
            raise ConnectError(f"connecting failed: {exc.strerror or exc}") from exc
        except ValueError:  # start_connection: getaddrinfo gave no address at all
            raise ConnectError("its host name does not resolve") from None
        if self._closed:
            conn.close()
            raise BrokenResponse("the connection pool is closed")
        return conn

    def release(self, conn: Conn) -> None:
        """Put a connection whose response is complete back for the next request."""
        conn.reused = True
        if self._closed or conn.lost:
            conn.close()
            return
        loop = self.loop
        conn.idle_since = loop.time()
        self._idle.append(conn)  # so _idle is in release order: the oldest first
        if self._sweeper is None:
            self._sweeper = loop.call_at(conn.idle_since + self._idle_timeout, self._sweep)

    def _expired(self, conn: Conn, now: float) -> bool:
        return now - conn.idle_since >= self._idle_timeout

    def _sweep(self) -> None:
        """Close the connections idle for ``idle_timeout``; one timer for the whole pool,
        re-armed for the oldest connection left (not one timer per request)."""
        self._sweeper = None
        loop = self.loop
        now = loop.time()
        while self._idle and self._expired(self._idle[0], now):
            self._idle[0].close()  # drop() removes it from _idle
        if self._idle:
            due = self._idle[0].idle_since + self._idle_timeout
            self._sweeper = loop.call_at(due, self._sweep)

    def _close_idle(self) -> None:
        for conn in list(self._idle):
            conn.close()

    def drop(self, conn: Conn) -> None:
        """Forget a connection that is closing (idempotent)."""
        self.conns.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        """Close every connection; later :meth:`request` calls raise BrokenResponse."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.conns):
            if conn.resp is not None:
                conn.resp._end(BrokenResponse("the connection pool is closed"))
            conn.close()
        self._idle.clear()
