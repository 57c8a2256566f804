"""chatd.client against a real chatd (subprocess) and the fake Ollama, on loopback.

What is proven here: a conversation; exactly-once delivery across an abrupt disconnect in the
middle of a reply; the outbox (messages sent while disconnected are delivered once after the
reconnect); resume after SIGKILL and after a SIGTERM drain of the serving worker; dedupe of a
resent id; rate-limited messages resent with the same id; refusals attributed to their
message; unknown sessions; the handshake's 503 + Retry-After. Each test runs its own event
loop (``asyncio.run``), as the other system tests do.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from chatd.client import (
    Ack,
    ChatClient,
    ClientClosed,
    Closed,
    Error,
    Event,
    Reconnecting,
    Reply,
    Token,
    Welcome,
)
from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread, expected_reply
from tests.support import Chatd, fake_config, fake_stats, free_port, running_chatd, t, wait_for

pytestmark = pytest.mark.system
TOKENS = 5
KNOBS = {"first_token_ms": 0, "token_ms": 0, "tokens": TOKENS, "hang": False, "status": None}
E = TypeVar("E")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama(["qwen2.5-coder:7b"], tokens=TOKENS)) as f:
        yield f


@pytest.fixture(autouse=True)
def reset_fake(fake: FakeOllama) -> None:
    fake_config(fake.url, **KNOBS, reset_stats=True)


@pytest.fixture(scope="module")
def one(fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chatd]:
    """One worker: a reconnect lands on the worker that generates the reply in flight."""
    with running_chatd(
        tmp_path_factory.mktemp("one"),
        fake.url,
        workers=1,
        llm={"models": ["missing:7b"]},
        limits={"messages_per_minute": 120},
    ) as d:
        yield d


@pytest.fixture(scope="module")
def two(fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chatd]:
    with running_chatd(tmp_path_factory.mktemp("two"), fake.url, workers=2) as d:
        yield d


def run(coro: Coroutine[Any, Any, E], timeout: float = 30) -> E:
    async def bounded() -> E:
        async with asyncio.timeout(t(timeout)):
            return await coro

    return asyncio.run(bounded())


class Recorder:
    """An ``on_event`` callback keeping every event, with a way to wait for one."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait(self, pred: Callable[[Event], bool], after: int = 0, within: float = 10) -> Any:
        """The first event from index ``after`` on for which ``pred`` holds."""
        async with asyncio.timeout(t(within)):
            i = after
            while True:
                while i < len(self.events):
                    i += 1
                    if pred(self.events[i - 1]):
                        return self.events[i - 1]
                self._changed.clear()
                await self._changed.wait()

    def index(self, event: Event) -> int:
        return next(i for i, e in enumerate(self.events) if e is event)

    def of(self, kind: type[E], msg_id: str | None = None) -> list[E]:
        return [
            e
            for e in self.events
            if isinstance(e, kind) and (msg_id is None or getattr(e, "id", None) == msg_id)
        ]

    def assert_exactly_once(self) -> None:
        """Stored events came in strictly increasing seq order: none twice, none reordered."""
        seqs = [e.seq for e in self.events if isinstance(e, Ack | Reply | Error) and e.seq]
        assert seqs == sorted(set(seqs)), seqs
        for ack in self.of(Ack):
            assert len(self.of(Ack, ack.id)) == 1 and len(self.of(Reply, ack.id)) <= 1


def is_reply(msg_id: str) -> Callable[[Event], bool]:
    return lambda e: isinstance(e, Reply) and e.id == msg_id


def pid_of(welcome: Welcome) -> int:
    return int(welcome.worker.split("/")[1])


def stored(db: Path, session: str, msg_id: str, kind: str) -> int:
    with sqlite3.connect(db) as conn:
        query = "SELECT count(*) FROM events WHERE session = ? AND msg_id = ? AND kind = ?"
        return int(conn.execute(query, (session, msg_id, kind)).fetchone()[0])


async def until_stored(db: Path, session: str, msg_id: str, kind: str) -> None:
    """Wait (in a thread: it polls the SQLite file) until the event is in the store."""
    await asyncio.to_thread(
        wait_for, lambda: stored(db, session, msg_id, kind), 10, "the event stored"
    )


def test_backoff_is_bounded_and_gives_up() -> None:
    """Nothing listens: the client retries with growing, jittered delays capped at max_delay,
    then gives up after give_up_after: Closed, connect() and send() raise ClientClosed."""

    async def main() -> None:
        rec = Recorder()
        url = f"ws://127.0.0.1:{free_port()}/ws"
        client = ChatClient(url, on_event=rec, initial_delay=0.02, max_delay=0.1, give_up_after=0.6)
        with pytest.raises(ClientClosed, match="gave up"):
            await client.connect()
        delays = [e.delay for e in rec.of(Reconnecting)]
        assert len(delays) >= 4 and all(0.01 <= d <= 0.1 for d in delays), delays
        assert delays[0] <= 0.02 and max(delays) >= 0.05  # doubles, 50-100 % jitter
        assert isinstance(rec.events[-1], Closed) and "gave up" in rec.events[-1].reason
        with pytest.raises(ClientClosed):
            await client.send("too late")

    run(main())


def test_conversation(one: Chatd) -> None:
    """ask() twice; events() yields welcome, ack, tokens (a prefix of the reply), reply, ...;
    then Closed, last."""

    async def main() -> list[Event]:
        async with ChatClient(one.url) as client:
            first = await client.ask("hello there friend")
            second = await client.ask("and then what")
            assert isinstance(first, Reply) and isinstance(second, Reply)
            assert first.text == expected_reply("hello there friend", TOKENS)
            assert (first.seq, second.seq) == (2, 4) and first.done_reason == "stop"
            assert client.last_seq == 4 and client.pending == 0
            stats = client.statistics()
            assert (stats.connects, stats.acked, stats.replies, stats.reconnects) == (1, 2, 2, 0)
            events = client.events()
        return [event async for event in events]

    events = run(main())
    assert isinstance(events[0], Welcome) and not events[0].resumed
    assert isinstance(events[-1], Closed) and events[-1].reason == "closed by the caller"
    assert isinstance(events[1], Ack) and events[1] == Ack(events[1].id, 1)
    first_id = events[1].id
    reply = next(e for e in events if isinstance(e, Reply))
    streamed = "".join(e.text for e in events if isinstance(e, Token) and e.id == first_id)
    assert reply.text.startswith(streamed)  # tokens are a preview: a prefix of the reply
    assert [type(e).__name__ for e in events].count("Reply") == 2


def test_exactly_once_across_an_abrupt_disconnect_mid_reply(one: Chatd, fake: FakeOllama) -> None:
    """The transport is aborted while tokens stream: the client reconnects, resumes and the
    caller gets the ack and the complete reply once each; the tokens seen before are a prefix."""
    fake_config(fake.url, token_ms=40, tokens=25)
    text = "tell me a long story"

    async def main() -> None:
        rec = Recorder()
        async with ChatClient(one.url, on_event=rec, initial_delay=0.05) as client:
            msg_id = await client.send(text)
            await rec.wait(lambda e: isinstance(e, Token) and e.id == msg_id)
            client.abort_connection()  # as a network failure would: no close frame
            reply = await rec.wait(is_reply(msg_id))
            assert reply.text == expected_reply(text, 25) and reply.done_reason == "stop"
            welcomes = rec.of(Welcome)
            assert len(welcomes) == 2 and welcomes[1].resumed
            assert rec.index(welcomes[1]) < rec.index(reply)  # generated on, delivered live
            drop = rec.index(rec.of(Reconnecting)[0])
            before = "".join(e.text for e in rec.events[:drop] if isinstance(e, Token))
            assert before and reply.text.startswith(before)
            rec.assert_exactly_once()
            stats = client.statistics()
            assert (stats.reconnects, stats.resumes, stats.acked, stats.replies) == (1, 1, 1, 1)

    run(main())


def test_outbox_is_delivered_after_the_reconnect_once(one: Chatd) -> None:
    """Messages sent while disconnected wait in the outbox; after the welcome each is stored,
    acknowledged and answered once."""

    async def main() -> None:
        rec = Recorder()
        async with ChatClient(one.url, on_event=rec, initial_delay=0.5) as client:
            client.abort_connection()
            assert not client.connected
            ids = [await client.send(f"queued message {i}") for i in range(3)]
            assert client.pending == 3
            for msg_id in ids:
                await rec.wait(is_reply(msg_id))
            assert client.pending == 0 and client.statistics().acked == 3
            rec.assert_exactly_once()
            session = client.session
        assert session is not None
        for msg_id in ids:
            assert stored(one.db, session, msg_id, "user") == 1
            assert stored(one.db, session, msg_id, "reply") == 1

    run(main())


def test_resent_id_is_deduplicated_and_dropped(one: Chatd, fake: FakeOllama) -> None:
    """A client restarted with (session, last_seq) resends an id the server already stored:
    the server acks it again with its original seq, the client drops that duplicate."""

    async def main() -> None:
        async with ChatClient(one.url) as first:
            assert isinstance(await first.ask("remember me", id="stable-id-1"), Reply)
            session, last_seq = first.session, first.last_seq
        rec = Recorder()
        async with ChatClient(one.url, session=session, last_seq=last_seq, on_event=rec) as again:
            await again.send("remember me", id="stable-id-1")
            assert isinstance(await again.ask("and something new"), Reply)
            # Answers come in order: the dedupe ack of stable-id-1 came before the new one.
            stats = again.statistics()
            assert again.pending == 0 and stats.duplicates_dropped == 1 and stats.resumes == 1
            assert rec.of(Ack, "stable-id-1") == [] and rec.of(Reply, "stable-id-1") == []
        assert fake_stats(fake.url)["requests_total"] == 2  # stable-id-1 was generated once

    run(main())


def test_rate_limited_messages_are_resent_with_the_same_id(one: Chatd) -> None:
    """Beyond messages_per_minute (120 here) the server refuses with rate_limited; the client
    holds its writes and resends the same ids after a backoff: all are answered once."""

    async def main() -> None:
        rec = Recorder()
        async with ChatClient(one.url, on_event=rec, rate_limit_delay=0.3) as client:
            ids = [await client.send(f"burst {i}") for i in range(123)]
            for msg_id in ids:
                await rec.wait(is_reply(msg_id), within=20)
            stats = client.statistics()
            assert stats.rate_limited >= 1 and stats.acked == 123 and client.pending == 0
            limited = [e for e in rec.of(Error) if e.code == "rate_limited"]
            assert limited and not any(e.final for e in limited)
            rec.assert_exactly_once()

    run(main())


def test_final_errors_are_surfaced_not_resent(one: Chatd) -> None:
    """An llm_error (stored, with seq) and a bad_request (no id on the wire, attributed to the
    message by order) both end their message: ask() returns them, the outbox is empty."""

    async def main() -> None:
        async with ChatClient(one.url) as client:
            err = await client.ask("hi", model="missing:7b")  # configured, unknown to the fake
            assert isinstance(err, Error) and err.code == "llm_error" and err.final and err.seq
            bad = await client.ask("hi", model="gpt-9", id="bad-model")  # not configured
            assert isinstance(bad, Error) and bad.code == "bad_request"
            assert (bad.id, bad.seq, bad.final) == ("bad-model", None, True)
            assert client.pending == 0
            assert isinstance(await client.ask("still fine"), Reply)

    run(main())


def test_unknown_session_closes_or_starts_anew(one: Chatd) -> None:
    """unknown_session is surfaced as an Error; the client then closes, or starts a new
    session when new_session_on_unknown is set."""

    async def main() -> None:
        rec = Recorder()
        client = ChatClient(one.url, session="no-such-session-0000000000", on_event=rec)
        with pytest.raises(ClientClosed, match="unknown_session"):
            await client.connect()
        assert [type(e) for e in rec.events] == [Error, Closed]
        rec = Recorder()
        async with ChatClient(
            one.url, session="no-such-session-0000000000", new_session_on_unknown=True, on_event=rec
        ) as anew:
            assert anew.session not in (None, "no-such-session-0000000000")
            assert isinstance(rec.events[0], Error) and rec.events[0].code == "unknown_session"
            assert isinstance(rec.events[1], Welcome) and not rec.events[1].resumed
            assert isinstance(await anew.ask("a fresh start"), Reply)

    run(main())


def test_a_session_expired_while_connected_goes_on_in_a_new_one(
    fake: FakeOllama, tmp_path: Path
) -> None:
    """[sessions] ttl = 1 and the client idle past it: its next message is refused with
    unknown_session (not stored); with new_session_on_unknown the client says hello again and
    sends that message in the new session, where it is answered."""

    async def main(d: Chatd) -> None:
        rec = Recorder()
        async with ChatClient(d.url, new_session_on_unknown=True, on_event=rec) as client:
            first = client.session
            assert isinstance(await client.ask("before"), Reply)
            await asyncio.sleep(2.5)  # idle past the ttl: the session expires
            late = await asyncio.wait_for(client.ask("after"), t(20))
            assert isinstance(late, Reply), late
            assert client.session not in (None, first)
        codes = [e.code for e in rec.events if isinstance(e, Error)]
        assert codes == ["unknown_session"]
        welcomes = [e for e in rec.events if isinstance(e, Welcome)]
        assert len(welcomes) == 2 and not welcomes[1].resumed

    with running_chatd(tmp_path, fake.url, workers=1, sessions={"ttl": 1}) as d:
        run(main(d))


def test_stalled_answers_trigger_a_resume(one: Chatd, fake: FakeOllama) -> None:
    """An acked message, then silence (the fake holds the request): after stall_timeout the
    client resumes, as it must when its reply is generated on a worker it is no longer
    connected to (only that worker streams it live). The reply then arrives, once."""
    fake_config(fake.url, hang=True)

    async def main() -> None:
        rec = Recorder()
        async with ChatClient(one.url, on_event=rec, stall_timeout=0.3) as client:
            msg_id = await client.send("are you there")
            again = await rec.wait(lambda e: isinstance(e, Welcome), after=1, within=5)
            assert again.resumed and client.statistics().stalls >= 1
            fake_config(fake.url, hang=False)
            reply = await rec.wait(is_reply(msg_id))
            assert reply.text == expected_reply("are you there", TOKENS)
            rec.assert_exactly_once()

    run(main())


def test_sigkill_of_the_serving_worker(two: Chatd, fake: FakeOllama) -> None:
    """SIGKILL the worker serving the client: it resumes on the replacement or the other worker.

    1. A reply stored but not yet read when its worker dies is replayed, once.
    2. A message acked but not answered when its worker dies keeps its single ack; its reply
       (the takeover, once its 10 s lease lapsed) is not awaited here, to keep this test short:
       tests/system/test_chaos.py proves it, with a shortened lease.
    """
    wait_for(two.all_ready, 20, "both workers ready")

    async def main() -> None:
        rec = Recorder()
        async with ChatClient(two.url, on_event=rec, initial_delay=0.2) as client:
            assert isinstance(await client.ask("first question"), Reply)
            session, pid = client.session, pid_of(rec.of(Welcome)[0])
            assert session is not None
            fake_config(fake.url, token_ms=20, tokens=10)
            second = await client.send("second question")
            await rec.wait(lambda e: isinstance(e, Ack) and e.id == second)
            assert client._ws is not None  # test hook: stop reading, as a stalled network would
            client._ws.transport.pause_reading()
            await until_stored(two.db, session, second, "reply")
            client.abort_connection()  # then SIGKILL, with no await between: the client
            os.kill(pid, signal.SIGKILL)  # cannot reconnect before the worker is dead
            reply = await rec.wait(is_reply(second))
            assert reply.text == expected_reply("second question", 10)
            welcome = rec.of(Welcome)[1]
            assert welcome.resumed and pid_of(welcome) != pid
            assert rec.index(welcome) < rec.index(reply)  # replayed after the resume

            fake_config(fake.url, token_ms=100, tokens=50)
            third = await client.send("third question")
            await rec.wait(lambda e: isinstance(e, Token) and e.id == third)
            os.kill(pid_of(welcome), signal.SIGKILL)
            resumed = await rec.wait(lambda e: isinstance(e, Welcome), rec.index(welcome) + 1)
            assert resumed.resumed and pid_of(resumed) != pid_of(welcome)
            fake_config(fake.url, **KNOBS)
            assert isinstance(await client.ask("fourth question"), Reply)
            assert len(rec.of(Ack, third)) == 1  # its reply: see point 2 of the docstring
            rec.assert_exactly_once()

    run(main())


def test_sigterm_drain_of_the_serving_worker(two: Chatd, fake: FakeOllama) -> None:
    """SIGTERM the serving worker: it finishes the reply in flight, closes with 1001, and the
    client resumes at once on another worker; every event once."""
    wait_for(two.all_ready, 20, "both workers ready")
    fake_config(fake.url, token_ms=50, tokens=20)

    async def main() -> None:
        rec = Recorder()
        async with ChatClient(two.url, on_event=rec) as client:
            pid = pid_of(rec.of(Welcome)[0])
            msg_id = await client.send("drain me gently")
            await rec.wait(lambda e: isinstance(e, Token) and e.id == msg_id)
            os.kill(pid, signal.SIGTERM)
            reply = await rec.wait(is_reply(msg_id))
            assert reply.text == expected_reply("drain me gently", 20)
            drop = await rec.wait(lambda e: isinstance(e, Reconnecting))
            assert "1001" in drop.reason and drop.delay <= 0.1  # at once (with a little jitter)
            welcome = await rec.wait(lambda e: isinstance(e, Welcome), rec.index(drop))
            assert welcome.resumed and pid_of(welcome) != pid
            fake_config(fake.url, **KNOBS)
            assert isinstance(await client.ask("after the drain"), Reply)
            rec.assert_exactly_once()

    run(main())


def test_handshake_503_retry_after_is_honoured(fake: FakeOllama, tmp_path: Path) -> None:
    """A worker at max_connections refuses with 503 + Retry-After (5 s): the client waits
    that long, then gets in once a place is free."""
    with running_chatd(tmp_path, fake.url, workers=1, limits={"max_connections": 1}) as d:

        async def main() -> None:
            loop = asyncio.get_running_loop()
            async with ChatClient(d.url) as first:
                rec = Recorder()
                second = ChatClient(d.url, on_event=rec, initial_delay=0.05)
                started = loop.time()
                connecting = asyncio.create_task(second.connect())
                refused = await rec.wait(lambda e: isinstance(e, Reconnecting))
                assert "HTTP 503" in refused.reason and refused.delay >= 5.0
                assert first.connected
            await connecting
            assert loop.time() - started >= 5.0
            assert isinstance(await second.ask("finally in"), Reply)
            await second.close()

        run(main())
