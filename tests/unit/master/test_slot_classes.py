"""Slot classes end to end in one process: a chat and an embed MasterSlots per worker (routed
by :func:`chatd.worker.slots.dispatch`) <-> Services, over the real codec.

The point of the embed class: a burst of embedding requests never delays a chat generation,
and chat never delays embeddings beyond their own cap. Each class has its own slots per
backend (``max_parallel``, ``max_parallel_embed``) and its own queue; health, reloads and a
dying worker apply to both. On the wire a chat message is exactly what it was before classes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from chatd.config import BackendConfig, Config, LimitsConfig, LLMConfig
from chatd.errors import UpstreamUnavailable
from chatd.master.services import Services
from chatd.proto import control as proto
from chatd.worker.slots import MasterSlots, QueueFull, dispatch
from tests.unit.master.test_services_slots import URLS, FakeWorker, FakeWorkers

CHAT, EMBED = proto.SLOT_CLASS_CHAT, proto.SLOT_CLASS_EMBED


def config(
    chat: tuple[int, ...] = (1, 1),
    embed: tuple[int, ...] = (2, 2),
    max_queue: int = 100,
    **limits: int,
) -> Config:
    backends = tuple(
        BackendConfig(url=u, max_parallel=c, max_parallel_embed=e)
        for u, c, e in zip(URLS, chat, embed, strict=True)
    )
    return Config(
        llm=LLMConfig(backends=backends, max_queue=max_queue), limits=LimitsConfig(**limits)
    )


@dataclass
class W:
    """One worker's two slot classes, as chatd.worker.main.Worker builds them."""

    pid: int
    chat: MasterSlots
    embed: MasterSlots


def setup(cfg: Config, n: int = 2) -> tuple[Services, FakeWorkers, list[W]]:
    workers = FakeWorkers()
    services = Services(cfg, workers)  # type: ignore[arg-type]
    out = []
    for i in range(n):
        fw = FakeWorker(slot=i + 1, pid=100 + i, cfg=cfg)

        def send(msg: Mapping[str, Any], fw: FakeWorker = fw) -> bool:
            return workers.deliver(fw, msg)

        w = W(
            fw.pid, MasterSlots(cfg.llm.backends, send), MasterSlots(cfg.llm.backends, send, EMBED)
        )
        by_class = {CHAT: w.chat, EMBED: w.embed}
        fw.inbox = lambda msg, by_class=by_class: dispatch(msg, by_class)
        workers.by_pid[fw.pid] = fw
        out.append(w)
    return services, workers, out


def nothing(position: int) -> None:
    pass


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def in_flight(services: Services, kind: str) -> list[int]:
    return [b.in_flight for b in services.granters[kind].statistics().backends]


def test_an_embed_flood_never_delays_chat() -> None:
    """Thousands of embedding requests waiting: a chat request is granted at once, and every
    embed grant waits for an embed slot, never a chat one."""

    async def main() -> None:
        services, _, (w1, w2) = setup(config(chat=(1, 1), embed=(2, 2), max_queue=5000))
        flood = [asyncio.create_task(w1.embed.acquire(nothing, key="rag")) for _ in range(2000)]
        await settle()
        assert sum(t.done() for t in flood) == 4  # the embed slots: 2 per backend
        assert services.embed_granter.queue_depth == 1996
        assert services.granter.queue_depth == 0
        # Chat: granted at once, on both backends, although 1996 embeddings wait.
        assert await asyncio.wait_for(w2.chat.acquire(nothing, key="user"), 1.0) == 0
        assert await asyncio.wait_for(w2.chat.acquire(nothing, key="user"), 1.0) == 1
        assert in_flight(services, CHAT) == [1, 1] and in_flight(services, EMBED) == [2, 2]
        # A chat slot coming back goes to a chat waiter, not to the embed queue.
        waiting = asyncio.create_task(w1.chat.acquire(nothing))
        await settle()
        assert not waiting.done()
        w2.chat.release(0)
        assert await asyncio.wait_for(waiting, 1.0) == 0
        assert services.embed_granter.queue_depth == 1996
        for t in flood:
            t.cancel()
        await asyncio.gather(*flood, return_exceptions=True)

    asyncio.run(main())


def test_chat_waiters_never_delay_embeddings() -> None:
    """The other way round: chat full with a queue, an embedding is granted at once."""

    async def main() -> None:
        services, _, (w1, w2) = setup(config(chat=(1, 1), embed=(1, 1)))
        await w1.chat.acquire(nothing)
        await w1.chat.acquire(nothing)
        chat_waiters = [asyncio.create_task(w1.chat.acquire(nothing)) for _ in range(10)]
        await settle()
        assert services.granter.queue_depth == 10
        assert await asyncio.wait_for(w2.embed.acquire(nothing), 1.0) == 0
        assert await asyncio.wait_for(w2.embed.acquire(nothing), 1.0) == 1
        assert w2.embed.in_flight == [1, 1] and w2.chat.in_flight == [0, 0]
        for t in chat_waiters:
            t.cancel()
        await asyncio.gather(*chat_waiters, return_exceptions=True)

    asyncio.run(main())


def test_each_class_has_its_own_capacity_per_backend() -> None:
    async def main() -> None:
        services, _, (w1, _) = setup(config(chat=(1, 2), embed=(3, 1)))
        embed = [await w1.embed.acquire(nothing) for _ in range(4)]
        chat = [await w1.chat.acquire(nothing) for _ in range(3)]
        assert sorted(embed) == [0, 0, 0, 1] and sorted(chat) == [0, 1, 1]
        stats = services.embed_granter.statistics()
        assert [(b.max_parallel, b.in_flight) for b in stats.backends] == [(3, 3), (1, 1)]
        stats = services.granter.statistics()
        assert [(b.max_parallel, b.in_flight) for b in stats.backends] == [(1, 1), (2, 2)]
        # Both full now: each class queues on its own.
        e, c = (asyncio.create_task(s.acquire(nothing)) for s in (w1.embed, w1.chat))
        await settle()
        assert services.embed_granter.queue_depth == services.granter.queue_depth == 1
        w1.embed.release(1)
        assert await asyncio.wait_for(e, 1.0) == 1 and not c.done()
        c.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await c

    asyncio.run(main())


def test_each_class_has_its_own_queue_bound() -> None:
    """max_queue bounds each queue: a full embed queue answers busy to embeddings only."""

    async def main() -> None:
        services, _, (w1, w2) = setup(config(chat=(1, 1), embed=(1, 1), max_queue=2))
        for s in (w1.embed, w1.embed, w1.chat, w1.chat):
            await s.acquire(nothing)
        embed_waiters = [asyncio.create_task(w1.embed.acquire(nothing)) for _ in range(2)]
        await settle()
        with pytest.raises(QueueFull):
            await w2.embed.acquire(nothing)
        chat_waiter = asyncio.create_task(w2.chat.acquire(nothing))  # its queue has room
        await settle()
        assert not chat_waiter.done() and services.granter.queue_depth == 1
        assert services.embed_granter.statistics().refused_busy_total == 1
        assert services.granter.statistics().refused_busy_total == 0
        for t in (*embed_waiters, chat_waiter):
            t.cancel()
        await asyncio.gather(*embed_waiters, chat_waiter, return_exceptions=True)

    asyncio.run(main())


def test_per_key_bounds_apply_to_each_class() -> None:
    """max_in_flight_per_key counts per class: a client's embeddings do not use up its chat."""

    async def main() -> None:
        services, _, (w1, _) = setup(config(chat=(2, 2), embed=(2, 2), max_in_flight_per_key=1))
        await w1.embed.acquire(nothing, key="k")
        second = asyncio.create_task(w1.embed.acquire(nothing, key="k"))
        await settle()
        assert not second.done()  # the key holds its one embed slot
        assert await asyncio.wait_for(w1.chat.acquire(nothing, key="k"), 1.0) in (0, 1)
        assert services.embed_granter.key_in_flight("k") == 1
        assert services.granter.key_in_flight("k") == 1
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second

    asyncio.run(main())


def test_a_reload_changes_max_parallel_embed() -> None:
    """configure() reconfigures both classes: a higher max_parallel_embed grants the embed
    waiters at once; chat keeps its own figures."""

    async def main() -> None:
        services, _, (w1, _) = setup(config(chat=(1, 1), embed=(1, 1)))
        await w1.embed.acquire(nothing, frozenset({1}))
        waiting = asyncio.create_task(w1.embed.acquire(nothing, frozenset({1})))
        await settle()
        assert not waiting.done()
        services.configure(config(chat=(1, 1), embed=(2, 5)))
        assert await asyncio.wait_for(waiting, 1.0) == 0
        embed = services.embed_granter.statistics().backends
        assert [b.max_parallel for b in embed] == [2, 5]
        assert [b.max_parallel for b in services.granter.statistics().backends] == [1, 1]
        services.configure(config(chat=(3, 4), embed=(2, 5)))
        assert [b.max_parallel for b in services.granter.statistics().backends] == [3, 4]

    asyncio.run(main())


def test_a_dead_worker_gives_back_its_slots_and_waiters_of_both_classes() -> None:
    async def main() -> None:
        services, workers, (w1, w2) = setup(config(chat=(1, 1), embed=(1, 1)))
        for s in (w1.chat, w1.chat, w1.embed, w1.embed):
            await s.acquire(nothing)
        orphans = [asyncio.create_task(s.acquire(nothing)) for s in (w1.chat, w1.embed)]
        chat = asyncio.create_task(w2.chat.acquire(nothing))
        embed = asyncio.create_task(w2.embed.acquire(nothing))
        await settle()
        assert services.granter.queue_depth == services.embed_granter.queue_depth == 2
        workers.exit(workers.by_pid[w1.pid])
        assert await asyncio.wait_for(chat, 1.0) == 0
        assert await asyncio.wait_for(embed, 1.0) == 0
        for kind in (CHAT, EMBED):
            assert services.granters[kind].held(w1.pid) == {}
            assert services.granters[kind].queue_depth == 0
            assert in_flight(services, kind) == [1, 0]
        for t in orphans:
            t.cancel()

    asyncio.run(main())


def test_health_is_sent_once_and_applies_to_both_classes() -> None:
    async def main() -> None:
        services, workers, (w1, w2) = setup(config(chat=(1, 1), embed=(1, 1)))
        await w2.embed.acquire(nothing, frozenset({1}))
        stranded = asyncio.create_task(w2.embed.acquire(nothing, frozenset({1})))
        await settle()
        for s in (w1.chat, w1.embed):  # what the worker's health loop does
            s.set_healthy(0, False)
        health = [m for m in workers.received if m[proto.T] == proto.HEALTH]
        assert health == [{proto.T: proto.HEALTH, "backend": 0, "healthy": False}]
        assert w1.embed.healthy == [False, True]  # the embed instance records the view
        for kind in (CHAT, EMBED):
            assert services.granters[kind].statistics().backends[0].healthy is False
        with pytest.raises(UpstreamUnavailable):  # the embed waiter's only backend went down
            await asyncio.wait_for(stranded, 1.0)
        with pytest.raises(UpstreamUnavailable):
            await w1.embed.acquire(nothing, frozenset({1}))
        with pytest.raises(UpstreamUnavailable):
            await w1.chat.acquire(nothing, frozenset({1}))
        w1.chat.set_healthy(0, True)
        assert services.embed_granter.statistics().backends[0].healthy is True
        assert await w1.embed.acquire(nothing, frozenset({0})) == 1

    asyncio.run(main())


def test_positions_and_recalls_reach_their_own_class() -> None:
    """A waiter's queued{position} updates come back to its class; a chat waiter recalls chat
    leases only (an embed lease is kept), and the other way round."""

    async def main() -> None:
        services, workers, (w1, w2) = setup(config(chat=(1, 1), embed=(1, 1)))
        # Both classes leased by worker 1, then given back to its leases (kept, unused).
        for s in (w1.chat, w1.embed):
            s.release(await s.acquire(nothing))
        assert w1.chat.leasing and w1.embed.leasing
        assert sum(w1.chat.held) == sum(w1.embed.held) == 1
        # Worker 2 fills chat and has to wait: worker 1's chat leases are recalled, not embed.
        await w2.chat.acquire(nothing)
        assert await w2.chat.acquire(nothing) in (0, 1)
        positions: list[int] = []
        waiting = asyncio.create_task(w2.chat.acquire(positions.append))
        await settle()
        assert positions == [1]
        recalls = [m for m in workers.sent if m[proto.T] == proto.SLOT_RECALL]
        assert recalls and all(m == {proto.T: proto.SLOT_RECALL} for m in recalls)  # chat
        assert not w1.chat.leasing and sum(w1.chat.held) == 0
        assert w1.embed.leasing and sum(w1.embed.held) == 1
        # Embed: worker 2's waiter recalls worker 1's embed lease, and is granted it.
        embed_positions: list[int] = []
        await w2.embed.acquire(embed_positions.append)
        got = asyncio.create_task(w2.embed.acquire(embed_positions.append))
        await settle()
        assert await asyncio.wait_for(got, 1.0) in (0, 1)
        assert {proto.T: proto.SLOT_RECALL, "class": "embed"} in workers.sent
        assert sum(w1.embed.held) == 0
        # Position updates (the master's tick) reach the embed waiter, named by class.
        late = [asyncio.create_task(w1.embed.acquire(embed_positions.append)) for _ in range(2)]
        await settle()
        late[0].cancel()
        await settle()
        services.tick(1e9)
        assert embed_positions[-1] == 1 and positions == [1]
        assert not waiting.done()
        for t in (waiting, *late):
            t.cancel()
        await asyncio.gather(waiting, *late, return_exceptions=True)

    asyncio.run(main())


def test_a_message_of_an_unknown_class_is_dropped() -> None:
    services, workers, _ = setup(config())
    w = workers.by_pid[100]
    bogus = {proto.T: proto.SLOT_ACQUIRE, "rid": 1, "exclude": [], "class": "bogus"}
    workers.deliver(w, bogus)
    workers.deliver(w, {proto.T: proto.SLOT_RELEASE, "backend": 0, "class": 3})
    workers.deliver(w, {proto.T: proto.SLOT_CANCEL, "rid": 1, "class": None})
    assert workers.sent == []  # no answer: nothing granted, queued or refused
    for kind in (CHAT, EMBED):
        stats = services.granters[kind].statistics()
        assert stats.granted_total == stats.queued_total == 0


# -- the wire: chat messages are byte for byte those of a chatd without classes ---------------

# msgpack of {"t": "slot_acquire", "rid": 1, "exclude": []}, as every chatd before classes sent.
CHAT_ACQUIRE = bytes.fromhex("0000001e83a174ac736c6f745f61637175697265a372696401a76578636c75646590")


def test_chat_messages_carry_no_class_and_are_unchanged_byte_for_byte() -> None:
    async def main() -> None:
        services, workers, (w1, w2) = setup(config(chat=(1, 1), embed=(1, 1)))
        sent: list[bytes] = []
        real = w1.chat._send
        w1.chat._send = lambda m: sent.append(proto.encode(m)) or real(m)
        await w1.chat.acquire(nothing)
        assert sent == [CHAT_ACQUIRE]
        await w1.chat.acquire(nothing, key="k")
        waiting = asyncio.create_task(w1.chat.acquire(nothing, frozenset({1}), key="k"))
        await settle()
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        w1.chat.release(0)  # leased: kept, then recalled
        w1.chat.set_healthy(1, True)
        # Every chat message, both ways, is exactly the pre-class one (no "class" field).
        chat_kinds = set(MasterSlots.MESSAGES) | {
            proto.SLOT_ACQUIRE,
            proto.SLOT_RELEASE,
            proto.SLOT_CANCEL,
            proto.HEALTH,
        }
        seen = {m[proto.T] for m in workers.sent + workers.received}
        assert seen >= chat_kinds - {proto.SLOT_REFUSED}
        assert all(proto.SLOT_CLASS not in m for m in workers.sent + workers.received)
        assert sent[1] == proto.encode(
            {proto.T: proto.SLOT_ACQUIRE, "rid": 2, "exclude": [], "key": "k"}
        )
        # The same exchanges in the embed class: every slot message names it, both ways.
        workers.sent.clear()
        workers.received.clear()
        await asyncio.wait_for(w2.embed.acquire(nothing), 1.0)
        await asyncio.wait_for(w2.embed.acquire(nothing), 1.0)
        waiting = asyncio.create_task(w2.embed.acquire(nothing, key="k"))
        await settle()
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        w2.embed.release(0)
        w2.embed.set_healthy(0, False)  # records only: health is the chat instance's to send
        assert not [m for m in workers.received if m[proto.T] == proto.HEALTH]
        w2.chat.set_healthy(0, False)
        w2.chat.set_healthy(1, False)
        with pytest.raises(UpstreamUnavailable):
            await w2.embed.acquire(nothing)  # refused by the master: both backends are down
        assert services.embed_granter.statistics().refused_unavailable_total == 1
        slot_msgs = [m for m in workers.sent + workers.received if m[proto.T] != proto.HEALTH]
        assert {m[proto.T] for m in slot_msgs} == {
            proto.SLOT_ACQUIRE,
            proto.SLOT_GRANT,
            proto.SLOT_QUEUED,
            proto.SLOT_RECALL,
            proto.SLOT_CANCEL,
            proto.SLOT_RELEASE,
            proto.SLOT_REFUSED,
        }
        assert all(m[proto.SLOT_CLASS] == EMBED for m in slot_msgs)
        assert proto.encode(workers.received[0]) == proto.encode(
            {proto.T: proto.SLOT_ACQUIRE, "rid": 1, "exclude": [], proto.SLOT_CLASS: EMBED}
        )

    asyncio.run(main())
