"""Closed-loop load over the chat protocol, in one client process (``LoadJob.mode`` "closed").

Each connection of the job (bare ``websockets`` frames with orjson, as the ``raw`` mode of
:mod:`chatd.bench.load`: ``hello`` -> ``welcome``, then ``message{id,text}``) sends its first
message at the run's start and each next one as soon as the final answer to the previous one
is in: no think time, one message in flight per connection. It sends no message at or after
``warmup + duration`` (seconds from the start); ``job.rate`` is not used.

Per message a :data:`~chatd.bench.load.Record` is kept whose *intended* time is its send time
(in a closed loop a message is due when it is sent: there is no schedule to fall behind), so
latencies are from the send; the ack, the first token, the final ``reply`` (or final
``error``, whose code is kept) as :mod:`chatd.bench.load` records them. A reply is checked: its
text must be the fake Ollama's known answer (else ``bad_reply``) and its id the message in
flight (a reply or final error for any other id also counts in ``bad_reply``: the connection
has only one message out). A message without a final answer within ``job.drain`` seconds has
no ``done`` time (lost) and ends its connection's loop, as does the server closing the
connection (``closed``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from chatd.bench.load import (
    HEAD,
    TEXT,
    Counter,
    LoadJob,
    LoadResult,
    Record,
    Stages,
    clock,
    open_sessions,
    parse_stages,
)
from chatd.bench.server import TOKENS


class _Loop:
    """One connection's messages so far: what :class:`~chatd.bench.load.LoadResult` keeps."""

    __slots__ = ("records", "stages")

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.stages: list[Stages] = []


async def _one(
    ws: ClientConnection, k: int, t0: float, wait_s: float, expected: str, res: LoadResult
) -> tuple[Record, Stages]:
    """Send message ``k`` and read frames until its final answer or ``wait_s`` seconds; its
    record and stages. ``ConnectionClosed`` propagates (the record is then lost)."""
    mid = str(k)
    sent = clock() - t0
    ack: float | None = None
    first: float | None = None
    await ws.send(HEAD + mid.encode() + b'"}', text=True)
    try:
        async with asyncio.timeout(wait_s):
            while True:
                f = orjson.loads(await ws.recv(decode=False))
                typ = f.get("type")
                if typ == "token":
                    if first is None:
                        first = clock() - t0
                elif typ == "ack":
                    ack = clock() - t0
                elif typ == "reply" or (typ == "error" and "id" in f):
                    now = clock() - t0
                    if f.get("id") != mid:
                        res.bad_reply += 1
                        continue
                    if typ == "error":
                        return (sent, sent, ack, first, now, str(f.get("code"))), None
                    if f.get("text") != expected:
                        res.bad_reply += 1
                    first = now if first is None else first  # no token frame: its text is here
                    return (sent, sent, ack, first, now, None), parse_stages(f.get("stats"))
    except TimeoutError:
        pass
    return (sent, sent, ack, first, None, None), None


async def closed_load(job: LoadJob, go: Callable[[], Any], progress: Counter) -> LoadResult:
    """Open every connection of ``job`` (hello -> welcome), wait for ``go``, then run each
    connection's closed loop (module docstring); the records of every message sent."""
    from chatd.dev.fake_ollama.wire import expected_reply

    expected = expected_reply(TEXT, TOKENS)
    res = LoadResult()
    opened = await open_sessions(job.url, len(job.conns))
    live = [ws for ws in opened if isinstance(ws, ClientConnection)]
    res.connect_failed = len(opened) - len(live)
    res.connections_opened = len(live)
    t0 = await go()
    end = job.warmup + job.duration

    async def loop(ws: ClientConnection, out: _Loop) -> None:
        k = 0
        while clock() - t0 < end:
            try:
                rec, stages = await _one(ws, k, t0, job.drain, expected, res)
            except ConnectionClosed:
                res.closed += 1
                sent = clock() - t0
                out.records.append((sent, sent, None, None, None, None))
                out.stages.append(None)
                return
            out.records.append(rec)
            out.stages.append(stages)
            if rec[4] is None:  # no answer in time: this connection's loop is stuck
                return
            progress.value += 1
            k += 1

    loops = [_Loop() for _ in live]
    await asyncio.gather(*(loop(ws, out) for ws, out in zip(live, loops, strict=True)))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            await asyncio.gather(*(ws.close() for ws in live), return_exceptions=True)
    res.records = [r for lp in loops for r in lp.records]
    res.stages = [s for lp in loops for s in lp.stages]
    return res
