"""Open-loop load on the Ollama- and OpenAI-compatible HTTP APIs, in one client process.

The same model as the WebSocket load (:mod:`chatd.bench.load`): connection i of C sends its
k-th request at the intended time ``t0 + i/R + k*C/R`` (:func:`chatd.bench.stats.uniform_schedule`)
and every latency is measured from that intended time. Here a *connection* is one HTTP/1.1
keep-alive connection (an aiohttp ``ClientSession`` of its own with a connector of limit 1)
carrying **one request at a time**: a request is sent at its intended time or, when the
previous one on its connection has not ended yet, as soon as it has; the wait counts in its
latency (no coordinated omission) and shows as send lag (actual minus intended send).

Each request is ``POST`` of one user message (:func:`chatd.bench.httpwire.request_body`,
``stream: true``), its body read to the end by :mod:`chatd.bench.httpwire`'s readers.
Recorded per request (a :data:`chatd.bench.load.Record`): intended, sent, ``ack`` (None: the
HTTP APIs have none), first content token, end of the body, and the error: ``http_STATUS``
for a status other than 200 (its body read and dropped), ``stream_error`` when the stream
reported an error, ``truncated`` when it ended without its end marker, ``malformed_response``
when the response could not be parsed as HTTP (aiohttp's parser is strict: a header sent
twice is refused), or the exception's name (a connection reset, a timeout). A reply whose
text is not the fake's known answer counts in ``bad_reply`` (not an error: latency still
counts).

Before the start every connection is opened by one warm-up request of the same kind (so
connection set-up is not measured); a connection whose warm-up fails is counted in
``connect_failed`` and still used (its requests record their errors).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import aiohttp

from chatd.bench.httpwire import auth_headers, reader_for, request_body
from chatd.bench.load import (
    TEXT,
    Counter,
    LoadJob,
    LoadResult,
    _await_answers,
    _Conn,
    _paced_send,
    clock,
    schedule,
)
from chatd.bench.server import MODEL, TOKENS

#: ``LoadJob.mode`` -> the API it speaks (``job.url`` is then the endpoint's full URL).
MODES = {"http-ollama": "ollama", "http-openai": "openai"}
REQUEST_TIMEOUT_S = 30.0


def new_session(timeout: float = REQUEST_TIMEOUT_S, limit: int = 1) -> aiohttp.ClientSession:
    """A lean aiohttp session: ``limit`` keep-alive connections, no cookies, a total timeout
    per request."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=0, ttl_dns_cache=None),
        timeout=aiohttp.ClientTimeout(total=timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    )


class Outcome:
    """One request's result: seconds (``clock()``) at the first content token and at the
    end, the error (None when the stream ended as it should), the reply's text, and the
    ``Retry-After`` of a refusal (seconds, or None)."""

    __slots__ = ("done", "error", "first", "retry_after", "text")

    def __init__(self) -> None:
        self.first: float | None = None
        self.done: float | None = None
        self.error: str | None = None
        self.text = ""
        self.retry_after: float | None = None


async def post_stream(
    session: aiohttp.ClientSession,
    url: str,
    api: str,
    body: bytes,
    headers: dict[str, str],
    on_first_byte: Callable[[float], None] | None = None,
) -> Outcome:
    """POST ``body`` to ``url`` and read the streamed reply of ``api`` to its end (see the
    module docstring for the errors). ``on_first_byte(t)`` is called with the ``clock()``
    time of the first body chunk of a 200 answer. Cancellation propagates."""
    out = Outcome()
    reader = reader_for(api)
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                await resp.read()
                out.done, out.error = clock(), f"http_{resp.status}"
                with contextlib.suppress(ValueError, TypeError):
                    out.retry_after = float(resp.headers.get("Retry-After", ""))
                return out
            async for chunk in resp.content.iter_any():
                now = clock()
                if on_first_byte is not None:
                    on_first_byte(now)
                    on_first_byte = None
                if reader.feed(chunk):
                    out.first = now
            if reader.finish():
                out.first = clock()
        out.done = clock()
        if reader.error is not None:
            out.error = "stream_error"
        elif not reader.done:
            out.error = "truncated"
        out.text = reader.text
    except aiohttp.ClientResponseError:  # not a status (we never raise_for_status): unparsable
        out.done, out.error = clock(), "malformed_response"
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        out.done, out.error = clock(), type(exc).__name__
    return out


async def http_load(job: LoadJob, go: Callable[[], Any], progress: Counter) -> LoadResult:
    """One client process of an HTTP load (``job.mode`` one of :data:`MODES`, ``job.url``
    the endpoint's URL)."""
    from chatd.dev.fake_ollama.wire import expected_reply

    api = MODES[job.mode]
    expected = expected_reply(TEXT, TOKENS)
    body = request_body(api, MODEL, TEXT)
    headers = auth_headers(None)
    res = LoadResult()
    sessions = [new_session() for _ in job.conns]
    gate = asyncio.Semaphore(50)  # 50 warm-ups at a time: the listen backlog stays short

    async def warm(s: aiohttp.ClientSession) -> bool:
        async with gate:
            return (await post_stream(s, job.url, api, body, headers)).error is None

    ok = await asyncio.gather(*(warm(s) for s in sessions))
    res.connections_opened = sum(ok)
    res.connect_failed = len(ok) - res.connections_opened
    conns = schedule(job)
    t0 = await go()

    def sender(c: _Conn, s: aiohttp.ClientSession) -> Callable[[int], Any]:
        async def one(k: int) -> bool:
            out = await post_stream(s, job.url, api, body, headers)
            if out.first is not None:
                c.first[k] = out.first - t0
            if out.error is None and out.text != expected:
                res.bad_reply += 1
            c.finish(k, (out.done or clock()) - t0, out.error)
            progress.value += 1
            return True

        return one

    senders = [
        asyncio.create_task(_paced_send(c, t0, sender(c, s)))
        for c, s in zip(conns, sessions, strict=True)
    ]
    try:
        await _await_answers(conns, t0, job)
    finally:
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
    res.records = [r for c in conns for r in c.records()]
    return res
