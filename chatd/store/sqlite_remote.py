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
at once); those not sent within ``timeout`` seconds fail.
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


class WriterClient(asyncio.Protocol):
    """Requests to the host writer at ``address``, from the event loop ``loop``.

    ``timeout``: seconds a request may wait for a connection before it fails (the store's
    ``lock_timeout``). Counters for the store's statistics: ``round_trips`` (writes of
    requests), and the latency of each answered request in ``samples`` (fed by the store).
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
        self._on_latency = on_latency  # called with each answered request's latency, in ms
        self._packer = wire.packer()
        self._unpacker = wire.unpacker()
        self._rid = 0
        # rid -> (op, future, time sent): the requests sent and not answered yet.
        self._sent: dict[int, tuple[str, asyncio.Future[Any], float]] = {}
        # The requests not sent yet (this tick's, or those waiting for a connection).
        self._unsent: list[tuple[int, str, bytes, asyncio.Future[Any]]] = []
        self._flush_planned = False
        self._transport: asyncio.Transport | None = None
        self._connecting: asyncio.Task[None] | None = None
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
        transport = cast(asyncio.Transport, transport)  # (uvloop's are not its subclasses)
        self._transport = transport
        self._unpacker = wire.unpacker()
        if self._unsent:
            self._plan_flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        sent, self._sent = self._sent, {}
        if sent:
            error = StoreError(
                "the store writer's connection was lost before the write was answered "
                "(it may have committed)"
            )
            for _, fut, _ in sent.values():
                if not fut.done():
                    fut.set_exception(error)
        self._wake_idle()
        if not self._closed:
            log.warning("store writer connection lost (%s); connecting again", exc or "EOF")
            self._connecting = self._loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Connect again; fail the waiting requests whose ``timeout`` passed meanwhile."""
        since = time.monotonic()
        while not self._closed and self._transport is None:
            try:
                await self._connect_once()
                log.info("store writer connection back")
                return
            except OSError as exc:
                if time.monotonic() - since >= self._timeout:
                    self._fail_unsent(StoreError(f"cannot reach the store writer: {exc}"))
                    since = time.monotonic()
            await asyncio.sleep(RETRY_S)

    def _fail_unsent(self, error: StoreError) -> None:
        unsent, self._unsent = self._unsent, []
        for _, _, _, fut in unsent:
            if not fut.done():
                fut.set_exception(error)
        self._wake_idle()

    # -- requests --------------------------------------------------------------------------

    def call(self, op: str, args: tuple[Any, ...] | list[Any]) -> asyncio.Future[Any]:
        """Send ``op(*args)`` to the writer (at the end of this tick); the future gets its
        result, or a StoreError (SessionGone: the session is unknown or expired)."""
        if self._closed:
            raise StoreError("the session store is not open")
        self._rid += 1
        fut: asyncio.Future[Any] = self._loop.create_future()
        frame = self._packer.pack([self._rid, op, list(args)])
        self._unsent.append((self._rid, op, frame, fut))
        self._plan_flush()
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
        unsent, self._unsent = self._unsent, []
        now = time.monotonic()
        for rid, op, _, fut in unsent:
            self._sent[rid] = (op, fut, now)
        self.round_trips += 1
        transport.write(b"".join(frame for _, _, frame, _ in unsent))

    def data_received(self, data: bytes) -> None:
        try:
            self._unpacker.feed(data)
            now = time.monotonic()
            for frame in self._unpacker:
                got = self._sent.pop(frame[0], None)
                if got is None:
                    continue  # the caller's request failed already (a lost connection)
                op, fut, sent = got
                self._on_latency((now - sent) * 1000.0)
                result = wire.outcome(op, frame)
                if fut.done():
                    continue
                if isinstance(result, StoreError):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
        except (ValueError, TypeError, IndexError, msgpack.ExtraData, msgpack.FormatError) as exc:
            log.error("store writer: a bad answer frame (%s); connecting again", exc)
            if self._transport is not None:
                self._transport.abort()
        if not self._sent:
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
        """Wait until every request is answered or failed."""
        while self._sent or self._unsent:
            waiter = self._loop.create_future()
            self._idle.append(waiter)
            await waiter

    async def close(self) -> None:
        """After :meth:`drain`: no more requests, the connection closed."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
        self._fail_unsent(StoreError("the session store is closed"))
        if self._transport is not None:
            self._transport.close()
            self._transport = None
