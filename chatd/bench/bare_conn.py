"""The bare reference relay's connection handler: the chat protocol, just enough of it.

What :mod:`chatd.bench.bare` runs in each worker process. It speaks the part of the chat
protocol (``docs/protocol.md``) that chatd-bench's ``raw`` load uses, correctly: ``hello``
-> ``welcome`` (a fresh session; a ``hello`` naming one gets ``unknown_session``: there is
no store), ``message{id,text}`` -> ``ack{id,seq}``, one ``token`` frame per chunk read from
the backend (the pieces that chunk carried; the chunk that ends the reply gets none, its
text is in the reply, as chatd drops token text still queued when the reply is stored), then
``reply{id,seq,text,done_reason,stats}`` or a final ``error{code,message,retryable,id,seq}``;
``ping`` -> ``pong``; anything else ``bad_request``.

What it leaves out is what makes chatd chatd: no session store (so no history: a request
carries only its message), no LLM slots or queue, no resume, no deduplication, no rate
limit, no deadline but a 30 s total, no metrics, no log line per message.

**With a store** (``Relay(store=…)``: chatd's own SQLite store, ``python -m chatd.bench.bare
--store``), it keeps chatd's two promises on a message: the session is created in the store
before the ``welcome``, the user message committed before its ``ack`` (whose seq the store
gave; a resent id is acknowledged again and not answered twice), and the reply or final error
committed before it is sent; and it sends the model the conversation, as chatd does: the
connection's last :data:`CONTEXT_TURNS` answered turns before the new message (kept in
memory, as chatd's history cache keeps them). That is the reference against which what chatd
costs beyond its promises and its function is measured (chatd-bench's "bare relay + store"):
the same commits and the same requests to the backend, none of the rest (no slots, resume,
takeover, leases renewed, limits, metrics). A store failure is an ``error``
``store_unavailable`` (retryable).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import Any, Literal

import aiohttp
import orjson
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from chatd.errors import StoreError
from chatd.store.base import Store

MAX_TEXT_BYTES = 16384  # chatd's default max_message_bytes
CONTEXT_TURNS = 20  # with a store: turns sent as context (chatd's default history_turns)
_JSON = {"Content-Type": "application/json"}


class _Session:
    """One connection's state: its seq counter (without a store), its session id (with
    one), its generations in flight."""

    __slots__ = ("context", "seq", "sid", "tasks", "welcomed")

    def __init__(self) -> None:
        self.seq = 0
        self.sid = ""
        self.welcomed = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.context: list[dict[str, str]] = []  # with a store: the answered turns


class Relay:
    """One worker's relay: ``handle`` serves a WebSocket connection."""

    def __init__(self, backend: str, model: str, name: str, store: Store | None = None) -> None:
        self.url = backend.rstrip("/") + "/api/chat"
        self.model = model
        self.name = name
        self.store = store
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the store, if any, and the HTTP pool (inside the running loop: after the fork)."""
        if self.store is not None:
            await self.store.open()
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=30, sock_connect=5),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        if self.store is not None:
            await self.store.close()

    async def handle(self, ws: ServerConnection) -> None:
        """Read frames until the connection closes; a generation per message, as a task."""
        s = _Session()
        try:
            while True:
                raw = await ws.recv(decode=False)
                await self._frame(ws, s, raw)
        except ConnectionClosed:
            pass
        finally:
            for t in s.tasks:
                t.cancel()

    async def _frame(self, ws: ServerConnection, s: _Session, raw: bytes | str) -> None:
        frame, job = self._answer(s, raw)
        if self.store is not None and frame["type"] in ("welcome", "ack"):
            frame, job = await self._commit(s, frame, job)
        await _send(ws, frame)
        if job is not None:
            task = asyncio.create_task(self._generate(ws, s, *job))
            s.tasks.add(task)
            task.add_done_callback(s.tasks.discard)

    def _answer(
        self, s: _Session, raw: bytes | str
    ) -> tuple[dict[str, Any], tuple[str, str] | None]:
        """The frame answering ``raw``, and (id, text) when a generation is to start."""
        try:
            f = orjson.loads(raw)
            typ = f.get("type")
        except (orjson.JSONDecodeError, AttributeError):
            return _error("bad_request", "A frame must be a JSON object."), None
        if typ == "hello" and not s.welcomed:
            if f.get("session") is not None:
                msg = "This relay keeps no sessions: send hello without one."
                return _error("unknown_session", msg), None
            s.welcomed = True
            sid = secrets.token_urlsafe(16)
            welcome = {"type": "welcome", "session": sid, "last_seq": 0, "resumed": False}
            return welcome | {"worker": self.name, "protocol": 1}, None
        if typ == "ping":
            return {"type": "pong"}, None
        mid, text = f.get("id"), f.get("text")
        if typ != "message" or not s.welcomed:
            return _error("bad_request", "Expected hello first, then messages."), None
        if not (isinstance(mid, str) and 1 <= len(mid) <= 64 and isinstance(text, str) and text):
            return _error("bad_request", "A message needs an id and a text."), None
        if len(text.encode()) > MAX_TEXT_BYTES:
            return _error("too_large", "The text is too long.") | {"id": mid}, None
        s.seq += 1
        return {"type": "ack", "id": mid, "seq": s.seq}, (mid, text)

    async def _commit(
        self, s: _Session, frame: dict[str, Any], job: tuple[str, str] | None
    ) -> tuple[dict[str, Any], tuple[str, str] | None]:
        """With a store: the welcome of a session created in it, or the ack of a committed user
        message (with the store's seq; no generation for a resent id)."""
        assert self.store is not None
        try:
            if job is None:  # a welcome
                s.sid = await self.store.create_session("")
                return frame | {"session": s.sid}, None
            appended = await self.store.append_user(s.sid, job[0], job[1], self.model)
        except StoreError as exc:
            if job is None:
                s.welcomed = False  # as chatd: the client says hello again
            error = _error("store_unavailable", f"The session store failed: {exc}.", True)
            return error | ({"id": job[0]} if job else {}), None
        return frame | {"seq": appended.seq}, None if appended.duplicate else job

    async def _final(
        self,
        s: _Session,
        mid: str,
        kind: Literal["reply", "error"],
        text: str,
        meta: dict[str, Any],
    ) -> int:
        """The seq of a final event: committed first with a store, else the next of the
        connection's own count. Raises StoreError."""
        if self.store is None:
            s.seq += 1
            return s.seq
        return (await self.store.append_final(s.sid, mid, kind, text, meta)).seq

    async def _generate(self, ws: ServerConnection, s: _Session, mid: str, text: str) -> None:
        """Stream the backend's answer to ``text``: token frames, then the reply (or an error)."""
        assert self.http is not None
        asked = {"role": "user", "content": text}
        messages = [*s.context, asked] if self.store is not None else [asked]
        body = orjson.dumps({"model": self.model, "messages": messages, "stream": True})
        t0 = time.perf_counter()
        ttft: float | None = None
        parts: list[str] = []
        tokens = 0
        done_reason = "stop"
        try:
            async with self.http.post(self.url, data=body, headers=_JSON) as resp:
                if resp.status != 200:
                    await resp.read()
                    code = "llm_error" if resp.status < 500 else "llm_unavailable"
                    await self._fail(ws, s, mid, code, f"The backend said {resp.status}.")
                    return
                pending = b""
                async for chunk in resp.content.iter_any():
                    *lines, pending = (pending + chunk).split(b"\n")
                    piece, n, reason = _pieces(lines)
                    tokens += n
                    if piece:
                        ttft = ttft if ttft is not None else time.perf_counter() - t0
                        parts.append(piece)
                    if reason is not None:  # the reply carries this chunk's text: no token
                        done_reason = reason
                    elif piece:
                        await _send(ws, {"type": "token", "id": mid, "text": piece})
                last, n, reason = _pieces([pending])
                parts.append(last)
                tokens += n
                done_reason = reason or done_reason
        except ConnectionClosed:
            return
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            await self._fail(ws, s, mid, "llm_unavailable", f"Backend: {exc!r}.")
            return
        except (orjson.JSONDecodeError, KeyError, TypeError, _BackendError) as exc:
            await self._fail(ws, s, mid, "llm_error", f"Backend: {exc!r}.")
            return
        total = (time.perf_counter() - t0) * 1000.0
        ttft_ms = round((ttft or 0.0) * 1000.0, 2)
        stats = {"ttft_ms": ttft_ms, "total_ms": round(total, 2), "tokens": tokens}
        reply_text = "".join(parts)
        meta = {"done_reason": done_reason, "stats": stats}
        try:
            seq = await self._final(s, mid, "reply", reply_text, meta)
        except StoreError as exc:
            await self._unstored(ws, mid, exc)
            return
        if self.store is not None:  # an answered turn: context for the next message
            s.context += (asked, {"role": "assistant", "content": reply_text})
            del s.context[: -2 * CONTEXT_TURNS]
        reply = {"type": "reply", "id": mid, "seq": seq, "text": reply_text}
        with contextlib.suppress(ConnectionClosed):
            await _send(ws, reply | meta)

    async def _fail(self, ws: ServerConnection, s: _Session, mid: str, code: str, msg: str) -> None:
        retryable = code != "llm_error"
        try:
            seq = await self._final(s, mid, "error", msg, {"code": code, "retryable": retryable})
        except StoreError as exc:
            await self._unstored(ws, mid, exc)
            return
        with contextlib.suppress(ConnectionClosed):
            await _send(ws, _error(code, msg, retryable) | {"id": mid, "seq": seq})

    @staticmethod
    async def _unstored(ws: ServerConnection, mid: str, exc: StoreError) -> None:
        """A final event the store did not take: said without a seq (nothing was stored)."""
        with contextlib.suppress(ConnectionClosed):
            error = _error("store_unavailable", f"The session store failed: {exc}.", True)
            await _send(ws, error | {"id": mid})


class _BackendError(Exception):
    """The backend reported an error inside the stream."""


def _pieces(lines: list[bytes]) -> tuple[str, int, str | None]:
    """The text of some complete NDJSON lines, how many carried text, and the
    ``done_reason`` if one of them ends the reply (None otherwise)."""
    text: list[str] = []
    reason: str | None = None
    for line in lines:
        if not line.strip():
            continue
        obj = orjson.loads(line)
        if "error" in obj:
            raise _BackendError(str(obj["error"]))
        content = obj["message"]["content"]
        if content:
            text.append(content)
        if obj.get("done"):
            reason = str(obj.get("done_reason") or "stop")
    return "".join(text), len(text), reason


def _error(code: str, message: str, retryable: bool = False) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "retryable": retryable}


async def _send(ws: ServerConnection, frame: dict[str, Any]) -> None:
    await ws.send(orjson.dumps(frame), text=True)
