"""Bad input only ever affects the connection that sent it: never a worker, never a bystander."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread, expected_reply
from tests.support import Chatd, Client, fake_config, http_get, running_chatd, t

pytestmark = pytest.mark.system
MAX_BYTES = 200


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama(tokens=4)) as f:
        yield f


@pytest.fixture(scope="module")
def chatd(fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chatd]:
    with running_chatd(
        tmp_path_factory.mktemp("bad"),
        fake.url,
        workers=2,
        limits={
            "hello_timeout": 1.0,
            "max_message_bytes": MAX_BYTES,
            "messages_per_minute": 5,
            "max_connections": 40,
        },
    ) as d:
        yield d


def closed_code(c: Client, timeout: float = 5) -> int | None:
    """Read until the server closes; return its close code."""
    try:
        while True:
            c.recv(timeout)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None


def test_hostile_batch_leaves_bystander_and_workers_alone(chatd: Chatd, fake: FakeOllama) -> None:
    """Garbage of every kind on many connections while a bystander chats; no worker dies."""
    fake_config(fake.url, token_ms=20, tokens=30)
    pids = chatd.worker_pids()
    bystander = Client(chatd.url)
    bystander.hello()
    bystander.send({"type": "message", "id": "calm", "text": "steady conversation"})
    errors: list[BaseException] = []

    def hostile(i: int) -> None:
        try:
            attack(chatd, i)
        except BaseException as exc:  # collected: the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=hostile, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    reply = bystander.until(lambda f: f["type"] == "reply", timeout=30)[-1]
    for th in threads:
        th.join(t(30))
    assert not errors, errors
    assert reply["text"] == expected_reply("steady conversation", 30)
    assert chatd.worker_pids() == pids
    bystander.close()
    fake_config(fake.url, token_ms=0, tokens=4)


def attack(chatd: Chatd, i: int) -> None:
    """One hostile client: each kind of bad frame, checked for its error, then a flood."""
    c = Client(chatd.url)
    cases: list[tuple[str | bytes, str, str]] = [
        ("{not json", "bad_request", "not valid JSON"),
        ("[]", "bad_request", "JSON object"),
        ('{"type":"message","id":"x","text":"before hello"}', "bad_request", "first frame"),
        (b"\x00\x01binary", "bad_request", "Binary"),
    ]
    for frame, code, words in cases:
        c.send(frame)
        err = c.recv()
        assert (err["type"], err["code"]) == ("error", code) and words in err["message"], err
    assert c.hello()["type"] == "welcome"
    typed = [
        ({"type": "message", "id": 5, "text": "x"}, "bad_request"),
        ({"type": "message", "id": "a", "text": 5}, "bad_request"),
        ({"type": "message", "id": "a", "text": "x" * (MAX_BYTES + 1)}, "too_large"),
        ({"type": "hello"}, "bad_request"),
        ({"type": "launch"}, "bad_request"),
        ({"type": "cancel"}, "bad_request"),
    ]
    for frame, code in typed:
        c.send(frame)
        assert c.recv()["code"] == code
    c.send({"type": "ping"})  # a good frame resets the streak of bad ones
    assert c.recv() == {"type": "pong"}
    for _ in range(10):
        c.send("flood")
    assert closed_code(c) == 1008
    # A frame over the WebSocket size limit closes with 1009.
    big = Client(chatd.url)
    big.hello()
    big.send(json.dumps({"type": "message", "id": "b", "text": "x" * (10 * MAX_BYTES + 8192)}))
    assert closed_code(big) == 1009
    # A half-open handshake: some bytes of an HTTP request, then silence, then gone.
    with socket.create_connection(("127.0.0.1", chatd.port), timeout=t(5)) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgr")
    # A handshake-only client that never sends hello is closed 1008 after hello_timeout.
    quiet = Client(chatd.url)
    assert closed_code(quiet, timeout=5) == 1008
    del i


def test_unknown_session_then_new_hello(chatd: Chatd) -> None:
    """unknown_session keeps the connection waiting for hello; a fresh hello works."""
    c = Client(chatd.url)
    err = c.hello("no-such-session-0123456789", last_seq=3)
    assert (err["type"], err["code"], err["retryable"]) == ("error", "unknown_session", False)
    assert c.hello()["type"] == "welcome"
    c.close()


def test_the_hello_deadline_holds_until_a_hello_is_accepted(chatd: Chatd) -> None:
    """hello_timeout (1 s here) bounds the wait for an accepted hello: a connection whose
    hello was refused (unknown_session) and that stays silent is closed 1008 (the deadline
    is armed again); a welcomed one stays open past it (its ping, 2 s on, gets a pong)."""
    refused = Client(chatd.url)
    assert refused.hello("no-such-session-0123456789")["code"] == "unknown_session"
    welcomed = Client(chatd.url)
    assert welcomed.hello()["type"] == "welcome"
    assert closed_code(refused, timeout=5) == 1008
    time.sleep(1.0)  # the welcomed connection is now over a second old as well
    welcomed.send({"type": "ping"})
    assert welcomed.recv()["type"] == "pong"
    welcomed.close()


def test_a_session_expired_while_connected_asks_for_a_new_hello(
    tmp_path: Path, fake: FakeOllama
) -> None:
    """[sessions] ttl = 1: a connection idle past it sends a message: unknown_session (not
    retryable, with the message's id, nothing stored, the store still healthy), the
    connection waits for a hello, and a new hello starts a session that chats."""
    with running_chatd(tmp_path, fake.url, workers=1, sessions={"ttl": 1}) as d:
        c = Client(d.url)
        old = c.hello()["session"]
        assert c.ask("first", "hi")[-1]["type"] == "reply"
        time.sleep(2.5)  # idle past the ttl (not a timing assertion: the session must expire)
        c.send({"type": "message", "id": "late", "text": "still there?"})
        err = c.until(lambda f: f["type"] == "error", timeout=t(10))[-1]
        assert (err["code"], err["id"], err["retryable"]) == ("unknown_session", "late", False)
        c.send({"type": "message", "id": "later", "text": "hello?"})
        assert c.until(lambda f: f["type"] == "error", timeout=t(10))[-1]["code"] == "bad_request"
        welcome = c.hello()
        assert welcome["type"] == "welcome" and welcome["session"] != old
        assert c.ask("again", "hi")[-1]["type"] == "reply"
        c.close()
        st = d.status()
        assert st is not None and all(w["store_healthy"] for w in st["workers"])
    with sqlite3.connect(d.db) as db:
        ids = {m for (m,) in db.execute("SELECT msg_id FROM events WHERE session = ?", (old,))}
    assert "late" not in ids and "later" not in ids


def test_rate_limit_is_per_connection(chatd: Chatd) -> None:
    """messages_per_minute=5: the 6th message at once is rate_limited and not stored."""
    c = Client(chatd.url)
    c.hello()
    for i in range(5):
        c.send({"type": "message", "id": f"r{i}", "text": "hi"})
    c.send({"type": "message", "id": "r5", "text": "hi"})
    frames = c.until(lambda f: f.get("code") == "rate_limited", timeout=10)
    assert frames[-1]["id"] == "r5" and frames[-1]["retryable"] is True
    other = Client(chatd.url)
    other.hello()
    assert other.ask("fine", "hi")[-1]["type"] == "reply"
    c.close()
    other.close()


def test_max_connections_refuses_handshake_with_503(tmp_path: Path, fake: FakeOllama) -> None:
    """Over max_connections per worker the handshake gets HTTP 503 with Retry-After."""
    with running_chatd(tmp_path, fake.url, workers=1, limits={"max_connections": 3}) as d:
        clients = [Client(d.url) for _ in range(3)]
        with pytest.raises(InvalidStatus) as refused:
            Client(d.url)
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["Retry-After"]
        for c in clients:
            c.close()


def test_auth_tokens(tmp_path: Path, fake: FakeOllama) -> None:
    """With tokens: 401 without one; a session resumes only with the token that created it."""
    with running_chatd(
        tmp_path, fake.url, workers=1, auth={"tokens": ["alpha-token", "beta-token"]}
    ) as d:
        with pytest.raises(InvalidStatus) as refused:
            Client(d.url)
        assert refused.value.response.status_code == 401
        a = Client(d.url, additional_headers={"Authorization": "Bearer alpha-token"})
        session = a.hello()["session"]
        a.close()
        b = Client(d.url + "?token=beta-token")
        assert b.hello(session)["code"] == "unknown_session"
        b.close()
        a2 = Client(d.url + "?token=alpha-token")
        assert a2.hello(session)["resumed"] is True
        a2.close()
        assert http_get(f"{d.http}/healthz")[0] == 200  # the HTTP endpoints need no token


def test_last_seq_beyond_the_log_is_refused_naming_the_last_seq(chatd: Chatd) -> None:
    """hello.last_seq past the end of the log is refused (bad_request naming the log's last
    seq), and a hello with a good last_seq on the same connection then resumes: its replies
    are delivered (accepted silently, they were stored but never sent)."""
    c = Client(chatd.url)
    session = c.hello()["session"]
    assert c.ask("one", "first words")[-1]["seq"] == 2
    c.close()
    c = Client(chatd.url)
    c.send({"type": "hello", "session": session, "last_seq": 57})
    err = c.recv()
    assert err["type"] == "error" and err["code"] == "bad_request"
    assert "57" in err["message"] and "last seq 2" in err["message"]
    welcome = c.hello(session, last_seq=2)
    assert welcome["type"] == "welcome" and welcome["resumed"] and welcome["last_seq"] == 2
    assert c.ask("two", "second words")[-1]["seq"] == 4
    c.close()
