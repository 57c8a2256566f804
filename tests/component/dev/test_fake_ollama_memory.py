"""The fake Ollama's retained memory stays bounded however many requests it serves.

A stand-in that grows distorts every long benchmark run against it: one kept, for the life of
the process, up to 4,096 whole user messages (its reply cache was keyed on the message text)
and 64 whole request bodies (a chat history each). Here the fake serves thousands of chat
requests with distinct, chatd-sized messages, most of them cut short by the client (mid-stream,
or while held before the headers), and Python's own allocation tracer must see its retained
memory grow by far less than one message per request.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Iterator

import aiohttp
import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread

pytestmark = pytest.mark.timeout(300)

MODEL = "qwen2.5-coder:7b"
TEXT_CHARS = 8_000  # about half of chatd's max_message_bytes (16 KiB)
REQUESTS = 2_400  # measured; a third read whole, two thirds cut mid-stream
HELD_ROUNDS = 8  # rounds of requests abandoned while held before their headers
HELD_PER_ROUND = 32
# What the fake may keep beyond the warm-up, whatever the traffic: its bounded request log and
# reply cache were filled during the warm-up. Retaining one message per request would be
# REQUESTS * TEXT_CHARS = 19 MB, 20 times this.
BOUND = 1 << 20


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    # token_ms > 0: a reply is streamed over several writes, so clients can leave mid-stream.
    with FakeOllamaThread(FakeOllama([MODEL], tokens=8, token_ms=1)) as f:
        yield f


def text(i: int) -> str:
    """A distinct message of TEXT_CHARS characters (distinct words too, for the reply)."""
    head = f"message {i} "
    return head + "w" * (TEXT_CHARS - len(head))


async def post_json(s: aiohttp.ClientSession, url: str, body: dict[str, object]) -> None:
    async with s.post(url, json=body) as r:
        assert r.status == 200, await r.text()


async def in_flight(s: aiohttp.ClientSession, fake: FakeOllama) -> int:
    async with s.get(f"{fake.url}/_fake/stats") as r:
        return int((await r.json())["in_flight"])


async def until_in_flight(s: aiohttp.ClientSession, fake: FakeOllama, n: int) -> None:
    for _ in range(2_000):  # bounded: at most ~20 s of polling
        if await in_flight(s, fake) == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"in_flight never reached {n}")


async def streamed(fake: FakeOllama, first: int, count: int) -> None:
    """``count`` chat requests, 16 at a time: i % 3 == 0 read whole, 1 left after the first
    line, 2 left right after the headers (which come with the first token)."""
    limit = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as s:

        async def one(i: int) -> None:
            payload = {"model": MODEL, "messages": [{"role": "user", "content": text(i)}]}
            async with limit, s.post(f"{fake.url}/api/chat", json=payload) as r:
                assert r.status == 200
                if i % 3 == 0:
                    assert b'"done":true' in await r.read()  # the whole reply
                    return
                if i % 3 == 1:
                    await r.content.readline()
                r.close()  # drops the connection: the fake is cut mid-stream

        await asyncio.gather(*(one(i) for i in range(first, first + count)))
        await until_in_flight(s, fake, 0)


async def held(fake: FakeOllama, first: int, rounds: int) -> None:
    """Rounds of HELD_PER_ROUND requests held by ``hang`` and abandoned by their clients."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await post_json(s, f"{fake.url}/_fake/config", {"hang": True})
        for r in range(rounds):
            base = first + r * HELD_PER_ROUND

            async def one(i: int) -> None:
                payload = {"model": MODEL, "messages": [{"role": "user", "content": text(i)}]}
                async with s.post(f"{fake.url}/api/chat", json=payload) as resp:
                    await resp.read()

            tasks = [asyncio.create_task(one(base + i)) for i in range(HELD_PER_ROUND)]
            await until_in_flight(s, fake, HELD_PER_ROUND)
            for t in tasks:
                t.cancel()  # closes each connection; the fake cancels its handler
            await asyncio.gather(*tasks, return_exceptions=True)
            await until_in_flight(s, fake, 0)
        await post_json(s, f"{fake.url}/_fake/config", {"hang": False})


def traffic(fake: FakeOllama, first: int, count: int, rounds: int) -> None:
    async def go() -> None:
        await streamed(fake, first, count)
        await held(fake, first + count, rounds)

    asyncio.run(go())


def retained() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def test_retained_memory_is_bounded_under_cancelled_streams(fake: FakeOllama) -> None:
    tracemalloc.start()
    try:
        # Warm-up: fills whatever is legitimately kept (bounded caches, the request log,
        # aiohttp's and asyncio's own free lists) with distinct texts, like the measure.
        traffic(fake, 0, 600, 2)
        before = retained()
        traffic(fake, 10_000, REQUESTS, HELD_ROUNDS)
        after = retained()
    finally:
        tracemalloc.stop()
    grown = after - before
    assert grown < BOUND, f"retained {grown} bytes more after {REQUESTS} requests"
    stats = fake.stats
    assert stats.in_flight == 0
    total = 600 + 2 * HELD_PER_ROUND + REQUESTS + HELD_ROUNDS * HELD_PER_ROUND
    assert stats.requests_total == total
    assert stats.max_in_flight >= HELD_PER_ROUND  # the held rounds were all in at once
