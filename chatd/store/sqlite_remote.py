"""A worker's side of the host writer (:mod:`chatd.store.sqlite_host`): its writes sent there.

:class:`WriterClient` is what a :class:`~chatd.store.sqlite.SqliteStore` opened with
``writer=ADDRESS`` writes through. The requests made in one event-loop tick leave in one
``write`` at its end (as the local batch commits at its end); each answer resolves its future
when it comes, so a caller returns only once the writer has committed (contract 3).

When the connection ends (the writer died, or restarts), the requests in flight fail with a
StoreError: whether they committed is unknown, and every caller copes with that already (an
append is idempotent on its message id: the client sends the message again; a renewal is
tried again; a claim's leases lapse and are claimed again). Requests made while unconnected
wait, and the client connects again every ``RETRY_S`` (the master restarts a dead writer
at once). No request waits longer than ``timeout`` seconds (the store's ``lock_timeout``),
sent or not: a writer alive but stuck fails them as a locked file would (the connection is
then made anew).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, cast

import msgpack

from chatd.errors import StoreError
from chatd.store import sqlite_wire as wire

log = logging.getLogger("chatd.store")

RETRY_S = 0.02  # seconds between two attempts to connect to the writer
WATCHDOG_S = 1.0  # seconds between two looks for requests waiting longer than the timeout


class _Call:
    """One request: its op, its caller's future, its frame, when it was made and sent."""

    __slots__ = ("frame", "fut", "op", "queued", "sent")

    def __init__(self, op: str, fut: asyncio.Future[Any], frame: bytes, queued: float) -> None:
        self.op, self.fut, self.frame, self.queued = op, fut, frame, queued
        self.sent = 0.0

    def fail(self, error: StoreError) -> None:
        if not self.fut.done():
            self.fut.set_exception(error)


class WriterClient(asyncio.Protocol):
    """Requests to the host writer at ``address``, from the event loop ``loop``.

    ``timeout``: seconds a request may wait for its answer, a connection included, before it
    fails. ``on_latency`` is called with each answered request's latency (ms, from its send);
    ``round_trips`` counts the writes of requests.
    """

    def __init__(
        self,
        address: str,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        on_latency: Callable[[float], None],
    ) -> None:
        self.address = address
        self._loop = loop
        self._timeout = timeout
        self._on_latency = on_latency
        self._packer = wire.packer()
        self._unpacker = wire.unpacker()
        self._rid = 0
        self._sent: dict[int, _Call] = {}  # rid -> the request sent, not answered yet
        self._unsent: dict[int, _Call] = {}  # this tick's, or those waiting for a connection
        self._flush_planned = False
        self._transport: asyncio.Transport | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False
        self.round_trips = 0
        self._idle: list[asyncio.Future[None]] = []

    # -- connection ------------------------------------------------------------------------

    async def connect(self, within: float) -> None:
        """Connect, trying again every RETRY_S for ``within`` seconds (the writer may be
        starting). Raises StoreError."""
        deadline = time.monotonic() + within
        while True:
            try:
                await self._connect_once()
                return
            except OSError as exc:
                if time.monotonic() >= deadline or self._closed:
                    raise StoreError(
                        f"cannot reach the store writer: {exc} (is the chatd master running?)"
                    ) from exc
            await asyncio.sleep(RETRY_S)

    async def _connect_once(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await self._loop.sock_connect(sock, self.address)
            await self._loop.create_unix_connection(lambda: self, sock=sock)
        except BaseException:
            sock.close()
            raise

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # (uvloop's are no subclasses)
        self._unpacker = wire.unpacker()
        if self._unsent:
            self._plan_flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail_sent(
            StoreError(
                "the store writer's connection was lost before the write was answered "
                "(it may have committed)"
            )
        )
        if not self._closed:
            log.warning("store writer connection lost (%s); connecting again", exc or "EOF")
            self._connecting = self._loop.create_task(self._reconnect())

    def _drop(self, why: str) -> None:
        """End the connection (it is made anew): a bad answer, or a writer that stopped
        answering. Its requests in flight fail."""
        transport, self._transport = self._transport, None
        log.error("store writer: %s; connecting again", why)
        if transport is not None:
            transport.abort()  # connection_lost follows: the requests sent fail there

    async def _reconnect(self) -> None:
        """Connect again (the watchdog fails the requests that wait too long meanwhile)."""
        while not self._closed and self._transport is None:
            try:
                await self._connect_once()
                log.info("store writer connection back")
                return
            except OSError:
                pass
            except Exception:  # a bug: keep trying, loudly, rather than strand the requests
                log.exception("store writer: connecting again failed")
            await asyncio.sleep(RETRY_S)

    # -- requests --------------------------------------------------------------------------

    def call(self, op: str, args: tuple[Any, ...] | list[Any]) -> asyncio.Future[Any]:
        """Send ``op(*args)`` to the writer (at the end of this tick); the future gets its
        result, or a StoreError (SessionGone: the session is unknown or expired). Raises
        StoreError: the client is closed, or the arguments cannot be encoded."""
        if self._closed:
            raise StoreError("the session store is not open")
        try:
            frame = self._packer.pack([self._rid + 1, op, list(args)])
        except (ValueError, TypeError, OverflowError) as exc:  # (UnicodeEncodeError included)
            raise StoreError(f"session store write failed: {exc}") from exc
        self._rid += 1
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._unsent[self._rid] = _Call(op, fut, frame, time.monotonic())
        self._plan_flush()
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(WATCHDOG_S, self._watch)
        return fut

    def _plan_flush(self) -> None:
        if not self._flush_planned and self._transport is not None:
            self._flush_planned = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_planned = False
        transport = self._transport
        if transport is None or not self._unsent:
            return
        unsent, self._unsent = self._unsent, {}
        now = time.monotonic()
        for call in unsent.values():
            call.sent = now
        self._sent.update(unsent)
        self.round_trips += 1
        transport.write(b"".join(call.frame for call in unsent.values()))

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        try:
            self._unpacker.feed(data)
            for frame in self._unpacker:
                call = self._sent.pop(frame[0], None)
                if call is None:
                    continue  # its caller's request failed already (a lost connection)
                try:
                    result = wire.outcome(call.op, frame)
                except (ValueError, TypeError, IndexError, KeyError) as exc:
                    call.fail(StoreError(f"the store writer's answer is malformed: {exc}"))
                    raise
                self._on_latency((now - call.sent) * 1000.0)
                if call.fut.done():
                    continue
                if isinstance(result, StoreError):
                    call.fut.set_exception(result)
                else:
                    call.fut.set_result(result)
        except (ValueError, TypeError, IndexError, KeyError, msgpack.UnpackException) as exc:
            self._drop(f"a bad answer frame ({exc!r})")
        self._wake_idle()

    def _watch(self) -> None:
        """Every WATCHDOG_S while requests are pending: fail those older than ``timeout``."""
        self._watchdog = None
        now = time.monotonic()
        late = now - self._timeout
        stale = [rid for rid, call in self._unsent.items() if call.queued <= late]
        for rid in stale:
            self._unsent.pop(rid).fail(
                StoreError(f"cannot reach the store writer (for {self._timeout:.0f} s)")
            )
        if any(call.queued <= late for call in self._sent.values()):
            self._drop(f"no answer for {self._timeout:.0f} s")
        self._wake_idle()
        if self._sent or self._unsent:
            self._watchdog = self._loop.call_later(WATCHDOG_S, self._watch)

    def _fail_sent(self, error: StoreError) -> None:
        sent, self._sent = self._sent, {}
        for call in sent.values():
            call.fail(error)
        self._wake_idle()

    # -- closing ---------------------------------------------------------------------------

    def _wake_idle(self) -> None:
        if self._sent or self._unsent:
            return
        waiters, self._idle = self._idle, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def drain(self) -> None:
        """Wait until every request is answered or failed (``timeout`` at most)."""
        while self._sent or self._unsent:
            waiter = self._loop.create_future()
            self._idle.append(waiter)
            await waiter

    async def close(self) -> None:
        """After :meth:`drain`: no more requests, the connection closed."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
        unsent, self._unsent = self._unsent, {}
        for call in unsent.values():
            call.fail(StoreError("the session store is closed"))
        if self._transport is not None:
            self._transport.close()
            self._transport = None
