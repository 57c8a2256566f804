"""Live handoff pieces in one process: the outbox's dedupe of stored events, and the master's
routing of ``watch`` / ``unwatch`` / ``stored`` (chatd.services.Services)."""

from __future__ import annotations

import asyncio
from typing import Any

from chatd.outbox import Outbox
from chatd.proto import control as proto
from chatd.services import Services
from tests.unit.test_master_slots import FakeWorker, FakeWorkers, config


class Sink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    async def send(self, message: bytes, *, text: bool | None = None) -> None:
        self.frames.append(message)


def written(outbox: Outbox, sink: Sink) -> list[bytes]:
    async def main() -> None:
        task = asyncio.create_task(outbox.run())
        await asyncio.sleep(0)
        await outbox.wait_empty()
        task.cancel()

    asyncio.run(main())
    return sink.frames


def test_stored_events_reach_a_connection_once_in_any_order() -> None:
    sink = Sink()
    outbox = Outbox(sink)
    outbox.put(b"live-6", 6)  # a local reply published before ...
    outbox.put(b"fwd-5", 5)  # ... a forwarded one stored earlier by another worker
    outbox.put(b"fwd-6", 6)  # the forward reads 6 again: dropped
    outbox.put(b"ack", 0)  # frames without a seq are never deduplicated
    outbox.put(b"ack", 0)
    outbox.advance(6)
    outbox.put(b"again-5", 5)
    outbox.put(b"next-7", 7)
    assert written(outbox, sink) == [b"live-6", b"fwd-5", b"ack", b"ack", b"next-7"]
    assert outbox.floor == 6


def test_replay_floor_drops_held_events_already_replayed() -> None:
    sink = Sink()
    outbox = Outbox(sink)
    outbox.hold()
    assert outbox.holding
    outbox.put(b"held-3", 3)
    outbox.put(b"held-5", 5)
    outbox.put(b"held-5-twice", 5)
    outbox.release(4, [b"welcome", b"replay-3"])
    assert not outbox.holding and outbox.floor == 4
    outbox.release(0)  # a failed hello releases with 0: the floor never goes down
    assert outbox.floor == 4
    assert written(outbox, sink) == [b"welcome", b"replay-3", b"held-5"]


def setup() -> tuple[Services, FakeWorkers, list[FakeWorker], list[list[dict[str, Any]]]]:
    cfg = config()
    workers = FakeWorkers()
    services = Services(cfg, workers)  # type: ignore[arg-type]
    inboxes: list[list[dict[str, Any]]] = []
    ws = []
    for i in range(3):
        inbox: list[dict[str, Any]] = []
        w = FakeWorker(slot=i + 1, pid=100 + i, cfg=cfg, inbox=inbox.append)
        workers.by_pid[w.pid] = w
        ws.append(w)
        inboxes.append(inbox)
    return services, workers, ws, inboxes


def test_stored_is_forwarded_to_the_watchers_only() -> None:
    services, workers, (a, b, c), (ia, ib, ic) = setup()
    workers.deliver(b, {proto.T: proto.WATCH, "rid": 7, "session": "s1"})
    assert ib == [{proto.T: proto.WATCHING, "rid": 7, "session": "s1"}]
    workers.deliver(c, {proto.T: proto.WATCH, "rid": 1, "session": "s2"})
    workers.deliver(a, {proto.T: proto.STORED, "session": "s1", "seq": 2})
    assert ib[-1] == {proto.T: proto.STORED, "session": "s1", "seq": 2}
    assert ia == [] and len(ic) == 1  # c watches another session
    workers.deliver(b, {proto.T: proto.STORED, "session": "s1", "seq": 3})
    assert len(ib) == 2  # not back to the worker that stored it
    workers.deliver(b, {proto.T: proto.UNWATCH, "session": "s1"})
    workers.deliver(a, {proto.T: proto.STORED, "session": "s1", "seq": 4})
    assert len(ib) == 2 and "s1" not in services.watchers


def test_the_watches_of_an_exited_worker_go_with_it() -> None:
    services, workers, (a, b, _c), (_ia, ib, _ic) = setup()
    workers.deliver(b, {proto.T: proto.WATCH, "rid": 1, "session": "s1"})
    workers.deliver(b, {proto.T: proto.WATCH, "rid": 2, "session": "s2"})
    workers.exit(b)
    assert services.watchers == {}
    workers.deliver(a, {proto.T: proto.STORED, "session": "s1", "seq": 2})
    assert len(ib) == 2  # the two watching answers, nothing forwarded
