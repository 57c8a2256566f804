"""The connection half of :class:`ChatClient`, and its API (see ``docs/client.md``).

One task per client runs the connection: connect, hello, read frames, back off, again. The
caller's coroutines only add to the outbox and write; the frames are handled by
:class:`~chatd.client.session.SessionState`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.uri import parse_uri

from chatd.client.backoff import next_delay, parse_retry_after
from chatd.client.events import (
    ClientClosed,
    Closed,
    Error,
    Event,
    Reconnecting,
    Reply,
    Statistics,
    dumps,
    loads,
)
from chatd.client.session import Frame, SessionState, Stop

log = logging.getLogger("chatd.client")

MAX_ID_CHARS = 64  # protocol: message ids are 1 to 64 characters


class ChatClient(SessionState):
    """A chatd session over a WebSocket that survives disconnects (asyncio, one event loop).

    Args:
        url: ``ws://HOST:PORT/ws``.
        session, last_seq: resume this session, having seen every event up to ``last_seq``
            (default: start a new session).
        token: sent as ``Authorization: Bearer TOKEN`` when the server requires auth.
        on_event: called with every event, in order, exactly once (from the client's task:
            keep it short and non-blocking; an exception is logged and ignored).
        queue_events: keep events for :meth:`events` (default: true unless ``on_event`` given).
        new_session_on_unknown: when the session is unknown (expired), start a new one instead
            of closing; the unanswered messages of the old one then fail with that error.
        initial_delay, max_delay: the reconnect backoff, doubling from ``initial_delay`` up to
            ``max_delay`` seconds, with jitter (a random 50-100 % of it).
        give_up_after: close (``Closed``) after this many seconds without a connection
            (default: never).
        rate_limit_delay: the first wait before resending a rate-limited message (doubles).
        stall_timeout: when answers are awaited and no frame came for this long, resume again
            (the reply may have been generated on another worker); None disables it.
        open_timeout: seconds for the handshake, and again for the ``welcome``.
        max_message_bytes: the largest ``text`` :meth:`send` accepts (the server's limit).
        connect_options: passed to ``websockets.asyncio.client.connect`` (overrides ours).

    Raises ``websockets.exceptions.InvalidURI`` for a bad ``url`` and ValueError for bad
    numbers, at once rather than at every reconnect. Nothing connects before :meth:`connect`.
    """

    def __init__(
        self,
        url: str,
        *,
        session: str | None = None,
        last_seq: int = 0,
        token: str | None = None,
        on_event: Callable[[Event], object] | None = None,
        queue_events: bool | None = None,
        new_session_on_unknown: bool = False,
        initial_delay: float = 0.1,
        max_delay: float = 10.0,
        give_up_after: float | None = None,
        rate_limit_delay: float = 1.0,
        stall_timeout: float | None = 30.0,
        open_timeout: float = 10.0,
        max_message_bytes: int = 16384,
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:
        parse_uri(url)  # raises InvalidURI now rather than at every reconnect
        if last_seq < 0 or initial_delay <= 0 or max_delay < initial_delay:
            raise ValueError("need last_seq >= 0 and 0 < initial_delay <= max_delay")
        super().__init__(
            session,
            last_seq,
            on_event,
            queue_events,
            new_session_on_unknown,
            rate_limit_delay,
            max_delay,
            stall_timeout,
        )
        self.url = url
        self._initial, self._give_up = initial_delay, give_up_after
        self._open_timeout, self._max_bytes = open_timeout, max_message_bytes
        self._connect_kwargs: dict[str, Any] = {
            "open_timeout": open_timeout,
            "compression": None,  # chat frames are small; deflate costs ~50 KiB a connection
            "additional_headers": {"Authorization": f"Bearer {token}"} if token else None,
            **(connect_options or {}),
        }
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_urlsafe(9) + "-"  # unique across processes and runs
        self._task: asyncio.Task[None] | None = None
        self._closed: Closed | None = None
        self._closing = False

    # -- the caller's API ----------------------------------------------------------------------

    @property
    def session(self) -> str | None:
        """The session id (None until the first welcome of a new session)."""
        return self._session

    @property
    def last_seq(self) -> int:
        """The highest seq handed to the caller: pass it back with ``session`` to resume."""
        return self._last_seq

    @property
    def pending(self) -> int:
        """Messages in the outbox: sent (or to be sent) and not yet acknowledged."""
        return len(self._outbox)

    @property
    def connected(self) -> bool:
        """Welcomed on a live connection right now."""
        return self._open

    @property
    def worker(self) -> str:
        """``"SLOT/PID"`` from the last welcome ("" before the first). A reload that moves the
        connection to a new worker does not change it: the client is not told."""
        return self._worker

    @property
    def local_address(self) -> Any:
        """The local (address, port) of the current connection, None without one: the same
        value before and after a reload means the connection survived it."""
        ws = self._ws
        return ws.transport.get_extra_info("sockname") if ws is not None else None

    def statistics(self) -> Statistics:
        """A copy of the counters."""
        return dataclasses.replace(self._stats)

    def unacknowledged(self) -> list[tuple[str, str, str | None]]:
        """The outbox as ``(id, text, model)``, in send order (e.g. to persist it on exit)."""
        out = []
        for frame in self._outbox.values():
            obj = loads(frame)
            out.append((obj["id"], obj["text"], obj.get("model")))
        return out

    async def connect(self) -> None:
        """Start the client and wait for the first welcome (retrying as configured).

        Raises ClientClosed when the client stops first (refused handshake, unknown session,
        gave up). Wrap it in ``asyncio.timeout`` to bound the wait.
        """
        if self._task is None:
            if self._closed is not None:
                raise ClientClosed(self._closed.reason)
            loop = asyncio.get_running_loop()
            self._ready = loop.create_future()
            self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._task = loop.create_task(self._run(), name=f"chatd-client {self.url}")
        assert self._ready is not None
        await asyncio.shield(self._ready)

    async def close(self) -> None:
        """Close the connection (1000) and stop; emits ``Closed``. Idempotent."""
        self._closing = True
        task, ws = self._task, self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2.0)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._closed is None:  # never connected
            self._finish("closed by the caller")

    async def __aenter__(self) -> ChatClient:
        await self.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def new_id(self) -> str:
        """A fresh message id: unique across clients, processes and runs (22 characters+)."""
        return f"{self._id_prefix}{next(self._ids)}"

    async def send(self, text: str, *, id: str | None = None, model: str | None = None) -> str:
        """Queue a message in the outbox and write it if connected; returns its id.

        The message is resent with the same id after every reconnect until acknowledged
        (the server deduplicates). Raises ValueError for an empty or oversized text, an
        invalid id or an id still in the outbox; ClientClosed once the client is closed.
        """
        if self._closed is not None:
            raise ClientClosed(self._closed.reason)
        msg_id = self.new_id() if id is None else id
        if not 1 <= len(msg_id) <= MAX_ID_CHARS or msg_id in self._outbox:
            raise ValueError(f"message id must be 1-64 characters and not pending: {msg_id!r}")
        if not text or (len(text) * 4 > self._max_bytes and len(text.encode()) > self._max_bytes):
            raise ValueError(f"text must be 1 to {self._max_bytes} UTF-8 bytes")
        obj = {"type": "message", "id": msg_id, "text": text}
        if model is not None:
            obj["model"] = model
        frame = self._outbox[msg_id] = dumps(obj)
        if self._open and not self._throttled and self._ws is not None:
            await self._write(self._ws, msg_id, frame)
        return msg_id

    async def ask(
        self, text: str, *, id: str | None = None, model: str | None = None
    ) -> Reply | Error:
        """Send a message and wait for its answer: the ``Reply``, or the final ``Error``.

        The events still go to ``events()``/``on_event`` as well. Raises ClientClosed if the
        client closes first. Bound the wait with ``asyncio.timeout``.
        """
        msg_id = self.new_id() if id is None else id
        if msg_id in self._waiters:
            raise ValueError(f"already waiting for an answer to {msg_id!r}")
        future: asyncio.Future[Reply | Error] = asyncio.get_running_loop().create_future()
        self._waiters[msg_id] = future
        try:
            await self.send(text, id=msg_id, model=model)
            return await future
        finally:
            self._waiters.pop(msg_id, None)

    async def cancel(self, msg_id: str) -> None:
        """Ask the server to stop generating the reply to ``msg_id`` (best effort).

        The reply still comes (``done_reason`` ``cancelled``, or complete if it was done). A
        cancel while disconnected is dropped.
        """
        if self._open and self._ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(dumps({"type": "cancel", "id": msg_id}), text=True)

    async def events(self) -> AsyncIterator[Event]:
        """Every event, in order, exactly once, ending after ``Closed`` (one consumer only)."""
        queue = self._queue
        if queue is None:
            raise RuntimeError("events are not queued: on_event was given without queue_events")
        while True:
            while queue:
                event = queue.popleft()
                yield event
                if isinstance(event, Closed):
                    return
            self._wake = asyncio.get_running_loop().create_future()
            await self._wake

    # -- the connection task -------------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, serve, back off, again, until closed, fatal or given up; then ``Closed``."""
        loop = asyncio.get_running_loop()
        attempt, down_since, reason = 0, loop.time(), "closed by the caller"
        try:
            while not self._closing:
                retry_after, immediate = 0.0, False
                try:
                    ws = await connect(self.url, **self._connect_kwargs)
                except InvalidStatus as exc:
                    status = exc.response.status_code
                    if status < 500 and status != 429:  # 401, 403, 404: retrying cannot help
                        reason = f"handshake refused: HTTP {status}"
                        break
                    retry_after = parse_retry_after(exc.response.headers.get("Retry-After"))
                    why = f"handshake refused: HTTP {status}"
                except InvalidURI as exc:
                    reason = f"invalid URL: {exc}"
                    break
                except (OSError, TimeoutError, InvalidHandshake, EOFError) as exc:
                    why = f"connect failed: {exc!r}"
                else:
                    try:
                        why, immediate = await self._serve(ws)
                    except Stop as stop:
                        if stop.fatal:
                            reason = stop.reason
                            break
                        why, immediate = stop.reason, stop.immediate
                    finally:
                        self._drop(ws)
                    if self._welcomed:  # a good connection: back off from scratch
                        attempt, down_since = 0, loop.time()
                if self._closing:
                    break
                if self._give_up is not None and loop.time() - down_since > self._give_up:
                    reason = f"gave up after {self._give_up:g}s without a connection: {why}"
                    break
                delay = next_delay(attempt, self._initial, self._max_delay, immediate, retry_after)
                attempt += 1
                self._emit(Reconnecting(attempt, delay, why))
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            reason = "closed by the caller"
        except Exception as exc:  # a bug: say so instead of dying silently
            log.exception("chat client task failed")
            reason = f"client error: {exc!r}"
        finally:
            self._finish(reason)

    async def _serve(self, ws: ClientConnection) -> tuple[str, bool]:
        """One connection: hello, then frames until it closes; returns (why, reconnect now)."""
        self._ws, self._welcomed, self._going_away = ws, False, False
        hello: Frame = {"type": "hello"}
        if self._session is not None:
            hello["session"], hello["last_seq"] = self._session, self._last_seq
        loop = asyncio.get_running_loop()
        # No welcome within open_timeout: the server is stuck; drop it and try again.
        timer = loop.call_later(self._open_timeout, self._welcome_overdue, ws)
        handlers, recv = self.handlers, ws.recv
        try:
            await ws.send(dumps(hello), text=True)
            while True:
                data = await recv(False)
                self._rx = True
                try:
                    frame = loads(data)
                    handler = handlers.get(frame["type"])
                    result = handler(frame) if handler is not None else None
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("ignored a malformed frame (%r): %.200r", exc, data)
                    continue
                if result is not None:
                    await result
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            if code == 1009:  # a frame of ours is over the server's limit: it would repeat
                reason = "closed 1009: a message is over the server's size limit"
                raise Stop(reason, fatal=True) from None
            why = f"closed {code}" + (
                f" ({exc.rcvd.reason})" if exc.rcvd and exc.rcvd.reason else ""
            )
            return why, code == 1001 or self._going_away
        except OSError as exc:
            return f"connection failed: {exc!r}", self._going_away
        finally:
            timer.cancel()

    def _welcome_overdue(self, ws: ClientConnection) -> None:
        if not self._welcomed:
            ws.transport.abort()

    def _drop(self, ws: ClientConnection) -> None:
        self._open = False
        if self._ws is ws:
            self._ws = None
        self._sent.clear()
        for timer in (self._stall_timer, self._throttle_timer):
            if timer is not None:
                timer.cancel()
        self._stall_timer = self._throttle_timer = None
        self._throttled = False
        ws.transport.abort()  # no-op when closed; frees a half-open one at once

    def _finish(self, reason: str) -> None:
        """Stop for good: ``Closed`` last, and every ``ask`` fails with ClientClosed."""
        if self._closed is not None:
            return
        self._closed = closed = Closed(reason)
        self._open = False
        for future in (*self._waiters.values(), self._ready):
            if future is not None and not future.done():
                future.set_exception(ClientClosed(reason))
        self._emit(closed)
