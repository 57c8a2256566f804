"""The direct baseline: the same load sent straight to the backend, no chatd in between.

Same connections, rate, schedule and window as the chatd run it is compared with; each
"connection" is a conversation whose turns are ``POST /api/chat`` (streaming) to the fake
Ollama with the body chatd itself would send (the model, the conversation's last 40
messages, ``stream: true``, ``keep_alive``), through one aiohttp keep-alive pool per client
process with no limit, as chatd's relay does. Recorded per message: first body chunk (the
first token: what ``first`` means here; there is no ``ack``) and end of the stream (the
reply), both from the intended send time. chatd's overhead is then a ratio of two figures
measured in the same run on the same machine.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

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
from chatd.bench.server import MODEL

HISTORY_MESSAGES = 40  # chatd sends 2 * history_turns (default 20) messages of context


async def direct_load(job: LoadJob, go: Callable[[], Any], progress: Counter) -> LoadResult:
    """One client process of the direct baseline (``job.url`` is the backend's base URL)."""
    from chatd.dev.fake_ollama.wire import expected_reply

    expected = expected_reply(TEXT, 8)
    res = LoadResult()
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=30),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    url = job.url.rstrip("/") + "/api/chat"
    headers = {"Content-Type": "application/json"}
    # Warm the pool (one request per connection) so connection set-up is not measured.
    warm = orjson.dumps({"model": MODEL, "messages": [], "stream": True})
    for _ in job.conns:
        try:
            async with session.post(url, data=warm, headers=headers) as resp:
                await resp.read()
            res.connections_opened += 1
        except aiohttp.ClientError:
            res.connect_failed += 1
    conns = schedule(job)
    t0 = await go()

    async def request(c: _Conn, k: int, body: bytes, history: deque[dict[str, str]]) -> None:
        err: str | None = None
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                if resp.status != 200:
                    err = f"http_{resp.status}"
                    await resp.read()
                    return
                buf = bytearray()
                async for chunk in resp.content.iter_any():
                    if not buf:
                        c.first[k] = clock() - t0
                    buf += chunk
            lines = [orjson.loads(line) for line in bytes(buf).split(b"\n") if line]
            text = "".join(x["message"]["content"] for x in lines)
            if not lines or not lines[-1].get("done") or text != expected:
                res.bad_reply += 1
            history.append({"role": "assistant", "content": text})
        except (aiohttp.ClientError, OSError, ValueError, KeyError, TimeoutError) as exc:
            err = type(exc).__name__
        finally:
            c.finish(k, clock() - t0, err)
            progress.value += 1

    async def conversation(c: _Conn) -> None:
        history: deque[dict[str, str]] = deque(maxlen=HISTORY_MESSAGES)
        tasks: list[asyncio.Task[None]] = []

        async def one(k: int) -> bool:
            history.append({"role": "user", "content": TEXT})
            body = orjson.dumps(
                {"model": MODEL, "messages": list(history), "stream": True, "keep_alive": "5m"}
            )
            tasks.append(asyncio.create_task(request(c, k, body, history)))
            return True

        await _paced_send(c, t0, one)
        await asyncio.gather(*tasks, return_exceptions=True)

    senders = [asyncio.create_task(conversation(c)) for c in conns]
    await _await_answers(conns, t0, job)
    for s in senders:
        s.cancel()
    await asyncio.gather(*senders, return_exceptions=True)
    await session.close()
    res.records = [r for c in conns for r in c.records()]
    return res
