"""LocalSlots: the in-process Slots (same rules as the master's, within one process)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from chatd.config import BackendConfig
from chatd.errors import UpstreamUnavailable
from chatd.worker.slots import LocalSlots, QueueFull

BACKENDS = [BackendConfig(url="http://a:1", max_parallel=1)]


def test_cap_fifo_busy_and_positions() -> None:
    async def main() -> None:
        slots = LocalSlots(BACKENDS, max_queue=2)
        assert await slots.acquire(lambda p: None) == 0
        positions: list[int] = []
        first = asyncio.create_task(slots.acquire(positions.append))
        second = asyncio.create_task(slots.acquire(lambda p: None))
        await asyncio.sleep(0)
        assert positions == [1] and slots.queue_depth == 2
        with pytest.raises(QueueFull):
            await slots.acquire(lambda p: None)
        slots.release(0)
        assert await first == 0 and not second.done()
        slots.release(0)
        assert await second == 0
        assert slots.in_flight == [1]

    asyncio.run(main())


def test_unhealthy_backend_fails_waiters_and_new_requests() -> None:
    async def main() -> None:
        slots = LocalSlots(BACKENDS, max_queue=2)
        await slots.acquire(lambda p: None)
        waiting = asyncio.create_task(slots.acquire(lambda p: None))
        await asyncio.sleep(0)
        slots.set_healthy(0, False)
        with pytest.raises(UpstreamUnavailable):
            await waiting
        with pytest.raises(UpstreamUnavailable):
            await slots.acquire(lambda p: None)

    asyncio.run(main())


def test_cancelled_waiter_leaves_the_queue() -> None:
    async def main() -> None:
        slots = LocalSlots(BACKENDS, max_queue=2)
        await slots.acquire(lambda p: None)
        waiting = asyncio.create_task(slots.acquire(lambda p: None))
        await asyncio.sleep(0)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        assert slots.queue_depth == 0
        slots.release(0)
        assert slots.in_flight == [0]

    asyncio.run(main())
