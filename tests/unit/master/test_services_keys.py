"""Client keys end to end in one process: MasterSlots (worker) <-> Services (master), over the
real codec: the key travels in slot_acquire and slot_release, key_busy comes back as KeyBusy."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from chatd.config import BackendConfig, Config, LimitsConfig, LLMConfig
from chatd.proto import control as proto
from chatd.worker.slots import KeyBusy, QueueFull
from tests.unit.master.test_services_slots import URLS, setup


def config(**limits: int) -> Config:
    backends = tuple(BackendConfig(url=u, max_parallel=1) for u in URLS)
    return Config(llm=LLMConfig(backends=backends, max_queue=4), limits=LimitsConfig(**limits))


def acquires(received: list[dict[str, Any]]) -> list[str | None]:
    """The key of every slot_acquire the master received (None: none sent)."""
    return [m.get("key") for m in received if m[proto.T] == proto.SLOT_ACQUIRE]


def test_key_busy_is_the_clients_own_bound_and_the_others_still_queue() -> None:
    async def main() -> None:
        services, workers, (s1, s2) = setup(config(max_queued_per_key=1))
        assert {await s1.acquire(lambda p: None, key="f") for _ in range(2)} == {0, 1}
        waiting = asyncio.create_task(s1.acquire(lambda p: None, key="f"))
        await asyncio.sleep(0)
        with pytest.raises(KeyBusy):
            await s1.acquire(lambda p: None, key="f")
        light = asyncio.create_task(s2.acquire(lambda p: None, key="l"))
        await asyncio.sleep(0)
        assert not light.done()  # queued, not refused: the flooder's bound is its own
        assert issubclass(KeyBusy, QueueFull)
        assert acquires(workers.received) == ["f", "f", "f", "f", "l"]
        assert services.granter.statistics().refused_key_busy_total == 1
        for task in (waiting, light):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())


def test_a_keyed_slot_goes_back_naming_its_key_and_frees_the_key() -> None:
    async def main() -> None:
        services, workers, (s1, s2) = setup(config(max_in_flight_per_key=1))
        assert await s1.acquire(lambda p: None, key="f") == 0
        positions: list[int] = []
        second = asyncio.create_task(s1.acquire(positions.append, key="f"))
        await asyncio.sleep(0)
        assert positions == [1] and not second.done()  # backend 1 is free, but f holds 1
        assert await s2.acquire(lambda p: None, key="l") == 1  # others are not held up
        s1.release(0, "f")
        assert await second == 0
        releases = [m for m in workers.received if m[proto.T] == proto.SLOT_RELEASE]
        assert releases == [{proto.T: proto.SLOT_RELEASE, "backend": 0, "key": "f"}]
        assert services.granter.key_in_flight("f") == 1
        assert not s1.leasing  # a per-key bound: nothing is leased
        s1.release(0, "f")
        s2.release(1, "l")
        assert services.granter.key_in_flight("f") == services.granter.key_in_flight("l") == 0
        assert s1.held == [0, 0] and s2.held == [0, 0]

    asyncio.run(main())


def test_an_acquire_without_a_key_is_the_empty_key() -> None:
    """What a worker that sends no key (or a malformed one) gets: the key ""."""

    async def main() -> None:
        services, workers, (s1, _) = setup(config(max_in_flight_per_key=5))  # all counted
        assert await s1.acquire(lambda p: None) == 0
        assert acquires(workers.received) == [None]
        assert services.granter.key_in_flight("") == 1
        assert await s1.acquire(lambda p: None, key="f") == 1  # both backends busy now
        workers.deliver(workers.by_pid[100], {proto.T: proto.SLOT_ACQUIRE, "rid": 99, "key": 7})
        keys = services.granter.statistics().keys
        assert [(k.key, k.queued, k.in_flight) for k in keys] == [("", 1, 1), ("f", 0, 1)]

    asyncio.run(main())
