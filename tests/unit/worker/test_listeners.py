"""The live handoff's two paths in one process (chatd.worker.handoff.Listeners): the master
(within a host) and Redis notices (across hosts), with a fake store, master and notices and
real outboxes. Checked: a final stored with no client here is announced on both paths; a
watch registered by either path alone reads the log and delivers; neither path: not watched,
both undone; the last client leaving unwatches both; a notice that came by both paths is
read once and delivered once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import orjson

from chatd.proto import chat
from chatd.proto import control as proto
from chatd.store.base import Event, SessionInfo
from chatd.worker.handoff import Listeners
from chatd.worker.outbox import Outbox
from chatd.worker.session import _hello
from tests.unit.worker.test_handoff import Sink
from tests.unit.worker.test_session_closing import worker_state

S = "session-1"


class FakeStore:
    """The log of one session; counts its reads of it."""

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.reads = 0

    async def unanswered(self, session: str) -> list[Event]:
        answered = {e.msg_id for e in self.events if e.kind != "user"}
        return [e for e in self.events if e.kind == "user" and e.msg_id not in answered]

    async def events_after(self, session: str, after_seq: int) -> list[Event]:
        self.reads += 1
        return [e for e in self.events if e.seq > after_seq]


class FakeMaster:
    def __init__(self, answers: bool = True) -> None:
        self.sent: list[Mapping[str, Any]] = []
        self.answers = answers

    def send(self, msg: Mapping[str, Any]) -> bool:
        self.sent.append(dict(msg))
        return True

    async def request(self, msg: Mapping[str, Any], answer: str, within: float) -> dict[str, Any]:
        self.sent.append(dict(msg))
        if not self.answers:
            raise TimeoutError
        return {proto.T: answer}


class FakeNotices:
    def __init__(self, confirms: bool = True) -> None:
        self.confirms = confirms
        self.published: list[tuple[str, int]] = []
        self.watched: list[str] = []
        self.unwatched: list[str] = []
        self.published_total = self.received_total = self.lost_total = 0

    def publish(self, session: str, seq: int) -> None:
        self.published.append((session, seq))

    async def watch(self, session: str, within: float) -> bool:
        self.watched.append(session)
        return self.confirms

    def unwatch(self, session: str) -> None:
        self.unwatched.append(session)


def _log() -> list[Event]:
    return [Event(1, "user", "m1", "hi"), Event(2, "reply", "m1", "hello", {"done_reason": "stop"})]


def _types(sink: Sink) -> list[tuple[str, int]]:
    return [(f["type"], f.get("seq", 0)) for f in map(orjson.loads, sink.frames)]


def test_a_final_stored_with_no_client_here_is_announced_on_both_paths() -> None:
    master, notices = FakeMaster(), FakeNotices()
    hub = Listeners(FakeStore([]), master, notices)  # type: ignore[arg-type]
    hub._announce(S, 5)
    assert master.sent == [{proto.T: proto.STORED, "session": S, "seq": 5}]
    assert notices.published == [(S, 5)]

    async def with_a_client() -> None:
        hub.subscribe(S, Outbox(Sink()))
        hub._announce(S, 6)  # its client is here: it got it live, nothing to announce

    asyncio.run(with_a_client())
    assert len(master.sent) == 1 and notices.published == [(S, 5)]


def test_a_watch_by_redis_alone_delivers_and_a_second_notice_costs_nothing() -> None:
    """The master does not answer (or there is none): the Redis subscription is enough."""
    store, sink = FakeStore([Event(1, "user", "m1", "hi")]), Sink()
    master, notices = FakeMaster(answers=False), FakeNotices()
    hub = Listeners(store, master, notices)  # type: ignore[arg-type]
    hub.running = {}

    async def main() -> None:
        outbox = Outbox(sink)
        outbox.advance(1)  # the client had seq 1 (its resume replayed up to it)
        hub.subscribe(S, outbox)
        assert await hub.watch(S)
        assert S in hub.watching and notices.watched == [S]
        assert master.sent[-1] == {proto.T: proto.UNWATCH, "session": S}  # the late one undone
        store.events = _log()  # the reply is stored elsewhere; its notice comes by Redis ...
        hub.on_stored(S, 2)
        await asyncio.sleep(0.01)
        reads = store.reads
        hub.on_stored(S, 2)  # ... and by the master: sent already, no read
        assert store.reads == reads
        hub.on_stored(S, 0)  # a subscription made again: read, nothing sent twice
        await asyncio.sleep(0.01)
        assert store.reads == reads + 1
        await outbox.wait_empty()

    asyncio.run(main())
    assert _types(sink) == [("reply", 2)]


def test_a_watch_registered_by_neither_path_is_undone_on_both() -> None:
    master, notices = FakeMaster(answers=False), FakeNotices(confirms=False)
    hub = Listeners(FakeStore([Event(1, "user", "m1", "hi")]), master, notices)  # type: ignore[arg-type]
    hub.running = {}

    async def main() -> None:
        hub.subscribe(S, Outbox(Sink()))
        assert not await hub.watch(S)

    asyncio.run(main())
    assert S not in hub.watching
    assert notices.unwatched == [S]
    assert {proto.T: proto.UNWATCH, "session": S} in master.sent


def test_the_last_client_leaving_unwatches_both_paths() -> None:
    master, notices = FakeMaster(), FakeNotices()
    hub = Listeners(FakeStore([Event(1, "user", "m1", "hi")]), master, notices)  # type: ignore[arg-type]
    hub.running = {}

    async def main() -> None:
        first, second = Outbox(Sink()), Outbox(Sink())
        hub.subscribe(S, first)
        hub.subscribe(S, second)
        assert await hub.watch(S)
        hub.unsubscribe(S, first)
        assert notices.unwatched == [] and S in hub.watching
        hub.unsubscribe(S, second)

    asyncio.run(main())
    assert notices.unwatched == [S] and S not in hub.watching
    assert master.sent[-1] == {proto.T: proto.UNWATCH, "session": S}


def test_a_session_generated_here_is_not_watched() -> None:
    notices = FakeNotices()
    hub = Listeners(FakeStore([Event(1, "user", "m1", "hi")]), None, notices)  # type: ignore[arg-type]
    hub.running = {(S, "m1"): None}  # type: ignore[dict-item]

    async def main() -> None:
        hub.subscribe(S, Outbox(Sink()))
        assert not await hub.watch(S)

    asyncio.run(main())
    assert notices.watched == []


class SlowStore(FakeStore):
    """Reads that take a while: a forward's read and a gap fill's read overlap."""

    async def events_after(self, session: str, after_seq: int) -> list[Event]:
        await asyncio.sleep(0.02)
        return await super().events_after(session, after_seq)


def test_a_forward_during_a_gap_fill_loses_nothing() -> None:
    """Another worker stores reply 3 (a forward starts reading); meanwhile this connection's
    message 4 is acknowledged, so the outbox holds it and fills the gap from the log. The
    forward's read ends first: its reply goes into the held frames and must not raise the
    floor, or the fill would skip reply 3 as sent and the client never get it (found by
    review). The client gets 3 then 4, each once."""
    store = SlowStore([Event(1, "user", "m1", "hi"), Event(2, "user", "m2", "yo")])
    hub = Listeners(store, FakeMaster(), None)  # type: ignore[arg-type]
    hub.running = {}
    sink = Sink()

    async def main() -> None:
        async def fill(floor: int) -> None:
            events = await store.events_after(S, floor)
            frames = [
                orjson.dumps({"type": "x", "seq": e.seq})
                for e in events
                if not outbox.was_sent(e.seq)
            ]
            outbox.release(max([floor, *(e.seq for e in events)]), frames)

        fills: list[asyncio.Future[None]] = []
        outbox = Outbox(sink, on_gap=lambda floor: fills.append(asyncio.ensure_future(fill(floor))))
        outbox.advance(2)
        hub.subscribe(S, outbox)
        store.events.append(Event(3, "reply", "m1", "hello", {"done_reason": "stop"}))
        hub.on_stored(S, 3)
        await asyncio.sleep(0)  # the forward's task starts: its read (20 ms) is under way
        store.events.append(Event(4, "user", "m4", "again"))
        outbox.put(b'{"type":"ack","id":"m4","seq":4}', 4)  # a gap: 3 not sent yet
        await asyncio.gather(*fills, *hub._forwarding.values())  # both reads done
        assert not outbox.holding
        await outbox.wait_empty()

    asyncio.run(main())
    assert [seq for _, seq in _types(sink)] == [3, 4]


def test_a_reply_stored_elsewhere_between_the_replay_and_the_watch_reaches_the_client() -> None:
    """In one process (a fake store and master): a client resumes here from seq 1 (the ack
    of m1, which the old worker still answers). The old worker stores the reply (seq 2) after
    this resume read the log and before the watch looks for unanswered messages: its
    ``stored`` reached the master before anyone watched the session, so it is forwarded to
    nobody; the watch finds nothing unanswered and does not watch. The reply must still
    reach the client now, not at its next resume after a stall (the flake of
    tests/system/test_zero_disconnect.py's ``…[commit-new]``: the old worker
    answered a message it read after the undo of the failed commit)."""
    session = "session-1"
    reply = Event(2, "reply", "m1", "hello", {"done_reason": "stop"})

    class Store(FakeStore):
        async def get_session(self, sid: str) -> SessionInfo:
            return SessionInfo(sid, "", self.events[-1].seq, 0.0)

    class Hub(Listeners):
        async def take_over(self, sid: str | None) -> int:
            store.events.append(reply)  # stored by the old worker, announced to nobody
            return 0  # its lease was held: nothing claimed here

    store = Store([Event(1, "user", "m1", "hi", {"model": "m"})])
    master = FakeMaster()
    hub = Hub(store, master, None)  # type: ignore[arg-type]
    hub.running = {}  # nothing generated here
    state = worker_state(hub, store)
    sink = Sink()

    async def main() -> None:
        outbox = Outbox(sink)
        conn = chat.ChatConnection(state.limits, time.monotonic())
        await _hello(chat.Hello(session, 0), object(), state, conn, outbox)  # type: ignore[arg-type]
        await outbox.wait_empty()

    asyncio.run(main())
    frames = [orjson.loads(f) for f in sink.frames]
    assert [(f["type"], f.get("seq")) for f in frames] == [
        ("welcome", None),
        ("ack", 1),
        ("reply", 2),
    ], frames
    assert session not in hub.watching  # nothing unanswered: not watched, and not needed
