"""Fast takeover, both ends in one process: the master's ``owner_gone`` orders
(``chatd.master.takeover``) and what a worker does with one (``chatd.worker.leases``).

The master side gets a stand-in for its Workers table; the messages go through the real
msgpack codec. The worker side gets a stand-in hub over a stand-in store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from chatd.errors import StoreError
from chatd.master import takeover
from chatd.master.takeover import MAX_WAITING, Takeover
from chatd.proto import control as proto
from chatd.worker import leases
from tests.unit.master.test_services_slots import wire


@dataclass(eq=False)
class FakeWorker:
    slot: int
    pid: int
    state: str = "ready"
    detached: bool = False
    linked: bool = True
    exit_code: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    inbox: list[dict[str, Any]] = field(default_factory=list)


class FakeWorkers:
    """The part of chatd.master.workers.Workers that Takeover uses."""

    def __init__(self) -> None:
        self.handlers: dict[str, Callable[[Any, dict[str, Any]], None]] = {}
        self.on_exit: list[Callable[[Any], None]] = []
        self.by_pid: dict[int, FakeWorker] = {}
        self.replacing = True

    def tell(self, worker: FakeWorker, msg: dict[str, Any]) -> bool:
        if worker.linked:
            worker.inbox.append(wire(msg))
        return worker.linked

    def start(self, slot: int, pid: int, connections: int = 0) -> FakeWorker:
        """A worker forked, ready, and naming its store's owner (``o<pid>``)."""
        w = self.by_pid[pid] = FakeWorker(slot, pid, stats={"connections": connections})
        msg = wire({proto.T: proto.OWNER, "owner": f"o{pid}"})
        self.handlers[msg[proto.T]](w, msg)
        return w

    def exit(self, worker: FakeWorker, code: int) -> None:
        del self.by_pid[worker.pid]
        worker.exit_code = code
        for hook in self.on_exit:
            hook(worker)


def orders(w: FakeWorker) -> list[str]:
    return [m["owner"] for m in w.inbox if m[proto.T] == proto.OWNER_GONE]


def setup() -> FakeWorkers:
    workers = FakeWorkers()
    Takeover(workers)  # type: ignore[arg-type]
    return workers


def test_a_dead_worker_goes_to_the_least_loaded_ready_worker_once() -> None:
    workers = setup()
    a, b, c = workers.start(1, 10), workers.start(2, 11, 5), workers.start(3, 12, 1)
    workers.exit(a, -9)  # SIGKILL
    assert (orders(b), orders(c)) == ([], ["o10"])
    workers.exit(b, 1)  # a crash (exit 1)
    assert orders(c) == ["o10", "o11"]


def test_a_clean_exit_releases_nothing() -> None:
    """A drain (exit 0) handed its leases back itself."""
    workers = setup()
    a, b = workers.start(1, 10), workers.start(2, 11)
    workers.exit(a, 0)
    assert orders(b) == []


def test_draining_starting_or_unlinked_workers_are_not_told() -> None:
    workers = setup()
    a, b, c, d = (workers.start(i + 1, 10 + i) for i in range(4))
    b.state, c.detached, d.linked = "draining", True, False
    workers.by_pid[99] = FakeWorker(9, 99, state="ready")  # never named its owner: not ready
    workers.exit(a, -9)
    assert orders(b) == orders(c) == orders(d) == orders(workers.by_pid[99]) == []
    # The next worker ready gets it, as soon as it names its owner (a replacement).
    e = workers.start(5, 14)
    assert orders(e) == ["o10"]


def test_the_only_workers_death_goes_to_its_replacement_and_on_if_it_dies() -> None:
    workers = setup()
    workers.exit(workers.start(1, 10), -9)
    first = workers.start(1, 11)
    assert orders(first) == ["o10"]
    workers.exit(first, -11)  # maybe before it released o10: passed on
    new = workers.start(1, 12)
    assert orders(new) == ["o11", "o10"]
    other = workers.start(2, 13)
    workers.exit(new, 0)  # a drain may cut a release short: passed on, even from a clean exit
    assert orders(other) == ["o11", "o10"]


def test_orders_older_than_a_lease_are_not_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    workers = setup()
    first = workers.start(1, 10)
    workers.exit(workers.start(2, 11), -9)
    assert orders(first) == ["o11"]
    later = time.monotonic() + takeover.FORWARD_S
    monkeypatch.setattr(takeover.time, "monotonic", lambda: later)
    second = workers.start(2, 12)
    workers.exit(first, -9)  # o11's lease lapsed long ago: only first's own owner
    assert orders(second) == ["o10"]


def test_waiting_owners_are_bounded_and_nothing_is_released_while_stopping() -> None:
    workers = setup()
    dying = [workers.start(1, 1000 + n) for n in range(MAX_WAITING + 3)]
    for w in dying:
        w.state = "draining"  # none ready: each owner waits
    for w in dying:
        workers.exit(w, -9)
    new = workers.start(1, 1)
    assert orders(new) == [f"o{1000 + n}" for n in range(3, MAX_WAITING + 3)]  # oldest dropped
    other = workers.start(2, 2)
    workers.replacing = False  # the daemon stops: no one is left to generate them
    workers.exit(new, -9)
    assert orders(other) == []


def test_a_worker_without_an_owner_id_is_ignored() -> None:
    workers = setup()
    w = workers.by_pid[10] = FakeWorker(1, 10)
    workers.handlers[proto.OWNER](w, {proto.T: proto.OWNER})
    b = workers.start(2, 11)
    workers.exit(w, -9)
    assert orders(b) == []


# -- the worker's side ------------------------------------------------------------------------


@dataclass
class FakeStore:
    leased: int  # the dead owner's held leases
    fail: bool = False
    released: list[str] = field(default_factory=list)

    async def release(self, owner: str) -> int:
        if self.fail:
            raise StoreError("down")
        self.released.append(owner)
        n, self.leased = self.leased, 0
        return n


@dataclass
class FakeHub:
    store: FakeStore
    lapsed: int  # messages a claim may take (the released ones, and others)
    sweeping: bool = True
    batch: int = 32  # generation.SWEEP_LIMIT
    claims: int = 0

    async def take_over(self, session: str | None) -> int:
        assert session is None  # a sweep's claim: across sessions
        self.claims += 1
        n = min(self.batch, self.lapsed)
        self.lapsed -= n
        return n


def test_owner_gone_releases_then_claims_in_batches() -> None:
    hub = FakeHub(FakeStore(leased=70), lapsed=75)
    assert asyncio.run(leases.owner_gone(hub, "dead")) == (70, 75)  # 32 + 32 + 11
    assert hub.store.released == ["dead"] and hub.claims == 3


def test_owner_gone_when_others_claimed_first_or_draining_or_store_down() -> None:
    hub = FakeHub(FakeStore(leased=2), lapsed=0)  # a resume claimed them first
    assert asyncio.run(leases.owner_gone(hub, "dead")) == (2, 0)
    hub = FakeHub(FakeStore(leased=2), lapsed=2, sweeping=False)  # released for the others
    assert asyncio.run(leases.owner_gone(hub, "dead")) == (2, 0) and hub.claims == 0
    hub = FakeHub(FakeStore(leased=2, fail=True), lapsed=2)
    assert asyncio.run(leases.owner_gone(hub, "dead")) == (0, 0) and hub.claims == 0
