"""The slot protocol end to end in one process: MasterSlots (worker) <-> Services (master).

The link is replaced by direct calls through the real msgpack codec, so the messages are the
ones the wire carries; the master side gets a stand-in for its Workers table.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from chatd.config import BackendConfig, Config, LLMConfig
from chatd.errors import UpstreamUnavailable
from chatd.master.services import Services
from chatd.proto import control as proto
from chatd.worker import slots as slots_module
from chatd.worker.slots import MasterSlots, QueueFull

URLS = ("http://a:1", "http://b:2")


def config(max_parallel: tuple[int, ...] = (1, 1), max_queue: int = 4) -> Config:
    backends = tuple(
        BackendConfig(url=u, max_parallel=n) for u, n in zip(URLS, max_parallel, strict=True)
    )
    return Config(llm=LLMConfig(backends=backends, max_queue=max_queue))


def wire(msg: Mapping[str, Any]) -> dict[str, Any]:
    """What the peer decodes of ``msg``."""
    (decoded,) = proto.Decoder().feed(proto.encode(msg))
    return decoded


@dataclass(eq=False)
class FakeWorker:
    slot: int
    pid: int
    cfg: Config
    generation: int = 1
    state: str = "ready"
    stats: dict[str, Any] = field(default_factory=dict)
    rss: int = 0  # sampled by the master (psutil), read by the metrics answer
    inbox: Callable[[dict[str, Any]], None] = lambda msg: None


class FakeWorkers:
    """The part of chatd.master.workers.Workers that Services uses."""

    def __init__(self) -> None:
        self.generation = 1
        self.handlers: dict[str, Callable[[Any, dict[str, Any]], None]] = {}
        self.on_exit: list[Callable[[Any], None]] = []
        self.on_spawn: list[Callable[[Any], None]] = []
        self.by_pid: dict[int, FakeWorker] = {}
        self.restarts_total = 0
        self.sent: list[dict[str, Any]] = []  # master -> workers
        self.received: list[dict[str, Any]] = []  # workers -> master

    def tell(self, worker: FakeWorker, msg: dict[str, Any]) -> bool:
        self.sent.append(msg)
        worker.inbox(wire(msg))
        return True

    def deliver(self, worker: FakeWorker, msg: Mapping[str, Any]) -> bool:
        """The worker's link: a message from ``worker`` reaches the master's handler."""
        decoded = wire(msg)
        self.received.append(decoded)
        self.handlers[decoded[proto.T]](worker, decoded)
        return True

    def exit(self, worker: FakeWorker) -> None:
        del self.by_pid[worker.pid]
        for hook in self.on_exit:
            hook(worker)


def setup(cfg: Config, n: int = 2) -> tuple[Services, FakeWorkers, list[MasterSlots]]:
    workers = FakeWorkers()
    services = Services(cfg, workers)  # type: ignore[arg-type]
    slots = []
    for i in range(n):
        w = FakeWorker(slot=i + 1, pid=100 + i, cfg=cfg)
        s = MasterSlots(cfg.llm.backends, lambda msg, w=w: workers.deliver(w, msg))
        w.inbox = s.on_message
        workers.by_pid[w.pid] = w
        slots.append(s)
    return services, workers, slots


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_grants_across_workers_never_exceed_the_cap() -> None:
    async def main() -> None:
        services, _workers, (s1, s2) = setup(config((1, 1)))
        assert await s1.acquire(lambda p: None) == 0
        assert await s2.acquire(lambda p: None) == 1  # least loaded: the other backend
        positions: list[int] = []
        waiting = asyncio.create_task(s1.acquire(positions.append))
        await asyncio.sleep(0)
        assert positions == [1] and not waiting.done()
        assert services.granter.statistics().queue_depth == 1
        s2.release(1)
        assert await waiting == 1
        assert s1.in_flight == [1, 1] and s2.in_flight == [0, 0]
        assert [b.in_flight for b in services.granter.statistics().backends] == [1, 1]

    run(main())


def test_exclude_is_honoured() -> None:
    async def main() -> None:
        _, _, (s1, _) = setup(config((2, 2)))
        assert await s1.acquire(lambda p: None, frozenset({0})) == 1

    run(main())


def test_full_queue_is_busy_and_no_healthy_backend_is_unavailable() -> None:
    async def main() -> None:
        _, _, (s1, s2) = setup(config((1, 1), max_queue=0))
        await s1.acquire(lambda p: None)
        await s1.acquire(lambda p: None)
        with pytest.raises(QueueFull):
            await s2.acquire(lambda p: None)
        s2.set_healthy(0, False)
        s2.set_healthy(1, False)
        with pytest.raises(UpstreamUnavailable):
            await s2.acquire(lambda p: None)

    run(main())


def test_health_is_reported_on_change_only() -> None:
    services, workers, (s1, s2) = setup(config())
    s1.set_healthy(0, True)
    s1.set_healthy(0, True)
    s1.set_healthy(0, False)
    s2.set_healthy(0, True)  # the latest report wins
    assert workers.sent == []  # health needs no answer
    assert services.granter.statistics().backends[0].healthy is True
    assert s1.healthy == [False, True]


def test_cancelled_waiter_sends_cancel_and_a_racing_grant_is_given_back() -> None:
    async def main() -> None:
        services, _workers, (s1, s2) = setup(config((1, 1)))
        await s1.acquire(lambda p: None)
        await s1.acquire(lambda p: None)
        waiting = asyncio.create_task(s2.acquire(lambda p: None))
        await asyncio.sleep(0)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        assert services.granter.queue_depth == 0  # slot_cancel reached the master
        # A grant nobody waits for (it crossed the cancel on the wire) goes straight back.
        s2.on_message({proto.T: proto.SLOT_GRANT, "rid": 999, "backend": 0})
        assert s2.in_flight == [0, 0]
        assert s2.queue_depth == 0

    run(main())


def test_dead_worker_slots_are_taken_back_and_its_waiters_dropped() -> None:
    async def main() -> None:
        services, workers, (s1, s2) = setup(config((1, 1)))
        await s1.acquire(lambda p: None)
        await s1.acquire(lambda p: None)
        orphan = asyncio.create_task(s1.acquire(lambda p: None))  # its worker dies
        waiting = asyncio.create_task(s2.acquire(lambda p: None))
        await asyncio.sleep(0)
        assert services.granter.queue_depth == 2
        workers.by_pid[100].stats = {"messages_total": 7}
        workers.exit(workers.by_pid[100])
        assert await waiting == 0
        stats = services.granter.statistics()
        assert [b.in_flight for b in stats.backends] == [1, 0] and stats.queue_depth == 0
        assert services.retired.counters["messages_total"] == 7
        assert not orphan.done()  # no answer comes to a dead worker
        orphan.cancel()

    run(main())


def test_link_gone_fails_the_waiters() -> None:
    async def main() -> None:
        sent: list[Mapping[str, Any]] = []
        s = MasterSlots(config().llm.backends, lambda m: sent.append(m) or True)
        waiting = asyncio.create_task(s.acquire(lambda p: None))
        await asyncio.sleep(0)
        assert sent == [{proto.T: proto.SLOT_ACQUIRE, "rid": 1, "exclude": []}]
        s.link_gone()
        with pytest.raises(UpstreamUnavailable):
            await waiting
        down = MasterSlots(config().llm.backends, lambda m: False)
        with pytest.raises(UpstreamUnavailable):
            await down.acquire(lambda p: None)

    run(main())


def test_metrics_request_is_answered_with_the_aggregate() -> None:
    _services, workers, _ = setup(config())
    answers: list[dict[str, Any]] = []
    w = workers.by_pid[100]
    w.inbox = answers.append
    w.stats = {"messages_total": 3, "connections": 2, "errors_by_code": {"busy": 1}}
    workers.by_pid[101].stats = {"messages_total": 4, "connections": 1}
    workers.deliver(w, {proto.T: proto.METRICS_REQUEST, "rid": 5})
    (answer,) = answers
    assert answer[proto.T] == proto.METRICS and answer["rid"] == 5
    data = answer["data"]
    assert data["messages_total"] == 7 and data["connections"] == 3
    assert data["errors_by_code"] == {"busy": 1}
    assert [b["backend"] for b in data["backends"]] == list(URLS)


def kinds(msgs: list[dict[str, Any]]) -> list[str]:
    return [m[proto.T] for m in msgs]


def test_leased_slots_are_reused_without_a_round_trip() -> None:
    async def main() -> None:
        services, workers, (s1, _) = setup(config((2, 2)))
        b = await s1.acquire(lambda p: None)
        assert workers.sent[-1]["lease"] is True and s1.leasing
        s1.release(b)
        assert kinds(workers.received) == [proto.SLOT_ACQUIRE]  # kept, not released
        assert s1.held == [1, 0] and s1.in_flight == [0, 0]
        assert await s1.acquire(lambda p: None) == b  # from the lease: nothing sent
        assert kinds(workers.received) == [proto.SLOT_ACQUIRE]
        assert await s1.acquire(lambda p: None, frozenset({b})) == 1  # excluded: asks
        assert kinds(workers.received) == [proto.SLOT_ACQUIRE] * 2
        assert [x.in_flight for x in services.granter.statistics().backends] == [1, 1]

    run(main())


def test_a_waiter_recalls_the_leases_of_the_other_workers() -> None:
    async def main() -> None:
        services, workers, (s1, s2) = setup(config((1, 1)))
        a, b = await s1.acquire(lambda p: None), await s1.acquire(lambda p: None)
        s1.release(a)
        s1.release(b)  # both kept by worker 1, unused
        assert s1.held == [1, 1]
        # Worker 2 must wait: worker 1 is recalled, gives both back, worker 2 is served.
        assert await s2.acquire(lambda p: None) in (0, 1)
        assert not s1.leasing and s1.held == [0, 0]
        assert proto.SLOT_RECALL in kinds(workers.sent)
        assert sum(x.in_flight for x in services.granter.statistics().backends) == 1

    run(main())


def test_leases_unused_for_a_period_go_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slots_module, "LEASE_IDLE", 0.05)

    async def main() -> None:
        services, _, (s1, _) = setup(config((2, 2)))
        s1.release(await s1.acquire(lambda p: None))
        assert sum(s1.held) == 1
        await asyncio.sleep(0.2)  # two periods: kept unused through a whole one
        assert sum(s1.held) == 0
        assert all(x.in_flight == 0 for x in services.granter.statistics().backends)

    run(main())
