"""A relayed API request gives its slot back however it ends (chatd.worker.api.relaying)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from chatd.config import BackendConfig
from chatd.errors import UpstreamRejected, UpstreamTimeout
from chatd.proto.httpapi import ApiError
from chatd.worker.api.relaying import Relaying, Timing
from chatd.worker.slots import LocalSlots


class FakePassthrough:
    """Fails each stream as told (an exception to raise, or None: a clean end)."""

    def __init__(self, count: int, outcomes: list[BaseException | None]) -> None:
        self.relay = SimpleNamespace(count=count, live=list(range(count)))
        self.outcomes = outcomes
        self.tried: list[int] = []

    async def stream(self, backend: int, *args: Any) -> None:
        self.tried.append(backend)
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome


class NoCatalog:
    def lacks(self, backend: int, model: str) -> bool:
        return False


def relaying(count: int, outcomes: list[BaseException | None]) -> tuple[Relaying, LocalSlots, Any]:
    slots = LocalSlots(
        [BackendConfig(url=f"http://b{i}:1", max_parallel=1) for i in range(count)], 8
    )
    pt = FakePassthrough(count, outcomes)
    return Relaying(pt, slots, slots, NoCatalog(), 0), slots, pt  # type: ignore[arg-type]


def test_a_request_that_cannot_be_built_gives_its_slot_back() -> None:
    async def main() -> None:
        r, slots, _ = relaying(1, [None])

        def broken(_backend: int) -> Any:
            raise AttributeError("a bug in a translation")

        for _ in range(3):  # one slot: a leaked one would make the next wait for ever
            with pytest.raises(AttributeError):
                async with asyncio.timeout(5):
                    await r.stream("k", "m", broken, Timing())
        assert slots.in_flight == [0]

    asyncio.run(main())


def test_failover_before_the_first_chunk_and_never_twice_to_a_backend_that_lacks_it() -> None:
    def ok(_backend: int) -> Any:
        return "/api/chat", {}, lambda _obj: None

    async def main() -> None:
        missing = UpstreamRejected("no such model", backend="x", status=404, detail="not found")
        r, slots, pt = relaying(2, [missing, missing, None])
        with pytest.raises(ApiError) as info:
            await r.stream("k", "m", ok, Timing())
        assert info.value.status == 404 and sorted(pt.tried) == [0, 1]  # not a third time
        assert slots.in_flight == [0, 0]
        timeout = UpstreamTimeout("too slow", backend="x")
        r, slots, pt = relaying(2, [timeout, None])
        await r.stream("k", "m", ok, Timing())
        assert len(pt.tried) == 2 and pt.tried[0] != pt.tried[1]
        sent = UpstreamRejected("broke", backend="x")
        sent.first_token_sent = True
        r, slots, pt = relaying(2, [sent, None])
        with pytest.raises(ApiError):
            await r.stream("k", "m", ok, Timing())
        assert len(pt.tried) == 1  # a chunk had reached the client: no retry
        assert slots.in_flight == [0, 0]

    asyncio.run(main())
