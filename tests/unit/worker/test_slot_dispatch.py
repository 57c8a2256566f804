"""The worker side of the slot classes: one MasterSlots per class, each naming its class on
what it sends, and the master's messages routed to the instance of their class (by
:func:`chatd.worker.slots.dispatch`, as chatd.worker.main.Worker does)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from chatd.config import BackendConfig, Config, LLMConfig, SessionsConfig
from chatd.proto import control as proto
from chatd.worker.slots import LocalSlots, MasterSlots, QueueFull, dispatch

BACKENDS = (
    BackendConfig(url="http://a:1", max_parallel=1, max_parallel_embed=3),
    BackendConfig(url="http://b:2", max_parallel=2, max_parallel_embed=1),
)
CHAT, EMBED = proto.SLOT_CLASS_CHAT, proto.SLOT_CLASS_EMBED


def pair() -> tuple[list[Mapping[str, Any]], MasterSlots, MasterSlots]:
    sent: list[Mapping[str, Any]] = []

    def send(msg: Mapping[str, Any]) -> bool:
        sent.append(dict(msg))
        return True

    return sent, MasterSlots(BACKENDS, send), MasterSlots(BACKENDS, send, EMBED)


def grant(rid: int, backend: int, kind: str = CHAT) -> dict[str, Any]:
    return proto.with_class({proto.T: proto.SLOT_GRANT, "rid": rid, "backend": backend}, kind)


def test_each_message_goes_to_the_instance_of_its_class() -> None:
    async def main() -> None:
        sent, chat, embed = pair()
        by_class = {CHAT: chat, EMBED: embed}
        c = asyncio.create_task(chat.acquire(lambda p: None))
        e = asyncio.create_task(embed.acquire(lambda p: None, key="k"))
        await asyncio.sleep(0)
        # Both asked for rid 1: each class has its own rids.
        assert sent == [
            {proto.T: proto.SLOT_ACQUIRE, "rid": 1, "exclude": []},
            {proto.T: proto.SLOT_ACQUIRE, "rid": 1, "exclude": [], "key": "k", "class": EMBED},
        ]
        assert dispatch(grant(1, 1, EMBED), by_class)
        assert await e == 1 and not c.done()
        assert embed.in_flight == [0, 1] and chat.in_flight == [0, 0]
        assert dispatch(grant(1, 0), by_class)  # no class: chat
        assert await c == 0 and chat.in_flight == [1, 0]
        # What goes back names the class too (chat: nothing).
        sent.clear()
        embed.release(1, "k")
        chat.release(0)
        assert sent == [
            {proto.T: proto.SLOT_RELEASE, "backend": 1, "key": "k", "class": EMBED},
            {proto.T: proto.SLOT_RELEASE, "backend": 0, "key": ""},
        ]

    asyncio.run(main())


def test_refusals_queue_positions_and_recalls_are_routed_by_class() -> None:
    async def main() -> None:
        _, chat, embed = pair()
        by_class = {CHAT: chat, EMBED: embed}
        positions: list[int] = []
        e = asyncio.create_task(embed.acquire(positions.append))
        c = asyncio.create_task(chat.acquire(lambda p: None))
        await asyncio.sleep(0)
        queued = {proto.T: proto.SLOT_QUEUED, "rid": 1, "position": 4}
        dispatch(proto.with_class(dict(queued), EMBED), by_class)
        assert positions == [4]
        refused = {proto.T: proto.SLOT_REFUSED, "rid": 1, "reason": "busy"}
        dispatch(proto.with_class(dict(refused), EMBED), by_class)
        with pytest.raises(QueueFull):
            await e
        assert not c.done()
        # A recall of the embed class ends the embed leases only.
        dispatch(grant(1, 0) | {"lease": True}, by_class)
        assert await c == 0 and chat.leasing
        embed.leasing = True
        dispatch({proto.T: proto.SLOT_RECALL, "class": EMBED}, by_class)
        assert chat.leasing and not embed.leasing

    asyncio.run(main())


def test_unknown_classes_and_misrouted_messages_are_dropped() -> None:
    sent, chat, embed = pair()
    by_class = {CHAT: chat, EMBED: embed}
    assert not dispatch(grant(1, 0) | {"class": "bogus"}, by_class)
    assert not dispatch(grant(1, 0, EMBED), {CHAT: chat})  # a worker without that class
    chat.on_message(grant(1, 0, EMBED))  # misrouted: not ours
    embed.on_message(grant(1, 0))
    assert chat.held == embed.held == [0, 0] and sent == []
    with pytest.raises(ValueError, match="unknown slot class"):
        MasterSlots(BACKENDS, lambda m: True, "bogus")


def test_only_the_chat_instance_reports_health() -> None:
    """The master applies a health report to every class: the embed instance records its
    view (for its own use) and sends nothing."""
    sent, chat, embed = pair()
    embed.set_healthy(0, False)
    assert sent == [] and embed.healthy == [False, True]
    chat.set_healthy(0, False)
    assert sent == [{proto.T: proto.HEALTH, "backend": 0, "healthy": False}]


def test_capacity_is_the_classes_own() -> None:
    """Each instance weighs backends by its class's slots (leases: the least busy kept slot);
    LocalSlots, instantiated once per class, caps by them."""
    _, chat, embed = pair()
    assert chat.capacity == [1, 2] and embed.capacity == [3, 1]

    async def main() -> None:
        local = LocalSlots(BACKENDS, max_queue=0, kind=EMBED)
        got = [await local.acquire(lambda p: None) for _ in range(4)]
        assert sorted(got) == [0, 0, 0, 1]
        with pytest.raises(QueueFull):
            await local.acquire(lambda p: None)
        chat_local = LocalSlots(BACKENDS, max_queue=0)
        assert sorted([await chat_local.acquire(lambda p: None) for _ in range(3)]) == [0, 1, 1]

    asyncio.run(main())


def test_the_worker_builds_both_classes_and_routes_the_masters_messages(tmp_path: Path) -> None:
    """chatd.worker.main.Worker: ``embed_slots`` beside ``slots``, each master message to the
    instance of its class, both failed when the master goes, both in the stats report."""
    from chatd.spec import WorkerSpec
    from chatd.worker.main import Worker

    cfg = Config(
        llm=LLMConfig(backends=BACKENDS),
        sessions=SessionsConfig(store=f"sqlite:///{tmp_path}/sessions.db"),
    )
    link, master_end = socket.socketpair()
    listener = socket.socket()

    async def main() -> None:
        worker = Worker(WorkerSpec(cfg, 1, 1, listener, link))
        assert worker.embed_slots.kind == EMBED and worker.slots.kind == CHAT
        sent: list[Mapping[str, Any]] = []
        for s in (worker.slots, worker.embed_slots):
            s._send = lambda m: sent.append(m) is None
        e = asyncio.create_task(worker.embed_slots.acquire(lambda p: None))
        c = asyncio.create_task(worker.slots.acquire(lambda p: None))
        await asyncio.sleep(0)
        assert [m.get("class") for m in sent] == [EMBED, None]
        worker._on_command(grant(1, 0, EMBED))
        assert await e == 0 and not c.done()
        report = worker.statistics()
        assert report["embed_backends"][0] == {"url": "http://a:1", "in_flight": 1, "held": 1}
        assert report["backends"][0]["in_flight"] == 0 and report["embed_queue_depth"] == 0
        assert report["queue_depth"] == 1
        worker._on_master_gone()
        with pytest.raises(Exception, match="lost its master"):
            await c

    try:
        asyncio.run(main())
    finally:
        for s in (link, master_end, listener):
            s.close()
