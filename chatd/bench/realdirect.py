"""The ``real`` scenario's direct baseline: the prompts straight to the model, no chatd.

``concurrency`` clients (the number of chatd's LLM slots) each send one request after the
other (closed loop) for ``seconds``: ``POST /v1/chat/completions`` with the body chatd's
relay sends for ``api = "openai"`` (the model, the one user message, ``stream: true``,
``stream_options.include_usage``; no ``max_tokens``: the server's cap applies to both). A
new connection per request, as llama.cpp's server closes it after each streamed reply.

Per request: time to the first content piece (TTFT), to ``data: [DONE]`` (reply), the
completion tokens (``usage``, else the pieces). ``capacity_per_s`` = replies completed /
the seconds the loop ran: the model's throughput at this concurrency, which the ``real``
scenario offers a multiple of through chatd.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from chatd.bench import stats as st

clock = time.perf_counter


def tokens_per_s(tokens: int | None, first: float | None, done: float | None) -> float | None:
    """Decode rate of one reply: ``(tokens - 1) / (done - first)`` (the tokens after the
    first, over the time from the first to the end; seconds in). None with fewer than 2
    tokens or no time between."""
    if tokens is None or tokens < 2 or first is None or done is None or done <= first:
        return None
    return (tokens - 1) / (done - first)


async def one_request(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str
) -> tuple[float | None, float, int | None, str | None]:
    """One streamed completion: (TTFT s or None, total s, tokens or None, error or None)."""
    body = orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    t0 = clock()
    first: float | None = None
    pieces = 0
    usage: int | None = None
    try:
        async with session.post(
            f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            if resp.status != 200:
                await resp.read()
                return None, clock() - t0, None, f"http_{resp.status}"
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data: {"):
                        continue
                    doc = orjson.loads(line[6:])
                    if doc.get("usage"):
                        usage = int(doc["usage"].get("completion_tokens") or 0) or None
                    choices = doc.get("choices") or [{}]
                    if (choices[0].get("delta") or {}).get("content"):
                        pieces += 1
                        if first is None:
                            first = clock() - t0
    except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
        return first, clock() - t0, None, type(exc).__name__
    return first, clock() - t0, usage or pieces or None, None


async def closed_loop(
    url: str, model: str, prompts: Sequence[str], concurrency: int, seconds: float
) -> dict[str, Any]:
    """One warm-up request, then ``concurrency`` closed-loop clients for ``seconds``; the
    figures (module docstring): ``ttft_ms``, ``reply_ms``, ``tokens`` and ``tokens_per_s``
    summaries, ``errors`` by kind, ``capacity_per_s``."""
    conn = aiohttp.TCPConnector(force_close=True, limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    results: list[tuple[float | None, float, int | None, str | None]] = []
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        await one_request(session, url, model, prompts[0])
        t0 = clock()

        async def client(i: int) -> None:
            k = i
            while clock() - t0 < seconds:
                results.append(await one_request(session, url, model, prompts[k % len(prompts)]))
                k += concurrency

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds + 120):
                await asyncio.gather(*(client(i) for i in range(concurrency)))
        elapsed = clock() - t0
    ok = [r for r in results if r[3] is None]
    errors: dict[str, int] = {}
    for r in results:
        if r[3] is not None:
            errors[r[3]] = errors.get(r[3], 0) + 1
    rates = [tokens_per_s(r[2], r[0], r[1]) for r in ok]
    return {
        "concurrency": concurrency,
        "duration_s": round(elapsed, 2),
        "requests": len(results),
        "replies": len(ok),
        "capacity_per_s": round(st.rate(len(ok), elapsed), 3),
        "ttft_ms": st.summary(r[0] * 1000.0 for r in ok if r[0] is not None),
        "reply_ms": st.summary(r[1] * 1000.0 for r in ok),
        "tokens": st.summary(float(r[2]) for r in ok if r[2] is not None),
        "tokens_per_s": st.summary(x for x in rates if x is not None),
        "errors": errors,
    }
