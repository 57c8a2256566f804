"""The chat path end to end: a real chatd (master + 2 workers), a real SQLite file, the fake Ollama.

Every test talks to the server as a client would: frames on the wire, rows in the store.
"""

from __future__ import annotations

import importlib.metadata
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread, expected_reply
from tests.support import (
    Chatd,
    Client,
    fake_config,
    fake_stats,
    http_get,
    running_chatd,
    wait_for,
)

pytestmark = pytest.mark.system
TOKENS = 5
DEFAULT_KNOBS = {
    "first_token_ms": 0,
    "token_ms": 0,
    "tokens": TOKENS,
    "hang": False,
    "status": None,
    "error_after_tokens": None,
    "extra_latency_ms": 0,
}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama(["qwen2.5-coder:7b", "other:1b"], tokens=TOKENS)) as f:
        yield f


@pytest.fixture(scope="module")
def chatd(fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chatd]:
    tmp = tmp_path_factory.mktemp("chatd")
    with running_chatd(
        tmp,
        fake.url,
        workers=2,
        llm={"models": ["other:1b", "missing:7b"], "first_token_timeout": 1.0, "idle_timeout": 1.0},
        limits={"hello_timeout": 1.0, "max_message_bytes": 1000, "messages_per_minute": 600},
    ) as d:
        yield d


@pytest.fixture(autouse=True)
def reset_fake(fake: FakeOllama) -> None:
    fake_config(fake.url, **DEFAULT_KNOBS, reset_stats=True)


@pytest.fixture
def client(chatd: Chatd) -> Iterator[Client]:
    c = Client(chatd.url)
    yield c
    c.close()


def rows(db: Path, session: str) -> list[tuple[int, str, str, str]]:
    """(seq, kind, msg_id, text) of a session, read straight from the SQLite file."""
    with sqlite3.connect(db) as conn:
        return list(
            conn.execute(
                "SELECT seq, kind, msg_id, text FROM events WHERE session = ? ORDER BY seq",
                (session,),
            )
        )


def test_message_is_acked_streamed_replied_and_stored(chatd: Chatd, client: Client) -> None:
    """hello -> welcome; message -> ack(seq 1) -> tokens -> reply(seq 2); both rows in SQLite."""
    welcome = client.hello()
    assert welcome["type"] == "welcome" and welcome["resumed"] is False
    assert welcome["last_seq"] == 0 and len(welcome["session"]) >= 22
    slot, pid = welcome["worker"].split("/")
    assert int(pid) in chatd.worker_pids() and 1 <= int(slot) <= 2
    frames = client.ask("m1", "hello there friend")
    assert frames[0] == {"type": "ack", "id": "m1", "seq": 1}
    tokens = [f["text"] for f in frames if f["type"] == "token"]
    reply = frames[-1]
    expected = expected_reply("hello there friend", TOKENS)
    assert reply["type"] == "reply", reply
    assert reply["seq"] == 2 and reply["text"] == expected
    # Tokens are a preview: whatever arrived is a prefix of the reply (token text still
    # queued when the reply is stored is dropped, the reply carries it).
    assert expected.startswith("".join(tokens))
    assert reply["done_reason"] == "stop"
    assert set(reply["stats"]) == {"ttft_ms", "total_ms", "tokens", "stages"}
    assert rows(chatd.db, welcome["session"]) == [
        (1, "user", "m1", "hello there friend"),
        (2, "reply", "m1", expected),
    ]


def test_repeated_id_is_acked_again_and_not_processed_twice(
    chatd: Chatd, client: Client, fake: FakeOllama
) -> None:
    """A resent message id gets its original seq and generates nothing."""
    session = client.hello()["session"]
    client.ask("dup", "one two")
    client.send({"type": "message", "id": "dup", "text": "one two"})
    assert client.recv() == {"type": "ack", "id": "dup", "seq": 1}
    client.send({"type": "ping"})
    assert client.recv() == {"type": "pong"}  # nothing else came in between
    assert fake_stats(fake.url)["requests_total"] == 1
    assert [r[1] for r in rows(chatd.db, session)] == ["user", "reply"]


def test_resume_replays_missed_events_on_any_worker(chatd: Chatd, client: Client) -> None:
    """hello{session,last_seq} replays every later stored event in order, on both workers."""
    session = client.hello()["session"]
    client.ask("a", "first message")
    client.ask("b", "second message")
    client.close()
    seen_workers = set()
    for _ in range(40):
        c = Client(chatd.url)
        welcome = c.hello(session, last_seq=1)
        assert welcome["resumed"] is True and welcome["last_seq"] == 4
        replay = [c.recv() for _ in range(3)]
        assert [(f["type"], f["seq"]) for f in replay] == [("reply", 2), ("ack", 3), ("reply", 4)]
        assert replay[1]["text"] == "second message"
        assert replay[2]["text"] == expected_reply("second message", TOKENS)
        seen_workers.add(welcome["worker"])
        c.close()
        if len(seen_workers) == 2:
            break
    assert len(seen_workers) == 2, "SO_REUSEPORT never sent a connection to the other worker"


def test_history_goes_to_the_model_as_context(
    chatd: Chatd, client: Client, fake: FakeOllama
) -> None:
    """The second message's request carries the first turn (user and assistant)."""
    client.hello()
    client.ask("h1", "my name is Ada")
    client.ask("h2", "what is my name")
    _, _, body = http_get(f"{fake.url}/_fake/requests")
    last = json.loads(body)["requests"][-1]
    assert last["model"] == "qwen2.5-coder:7b" and last["stream"] is True
    assert [m["role"] for m in last["messages"]] == ["user", "assistant", "user"]
    assert last["messages"][0]["content"] == "my name is Ada"
    assert last["messages"][1]["content"] == expected_reply("my name is Ada", TOKENS)


def test_reply_survives_client_disconnect(chatd: Chatd, fake: FakeOllama) -> None:
    """A client that leaves mid-reply finds the whole reply stored when it resumes."""
    fake_config(fake.url, token_ms=60, tokens=10)
    c = Client(chatd.url)
    session = c.hello()["session"]
    c.send({"type": "message", "id": "gone", "text": "slow reply please"})
    assert c.recv()["type"] == "ack"
    c.until(lambda f: f["type"] == "token")
    c.close()
    wait_for(lambda: len(rows(chatd.db, session)) == 2, 10, "the reply stored")
    c2 = Client(chatd.url)
    c2.hello(session, last_seq=1)
    reply = c2.recv()
    assert reply["type"] == "reply" and reply["text"] == expected_reply("slow reply please", 10)
    c2.close()


def test_cancel_stops_the_upstream_request(chatd: Chatd, client: Client, fake: FakeOllama) -> None:
    """cancel -> reply with done_reason cancelled and the partial text; the fake stops."""
    fake_config(fake.url, token_ms=100, tokens=50)
    client.hello()
    client.send({"type": "message", "id": "c", "text": "long story"})
    client.until(lambda f: f["type"] == "token")
    client.send({"type": "cancel", "id": "c"})
    reply = client.until(lambda f: f["type"] == "reply")[-1]
    assert reply["done_reason"] == "cancelled"
    full = expected_reply("long story", 50)
    assert full.startswith(reply["text"]) and len(reply["text"]) < len(full)
    wait_for(lambda: fake_stats(fake.url)["in_flight"] == 0, 5, "the upstream request aborted")


def test_other_model_and_unknown_backend_model(
    chatd: Chatd, client: Client, fake: FakeOllama
) -> None:
    """model picks a configured model; one the backend lacks ends in a stored llm_error."""
    session = client.hello()["session"]
    assert client.ask("o", "hi", model="other:1b")[-1]["type"] == "reply"
    _, _, body = http_get(f"{fake.url}/_fake/requests")
    assert json.loads(body)["requests"][-1]["model"] == "other:1b"
    err = client.ask("x", "hi", model="missing:7b")[-1]
    assert err["type"] == "error" and err["code"] == "llm_error" and err["retryable"] is False
    assert err["seq"] == 4 and "missing:7b" in err["message"]
    assert rows(chatd.db, session)[-1][:3] == (4, "error", "x")
    client.send({"type": "message", "id": "y", "text": "hi", "model": "gpt-9"})
    bad = client.recv()
    assert bad["code"] == "bad_request" and "seq" not in bad and "gpt-9" in bad["message"]


@pytest.mark.parametrize(
    ("knobs", "code", "retryable"),
    [
        ({"status": 503}, "llm_unavailable", True),
        ({"status": 500}, "llm_unavailable", True),
        ({"hang": True}, "llm_timeout", True),
        ({"error_after_tokens": 2}, "llm_error", False),
    ],
)
def test_backend_failures_end_in_a_stored_error(
    chatd: Chatd,
    client: Client,
    fake: FakeOllama,
    knobs: dict[str, object],
    code: str,
    retryable: bool,
) -> None:
    """Each backend failure maps to its protocol code, with a sentence naming the backend."""
    fake_config(fake.url, **knobs)
    client.hello()
    err = client.ask("e", "hello")[-1]
    assert (err["type"], err["code"], err["retryable"], err["seq"]) == ("error", code, retryable, 2)
    assert fake.url.split("//")[1] in err["message"], err["message"]
    fake_config(fake.url, hang=False)


def test_http_endpoints(chatd: Chatd) -> None:
    """/healthz, /readyz, the page at /chat/, Ollama's answer at / and an unknown path."""
    assert http_get(f"{chatd.http}/healthz")[:3:2] == (200, b"ok\n")
    assert http_get(f"{chatd.http}/readyz")[0] == 200
    status, headers, body = http_get(f"{chatd.http}/chat/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"<" in body
    assert http_get(f"{chatd.http}/")[:3:2] == (200, b"Ollama is running")
    assert http_get(f"{chatd.http}/nope")[0] == 404


def test_status_counts_messages(chatd: Chatd, client: Client) -> None:
    """chatctl status --json reports every worker ready with its counters."""
    client.hello()
    client.ask("s", "count me")

    def counted() -> bool:
        st = chatd.status()
        return bool(st) and sum(w["messages_total"] for w in st["workers"]) >= 1

    wait_for(counted, 5, "the message counted in status")
    st = chatd.status()
    assert st is not None and st["master"]["pid"] == chatd.proc.pid  # type: ignore[union-attr]
    assert {w["id"] for w in st["workers"]} == {1, 2}
    assert st["master"]["version"] == importlib.metadata.version("chatd")


def test_draining_worker_finishes_reply_then_closes_1001(tmp_path: Path, fake: FakeOllama) -> None:
    """SIGTERM: the reply in flight is stored and delivered, then the client gets 1001."""
    fake_config(fake.url, token_ms=50, tokens=20)
    with running_chatd(tmp_path, fake.url, workers=1) as d:
        c = Client(d.url)
        session = c.hello()["session"]
        c.send({"type": "message", "id": "d", "text": "drain me"})
        assert c.recv()["type"] == "ack"
        c.until(lambda f: f["type"] == "token")
        d.proc.send_signal(15)  # type: ignore[union-attr]
        reply = c.until(lambda f: f["type"] == "reply")[-1]
        assert reply["text"] == expected_reply("drain me", 20)
        with pytest.raises(Exception) as closed:
            c.recv(timeout=10)
        assert getattr(closed.value, "rcvd", None) is not None and closed.value.rcvd.code == 1001
        assert d.stop() == 0
        assert [r[1] for r in rows(d.db, session)] == ["user", "reply"]


def test_compression_is_off_unless_configured(chatd: Chatd) -> None:
    """The client offers permessage-deflate; the server does not take it (47 KB vs 14 KB)."""
    c = Client(chatd.url)
    assert c.ws.response is not None
    assert "Sec-WebSocket-Extensions" not in c.ws.response.headers
    c.close()


def test_retry_goes_to_the_other_backend_before_the_first_token(tmp_path: Path) -> None:
    """One backend answers 503: the message is retried on the other, with a notice."""
    with (
        FakeOllamaThread(FakeOllama(tokens=3)) as bad,
        FakeOllamaThread(FakeOllama(tokens=3)) as good,
    ):
        fake_config(bad.url, status=503)
        backends = [{"url": bad.url, "max_parallel": 4}, {"url": good.url, "max_parallel": 1}]
        with running_chatd(tmp_path, bad.url, workers=1, backends=backends) as d:
            c = Client(d.url)
            c.hello()
            replies = []
            for i in range(4):  # least-loaded choice sends some of them to the bad one first
                frames = c.ask(f"r{i}", "retry me")
                assert frames[-1]["type"] == "reply", frames
                replies.append(frames)
            notices = [f for fr in replies for f in fr if f["type"] == "notice"]
            assert notices and all(n["code"] == "retrying" for n in notices)
            assert bad.url.split("//")[1] in notices[0]["message"]
            assert fake_stats(good.url)["requests_total"] == 4
            c.close()
