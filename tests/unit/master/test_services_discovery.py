"""Backends from DNS end to end in one process: the master's Services (the granter, each
worker's replica of its table) and the workers' side (Discovered: their table, relay and
slots), over the real msgpack codec. The addresses change; every worker and the master agree
on every index, a gone address is drained, waiters get the new ones, a new worker starts
with the current set."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from chatd.backendtable import BackendTable
from chatd.config import BackendConfig, Config, LLMConfig
from chatd.errors import UpstreamUnavailable
from chatd.master.services import Services
from chatd.proto import control as proto
from chatd.relay.generate import Relay
from chatd.worker import discovered as discovered_module
from chatd.worker.discovered import Discovered
from chatd.worker.slots import MasterSlots, dispatch
from tests.unit.master.test_services_slots import FakeWorker, FakeWorkers

URL = "http://ollama:11434"
A, B, C = "http://10.0.0.5:11434", "http://10.0.0.6:11434", "http://10.0.0.7:11434"
CFG = Config(
    llm=LLMConfig(
        backends=(
            BackendConfig(url="http://static:1", max_parallel=1),
            BackendConfig(url=URL, discover="dns", max_parallel=1, max_parallel_embed=1),
        )
    )
)


@dataclass
class Side:
    """One worker's side: what chatd.worker.main builds."""

    fake: FakeWorker
    table: BackendTable
    relay: Relay
    slots: MasterSlots
    embed: MasterSlots
    discovered: Discovered

    def urls(self, indexes: list[int]) -> list[str]:
        return [self.relay.backend(i).url for i in indexes]


def spawn(services: Services, workers: FakeWorkers, pid: int, cfg: Config = CFG) -> Side:
    fake = FakeWorker(slot=pid - 100, pid=pid, cfg=cfg)

    def send(msg: Mapping[str, Any]) -> bool:
        return workers.deliver(fake, msg)

    table = BackendTable(cfg.llm.backends)
    relay = Relay(cfg.llm, table.configs)
    slots = MasterSlots(table.configs, send)
    embed = MasterSlots(table.configs, send, proto.SLOT_CLASS_EMBED)

    async def prewarm(_i: int) -> None:
        return None

    side = Side(
        fake, table, relay, slots, embed, Discovered(table, relay, (slots, embed), send, prewarm)
    )
    by_class = {proto.SLOT_CLASS_CHAT: slots, proto.SLOT_CLASS_EMBED: embed}

    def inbox(msg: dict[str, Any]) -> None:
        if msg[proto.T] in Discovered.MESSAGES:
            side.discovered.on_message(msg)
        elif msg[proto.T] in MasterSlots.MESSAGES:
            dispatch(msg, by_class)

    fake.inbox = inbox
    workers.by_pid[pid] = fake
    for hook in workers.on_spawn:
        hook(fake)
    return side


def agree(services: Services, sides: list[Side]) -> None:
    """Each worker's table is the master's replica of it, index for index."""
    for side in sides:
        replica = services._tables[side.fake.pid]
        assert replica.entries == side.table.entries
        assert [side.relay.backend(i).url for i in range(side.relay.count)] == replica.keys
        assert side.slots.live == side.embed.live == [e.live for e in replica.entries]


def test_addresses_come_and_go_without_dropping_a_request() -> None:
    async def main() -> None:
        workers = FakeWorkers()
        services = Services(CFG, workers)  # type: ignore[arg-type]
        one, two = spawn(services, workers, 101), spawn(services, workers, 102)
        assert one.relay.live == [0] and one.urls(one.relay.live) == ["http://static:1"]

        services.set_addresses({URL: ("10.0.0.5",)})
        agree(services, [one, two])
        assert one.urls(one.relay.live) == ["http://static:1", A]
        assert one.relay.apis == ["ollama", "ollama"]
        # Fill both backends (max_parallel 1 each); the third request waits.
        first = await one.slots.acquire(lambda p: None)
        second = await two.slots.acquire(lambda p: None)
        assert {first, second} == {0, 1}
        waiting = asyncio.create_task(two.slots.acquire(lambda p: None))
        await asyncio.sleep(0)
        assert not waiting.done()

        # A second address: the waiter (allowed only what its worker knew) gets it at once.
        services.set_addresses({URL: ("10.0.0.5", "10.0.0.6")})
        got = await asyncio.wait_for(waiting, 1)
        assert two.urls([got]) == [B]
        agree(services, [one, two])

        # 10.0.0.5 disappears while a request runs on it: drained, not revoked.
        on_a = first if one.urls([first]) == [A] else None
        holder = one if on_a is not None else two
        index_a = holder.table.find(A)
        assert index_a is not None
        services.set_addresses({URL: ("10.0.0.6",)})
        agree(services, [one, two])
        rows = {b.key: (b.in_flight, b.configured) for b in services.granter.statistics().backends}
        assert rows[A] == (1, False)
        assert index_a not in holder.relay.live and not holder.slots.live[index_a]
        holder.slots.release(index_a)  # its request ends: A is forgotten, nothing re-granted
        assert A not in {b.key for b in services.granter.statistics().backends}
        assert holder.slots.held[index_a] == 0

        # It comes back, with a third one: revived at its old index in every table.
        services.set_addresses({URL: ("10.0.0.5", "10.0.0.6", "10.0.0.7")})
        agree(services, [one, two])
        assert holder.table.find(A) == index_a and index_a in holder.relay.live

        # A worker forked now starts with the current set, told first thing.
        three = spawn(services, workers, 103)
        agree(services, [one, two, three])
        assert three.urls(three.relay.live) == ["http://static:1", A, B, C]
        status = services.current
        assert [e.key for e in status.entries if e.live] == ["http://static:1", A, B, C]

    asyncio.run(main())


def test_no_address_refuses_the_waiters_and_readiness_says_so() -> None:
    async def main() -> None:
        cfg = Config(llm=LLMConfig(backends=(BackendConfig(url=URL, discover="dns"),)))
        workers = FakeWorkers()
        services = Services(cfg, workers)  # type: ignore[arg-type]
        one = spawn(services, workers, 101, cfg)
        assert not one.slots.any_healthy()  # no backend at all yet: /readyz says so
        services.set_addresses({URL: ("10.0.0.5",)})
        assert one.slots.any_healthy()
        services.set_addresses({URL: ()})
        assert not one.slots.any_healthy()
        with pytest.raises(UpstreamUnavailable):
            await one.slots.acquire(lambda p: None)

    asyncio.run(main())


def test_a_retired_backend_is_closed_once_idle_and_opened_again_when_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(discovered_module, "SWEEP_EVERY", 0.01)
    monkeypatch.setattr(discovered_module, "CLOSE_AFTER", 0.0)

    async def main() -> None:
        workers = FakeWorkers()
        services = Services(CFG, workers)  # type: ignore[arg-type]
        one = spawn(services, workers, 101)
        await one.relay.start()
        sweeping = asyncio.create_task(one.discovered.sweep())
        try:
            services.set_addresses({URL: ("10.0.0.5",)})
            index = one.table.find(A)
            assert index is not None and one.relay.backend(index).pool is not None
            held = await one.slots.acquire(lambda p: None, frozenset({0}))
            assert held == index
            services.set_addresses({URL: ()})
            await asyncio.sleep(0.05)
            assert one.relay.backend(index).pool is not None  # a request still holds a slot
            one.slots.release(index)
            await asyncio.sleep(0.05)
            assert (
                one.relay.backend(index).pool is None and one.relay.backend(index).session is None
            )
            services.set_addresses({URL: ("10.0.0.5",)})
            assert one.relay.pool(index) is not None  # opened again on use
        finally:
            sweeping.cancel()
            await one.relay.close()

    asyncio.run(main())
