"""Live handoff pieces in one process: the outbox (dedupe of stored events, one write per
tick, token coalescing, the slow path under flow control), and the master's
routing of ``watch`` / ``unwatch`` / ``stored`` (chatd.master.services.Services)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest

from chatd.master.services import Services
from chatd.proto import control as proto
from chatd.worker.outbox import OutboundBudget, Outbox
from tests.unit.master.test_services_slots import FakeWorker, FakeWorkers, config


class Sink:
    """A FrameSink that records what reached the "socket": each write() call is one batch."""

    def __init__(self, writable: bool = True) -> None:
        self.frames: list[bytes] = []
        self.batches: list[list[bytes]] = []
        self.open = writable
        self.sent_slowly: list[bytes] = []
        self.gate: asyncio.Event | None = None
        self.in_buffer = 0  # what buffered() reports: bytes the "peer" has not taken

    def writable(self) -> bool:
        return self.open

    def write(self, frames: Sequence[bytes]) -> None:
        assert self.open, "write() while not writable"
        self.batches.append(list(frames))
        self.frames.extend(frames)

    async def send(self, frame: bytes) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.sent_slowly.append(frame)
        self.frames.append(frame)

    def buffered(self) -> int:
        return self.in_buffer


def written(outbox: Outbox, sink: Sink, fill: Callable[[], None]) -> list[bytes]:
    async def main() -> None:
        fill()
        await outbox.wait_empty()

    asyncio.run(main())
    return sink.frames


def test_stored_events_reach_a_connection_once_in_any_order() -> None:
    sink = Sink()
    outbox = Outbox(sink)

    def fill() -> None:
        outbox.put(b"live-6", 6)  # a local reply published before ...
        outbox.put(b"fwd-5", 5)  # ... a forwarded one stored earlier by another worker
        outbox.put(b"fwd-6", 6)  # the forward reads 6 again: dropped
        outbox.put(b"ack", 0)  # frames without a seq are never deduplicated
        outbox.put(b"ack", 0)
        outbox.advance(6)
        outbox.put(b"again-5", 5)
        outbox.put(b"next-7", 7)

    assert written(outbox, sink, fill) == [b"live-6", b"fwd-5", b"ack", b"ack", b"next-7"]
    assert outbox.floor == 7  # 7 sent right above the floor: it rises
    assert len(sink.batches) == 1  # one tick, one write


def test_replay_floor_drops_held_events_already_replayed() -> None:
    sink = Sink()
    outbox = Outbox(sink)

    def fill() -> None:
        outbox.hold()
        assert outbox.holding
        outbox.put(b"held-3", 3)
        outbox.put(b"held-5", 5)
        outbox.put(b"held-5-twice", 5)
        outbox.release(4, [b"welcome", b"replay-3"])
        assert not outbox.holding and outbox.floor == 5  # 4 replayed, then 5 sent
        outbox.release(0)  # a failed hello releases with 0: the floor never goes down
        assert outbox.floor == 5

    assert written(outbox, sink, fill) == [b"welcome", b"replay-3", b"held-5"]


def test_tokens_of_one_tick_become_one_frame_and_a_reply_replaces_them() -> None:
    sink = Sink()
    outbox = Outbox(sink)

    async def main() -> None:
        outbox.put(b"ack-m1")
        outbox.token("m1", "Hel")
        outbox.token("m1", "lo")
        await outbox.wait_empty()
        outbox.token("m1", " wor")
        outbox.token("m1", "ld")
        outbox.put(b"reply-m1", 9, reply_to="m1")  # carries the whole text: tokens dropped
        outbox.token("m2", "x")
        await outbox.wait_empty()

    asyncio.run(main())
    assert [orjson.loads(f) if f.startswith(b"{") else f for f in sink.frames] == [
        b"ack-m1",
        {"type": "token", "id": "m1", "text": "Hello"},
        b"reply-m1",
        {"type": "token", "id": "m2", "text": "x"},
    ]
    assert len(sink.batches) == 2


def test_a_slow_client_is_written_in_order_through_flow_control() -> None:
    """Not writable (the transport's buffer is full): a writer task sends frame by frame,
    waiting; frames queued meanwhile follow in order; once writable, the rest goes at once."""
    sink = Sink(writable=False)
    outbox = Outbox(sink)

    async def main() -> None:
        sink.gate = asyncio.Event()
        outbox.put(b"1")
        outbox.put(b"2")
        await asyncio.sleep(0.01)
        assert sink.frames == []  # waiting for flow control
        outbox.put(b"3")
        outbox.token("m", "t")
        sink.gate.set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        sink.open = True  # the buffer drained: what is left goes in one write
        await asyncio.wait_for(outbox.wait_empty(), 5)
        outbox.put(b"4")
        await outbox.wait_empty()

    asyncio.run(main())
    assert sink.frames[:3] == [b"1", b"2", b"3"]
    assert orjson.loads(sink.frames[3]) == {"type": "token", "id": "m", "text": "t"}
    assert sink.frames[4:] == [b"4"]
    assert sink.sent_slowly[:2] == [b"1", b"2"]
    assert sink.batches[-1] == [b"4"]  # back on the fast path


def test_close_drops_the_queue_and_wakes_waiters() -> None:
    sink = Sink(writable=False)
    outbox = Outbox(sink)

    async def main() -> None:
        sink.gate = asyncio.Event()  # never set: the writer task stays blocked
        outbox.put(b"1")
        outbox.put(b"2")
        waiter = asyncio.create_task(outbox.wait_empty())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        outbox.close()
        await asyncio.wait_for(waiter, 5)
        outbox.put(b"3")  # after close: ignored
        outbox.token("m", "t")
        await asyncio.sleep(0.01)

    asyncio.run(main())
    assert sink.frames == []


def test_a_failing_write_closes_the_outbox() -> None:
    class Broken(Sink):
        def write(self, frames: Sequence[bytes]) -> None:
            raise ConnectionResetError("gone")

    sink = Broken()
    outbox = Outbox(sink)

    async def main() -> None:
        outbox.put(b"1")
        await asyncio.wait_for(outbox.wait_empty(), 5)

    asyncio.run(main())
    assert outbox.closed


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


def test_a_reader_that_stops_reading_is_cut_off_at_its_bound() -> None:
    """Queued frames of a slow reader count against its bound (the transport's buffer too):
    past it the outbox drops its queue, closes, and reports the unread bytes once."""
    budget = OutboundBudget(per_connection=10_000, per_worker=1_000_000)
    sink = Sink(writable=False)
    sink.gate = asyncio.Event()  # the peer reads nothing
    sink.in_buffer = 3_000
    overflows: list[int] = []
    outbox = Outbox(sink, budget, lambda unread, _total: overflows.append(unread))

    async def main() -> None:
        for i in range(100):
            outbox.put(b"x" * 500, i + 1)
            await asyncio.sleep(0)
        assert outbox.closed
        assert len(overflows) == 1 and 10_000 < overflows[0] <= 10_500
        assert budget.total == 0 and budget.overflows == 1 and outbox.queued_bytes == 0
        outbox.put(b"after", 999)  # a closed outbox takes nothing
        assert budget.total == 0

    asyncio.run(main())
    # What got into the "socket" before the cut: the first frame the writer task waits on.
    assert sink.sent_slowly == []


def test_all_slow_readers_together_are_bounded_per_worker() -> None:
    budget = OutboundBudget(per_connection=1_000_000, per_worker=8_000)
    overflows: list[int] = []
    sinks = [Sink(writable=False) for _ in range(3)]
    outboxes = [Outbox(s, budget, lambda _unread, total: overflows.append(total)) for s in sinks]
    for s in sinks:
        s.gate = asyncio.Event()

    async def main() -> None:
        for _ in range(5):
            for o in outboxes:
                o.put(b"y" * 1_000)
                await asyncio.sleep(0)
        assert sum(o.closed for o in outboxes) >= 1
        assert overflows and all(8_000 < total <= 9_000 for total in overflows)
        assert budget.total <= 8_000 + 1_000
        for o in outboxes:
            o.close()
        assert budget.total == 0

    asyncio.run(main())
    assert budget.overflows == len(overflows) >= 1


def test_a_fast_reader_is_never_cut_off_whatever_it_receives() -> None:
    budget = OutboundBudget(per_connection=1_000, per_worker=1_000)
    sink = Sink()
    outbox = Outbox(sink, budget, lambda unread, _: pytest.fail(f"cut off at {unread}"))

    def fill() -> None:
        for i in range(50):
            outbox.put(b"z" * 400, i + 1)
            outbox.token("m", "t" * 300)

    frames = written(outbox, sink, fill)
    assert len(frames) == 100 and not outbox.closed and budget.total == 0


def test_one_large_batch_the_client_does_not_read_is_over_the_bound() -> None:
    """A long replay goes to the socket's buffer in one write (the fast path): a client that
    then reads nothing is cut off there, with nothing more queued for it."""
    budget = OutboundBudget(per_connection=10_000, per_worker=1_000_000)
    sink = Sink()
    overflows: list[int] = []
    outbox = Outbox(sink, budget, lambda unread, _total: overflows.append(unread))

    async def main() -> None:
        outbox.hold()
        sink.in_buffer = 50_000  # what the transport holds after the write
        outbox.release(40, [b"r" * 1000] * 40)
        await outbox.wait_empty()

    asyncio.run(main())
    assert outbox.closed and overflows == [50_000]


def test_a_failed_resume_drops_the_frames_it_held() -> None:
    sink = Sink()
    outbox = Outbox(sink)

    def fill() -> None:
        outbox.hold()
        outbox.put(b"live-7", 7)
        outbox.token("m", "tok")
        outbox.discard_held()
        assert not outbox.holding
        outbox.put(b"error", 0)

    assert written(outbox, sink, fill) == [b"error"]
    assert outbox.floor == 0


def test_what_was_sent_travels_compactly_and_is_not_sent_twice() -> None:
    """A moving connection carries what it was sent (chatd.proto.adoption): the floor follows
    a connection alone on its session (acks noted too), the gaps (events of another
    connection) are remembered above it, at most ``limit`` of them; the adopting outbox drops
    what the old one sent."""
    sink = Sink()
    old = Outbox(sink)

    def fill() -> None:
        old.put(b"ack-1", 1)
        old.put(b"reply-2", 2)
        old.put(b"reply-4", 4)  # 3 went to another connection of the session
        old.put(b"reply-6", 6)
        old.put(b"ack-7", 7)

    written(old, sink, fill)
    assert old.floor == 2
    assert old.sent_state(10) == (2, (4, 6, 7))
    assert old.sent_state(2) == (4, (6, 7))  # the oldest gap given up, as past MAX_SENT
    new_sink = Sink()
    new = Outbox(new_sink)

    def replay() -> None:
        new.restore(*old.sent_state(10))
        assert new.floor == 2
        new.put(b"replay-3", 3)
        new.put(b"replay-4", 4)  # sent by the old worker already: dropped
        new.put(b"replay-8", 8)

    assert written(new, new_sink, replay) == [b"replay-3", b"replay-8"]
    assert new.floor == 4 and new.sent_state(10) == (4, (6, 7, 8))
    compact = Outbox(Sink())
    compact.restore(2, (3, 5))  # the floor rises over what was sent right above it
    assert compact.sent_state(10) == (3, (5,))
    compact.advance(4)
    assert compact.sent_state(10) == (5, ())


def test_an_outbox_is_idle_once_written_and_flush_writes_at_once() -> None:
    async def main() -> None:
        sink = Sink()
        outbox = Outbox(sink)
        assert outbox.idle
        outbox.put(b"reply")
        assert not outbox.idle  # queued, its write due at the end of the tick
        outbox.flush()  # a connection about to move: written now
        assert sink.frames == [b"reply"] and outbox.idle
        outbox.hold()
        assert not outbox.idle
        outbox.put(b"held")
        outbox.flush()  # held frames wait for release
        assert sink.frames == [b"reply"]

    asyncio.run(main())


def test_a_connection_gets_stored_events_in_seq_order_with_the_gaps_filled_from_the_log() -> None:
    """An event whose predecessor has not reached the client (stored by another worker, whose
    forward is late) waits, with everything after it, while the log is read (``on_gap``); the
    log's events then go out in order, and what was held without those already sent."""
    sink = Sink()
    gaps: list[int] = []
    outbox = Outbox(sink, on_gap=gaps.append)

    async def main() -> None:
        outbox.put(b"ack-1", 1)
        outbox.put(b"reply-2", 2)
        outbox.put(b"ack-4", 4)  # 3 (another worker's reply) has not come: held
        outbox.token("m4", "tok")  # held behind it, in order
        outbox.put(b"fwd-3", 3)  # the late forward: held too
        assert gaps == [2] and outbox.holding
        outbox.release(4, [b"log-3", b"log-4"])  # what the log read found after seq 2
        outbox.put(b"reply-5", 5)
        outbox.put(b"reply-7", 7)  # a gap again
        assert gaps == [2, 5]
        outbox.release(5, [], gaps=False)  # the log could not be read: it goes out as it is
        await outbox.wait_empty()

    asyncio.run(main())
    assert [f for f in sink.frames if not f.startswith(b'{"type":"token"')] == [
        b"ack-1",
        b"reply-2",
        b"log-3",
        b"log-4",
        b"reply-5",
        b"reply-7",
    ]
    assert sink.frames[4].startswith(b'{"type":"token"')  # after the ack it followed
    assert outbox.floor == 5 and outbox.was_sent(7) and not outbox.was_sent(6)
