"""What the two APIs' handlers share: the request in hand, whole answers, and a relayed reply.

:class:`Exchange` is one request being answered (who sent it, its timings, the status sent);
:func:`relay_reply` runs one generation for it, whatever the two APIs are:

* the caller gives the backend request per backend (:data:`Plan`: its API decides the path
  and the body), how a delta is written for the client (``encode``), how the whole answer is
  made (``whole``, for ``stream: false``) and how a late error is written (``late_error``);
* streamed, the response head waits for the first piece of the reply (as Ollama's): until
  then a failure still gets its own status (429, 503, 504: clients retry on those), and a
  request waiting in the queue has sent nothing. After it, a failure is written in the
  stream, in the API's shape, and the body ends;
* the chunks are pushed as they come (no wait per chunk); a client that does not read is cut
  past ``[limits] max_outbound_bytes``, as a WebSocket is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from chatd.config import Config
from chatd.proto import translate
from chatd.proto.httpapi import ApiError, Delta
from chatd.proto.translate import Chunks
from chatd.relay.passthrough import Passthrough
from chatd.worker.api.catalog import Catalog
from chatd.worker.api.relaying import Relaying, Timing
from chatd.worker.httpconn import Request, Responder

Plan = Callable[[int], tuple[str, dict[str, Any]]]
"""For a backend index: the path and body of the request to send it."""


@dataclass(slots=True)
class Context:
    """What every handler needs of its worker."""

    cfg: Config
    relaying: Relaying
    catalog: Catalog
    passthrough: Passthrough
    apis: Sequence[str]  # each backend's api ("ollama", "openai")


@dataclass(slots=True)
class Exchange:
    """One API request being answered."""

    request: Request
    responder: Responder
    api: str  # "ollama" or "openai": the shape of its errors
    key: str  # the client's key (never a secret)
    endpoint: str  # the route ("/api/chat"), for the figures
    started: float = field(default_factory=time.monotonic)
    timing: Timing = field(default_factory=Timing)
    status: int = 0
    model: str = ""


def now_rfc3339() -> str:
    """The time as Ollama writes ``created_at``: RFC 3339, UTC, nanoseconds."""
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


async def send(
    x: Exchange, status: int, body: bytes, content_type: str, extra: Sequence[tuple[str, str]] = ()
) -> None:
    """A whole answer."""
    x.status = status
    headers = [("Content-Type", content_type), *extra]
    await x.responder.send(status, headers, body)


async def relay_reply(
    ctx: Context,
    x: Exchange,
    *,
    model: str,
    stream: bool,
    content_type: str,
    plan: Plan,
    raw_api: str,
    encode: Callable[[Delta], bytes],
    whole: Callable[[list[Delta]], bytes],
    late_error: Callable[[ApiError], bytes],
) -> None:
    """Relay one generation to the client (see the module). ``raw_api``: the backend API
    whose chunks the client gets as sent (its own). Raises ApiError while nothing was sent."""
    deltas: list[Delta] = []
    decoders: list[Chunks] = []
    responder = x.responder

    def emit(d: Delta) -> None:
        if not stream:
            deltas.append(d)
            return
        data = encode(d)
        if not data:  # nothing for the client yet: the head waits (a failure keeps its status)
            return
        if not responder.started:
            x.status = 200
            responder.begin(200, [("Content-Type", content_type), ("Cache-Control", "no-store")])
        responder.push(data)

    def prepare(backend: int) -> tuple[str, dict[str, Any], Callable[[dict[str, Any]], None]]:
        api = ctx.apis[backend]
        path, body = plan(backend)
        chunks = Chunks(api, keep_raw=api == raw_api)
        decoders.append(chunks)

        def on_chunk(obj: dict[str, Any]) -> None:
            d = chunks.feed(obj)
            if d is not None:
                emit(d)

        return path, body, on_chunk

    try:
        await ctx.relaying.stream(x.key, model, prepare, x.timing)
    except ApiError as err:
        if not responder.started:
            raise
        responder.push(late_error(err))
        return
    chunks = decoders[-1]
    sent_final = chunks.final is not None  # Ollama's done chunk went through emit already
    final = chunks.end()
    if not sent_final:
        emit(final)
    if not stream:
        await send(x, 200, whole(deltas), content_type)


EMBED_MAX = 64 * 1024 * 1024
"""Bytes of an embeddings answer accepted from a backend (about 10,000 vectors of 768
dimensions; beyond: 502): the answer is held whole, a few copies of it at once."""


def embed_limit(ctx: Context) -> float:
    """Seconds an embeddings request may take: a load, then the work."""
    return ctx.cfg.llm.load_timeout + ctx.cfg.llm.total_timeout


def parse_vectors(api: str, answer: bytes) -> tuple[list[Any], int | None]:
    """The vectors of a backend's embeddings answer (502 when it has none)."""
    try:
        obj = orjson.loads(answer)
        if type(obj) is not dict:
            raise ValueError("not an object")
        return translate.vectors_of(api, obj)
    except (orjson.JSONDecodeError, ValueError) as exc:
        raise ApiError(
            "unavailable", f"the backend's embeddings answer is unusable: {exc}"
        ) from exc
