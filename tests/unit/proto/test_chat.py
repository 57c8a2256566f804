"""The chat protocol core, fed frames and checked for actions: no sockets, no event loop."""

from __future__ import annotations

import json

import pytest

from chatd.errors import ProtocolError
from chatd.proto import chat

LIMITS = chat.Limits(max_message_bytes=20, messages_per_minute=3, models=frozenset({"m1", "m2"}))


def frames(actions: list[chat.Action]) -> list[dict[str, object]]:
    """The JSON objects of the Send actions."""
    return [json.loads(a.frame) for a in actions if isinstance(a, chat.Send)]


def opened(now: float = 0.0) -> chat.ChatConnection:
    conn = chat.ChatConnection(LIMITS, now)
    assert conn.receive_text('{"type":"hello"}', now) == [chat.Hello(None, 0)]
    conn.welcomed("S")
    return conn


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "frame"),
    [
        ('{"type":"hello"}', chat.Hello(None, 0)),
        ('{"type":"hello","session":"abc","last_seq":7}', chat.Hello("abc", 7)),
        ('{"type":"message","id":"1","text":"hi"}', chat.Message("1", "hi", None)),
        ('{"type":"message","id":"1","text":"hi","model":"m2"}', chat.Message("1", "hi", "m2")),
        ('{"type":"cancel","id":"x"}', chat.Cancel("x")),
        ('{"type":"ping"}', chat.Ping()),
        (b'{"type":"ping"}', chat.Ping()),
    ],
)
def test_parse_valid_frames(data: str, frame: chat.ClientFrame) -> None:
    """Every client frame of the protocol parses to its dataclass."""
    assert chat.parse_frame(data, LIMITS) == frame


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        ("not json", "bad_request", "not valid JSON"),
        ("[1,2]", "bad_request", "JSON object"),
        ('{"no":"type"}', "bad_request", "JSON object"),
        ('{"type":7}', "bad_request", "JSON object"),
        ('{"type":"shout"}', "bad_request", "Unknown frame type 'shout'"),
        ('{"type":"hello","session":5}', "bad_request", "hello.session"),
        ('{"type":"hello","session":""}', "bad_request", "hello.session"),
        ('{"type":"hello","last_seq":-1}', "bad_request", "last_seq"),
        ('{"type":"hello","last_seq":true}', "bad_request", "last_seq"),
        ('{"type":"hello","last_seq":"3"}', "bad_request", "last_seq"),
        ('{"type":"message","text":"hi"}', "bad_request", "message.id"),
        ('{"type":"message","id":"","text":"hi"}', "bad_request", "message.id"),
        ('{"type":"message","id":"' + "x" * 65 + '","text":"hi"}', "bad_request", "message.id"),
        ('{"type":"message","id":"1"}', "bad_request", "message.text"),
        ('{"type":"message","id":"1","text":""}', "bad_request", "message.text"),
        ('{"type":"message","id":"1","text":["a"]}', "bad_request", "message.text"),
        ('{"type":"message","id":"1","text":"' + "a" * 21 + '"}', "too_large", "20 bytes"),
        ('{"type":"message","id":"1","text":"' + "é" * 11 + '"}', "too_large", "20 bytes"),
        ('{"type":"message","id":"1","text":"hi","model":"m3"}', "bad_request", "m1, m2"),
        ('{"type":"message","id":"1","text":"hi","model":3}', "bad_request", "not configured"),
        ('{"type":"cancel"}', "bad_request", "cancel.id"),
    ],
)
def test_parse_invalid_frames(data: str, code: str, words: str) -> None:
    """A bad frame raises ProtocolError with its code and a sentence naming what is wrong."""
    with pytest.raises(ProtocolError) as err:
        chat.parse_frame(data, LIMITS)
    assert err.value.code == code
    assert words in err.value.message
    assert err.value.message.endswith(")") or err.value.message.endswith(".")


# --- the state machine -----------------------------------------------------------------------


def test_hello_then_messages_flow() -> None:
    """hello -> Hello action; after welcomed, messages and cancels pass through; ping -> pong."""
    conn = chat.ChatConnection(LIMITS, 0.0)
    assert conn.state is chat.State.AWAITING_HELLO
    assert conn.receive_text('{"type":"hello","last_seq":2}', 0.0) == [chat.Hello(None, 2)]
    assert conn.state is chat.State.RESOLVING
    conn.welcomed("S")
    assert (conn.state, conn.session) == (chat.State.OPEN, "S")
    assert conn.receive_text('{"type":"message","id":"a","text":"hi"}', 0.1) == [
        chat.Message("a", "hi", None)
    ]
    assert conn.receive_text('{"type":"cancel","id":"a"}', 0.2) == [chat.Cancel("a")]
    assert frames(conn.receive_text('{"type":"ping"}', 0.3)) == [{"type": "pong"}]


def test_ping_before_hello_is_answered() -> None:
    """ping needs no session."""
    conn = chat.ChatConnection(LIMITS, 0.0)
    assert frames(conn.receive_text('{"type":"ping"}', 0.0)) == [{"type": "pong"}]


def test_frame_before_hello_is_bad_request() -> None:
    """A message before hello is refused; the connection still waits for hello."""
    conn = chat.ChatConnection(LIMITS, 0.0)
    out = frames(conn.receive_text('{"type":"message","id":"a","text":"hi"}', 0.0))
    assert out == [
        {
            "type": "error",
            "code": "bad_request",
            "message": "The first frame must be hello.",
            "retryable": False,
        }
    ]
    assert conn.state is chat.State.AWAITING_HELLO


def test_frames_while_resolving_are_refused() -> None:
    """Between hello and welcome, a message is refused (the client must wait for welcome)."""
    conn = chat.ChatConnection(LIMITS, 0.0)
    conn.receive_text('{"type":"hello"}', 0.0)
    assert frames(conn.receive_text('{"type":"message","id":"a","text":"hi"}', 0.0))[0]["code"] == (
        "bad_request"
    )


def test_second_hello_is_bad_request() -> None:
    """A second hello after welcome gets bad_request and changes nothing."""
    conn = opened()
    out = frames(conn.receive_text('{"type":"hello"}', 1.0))
    assert out[0]["code"] == "bad_request" and "already" in str(out[0]["message"])
    assert conn.state is chat.State.OPEN


def test_unknown_session_waits_for_another_hello() -> None:
    """After hello_failed, a new hello is accepted."""
    conn = chat.ChatConnection(LIMITS, 0.0)
    conn.receive_text('{"type":"hello","session":"gone"}', 0.0)
    conn.hello_failed()
    assert conn.state is chat.State.AWAITING_HELLO
    assert conn.receive_text('{"type":"hello"}', 0.1) == [chat.Hello(None, 0)]


def test_an_expired_session_waits_for_a_new_hello() -> None:
    """After session_gone (the open session expired), messages need a hello again, and a
    hello (without a session) is accepted; the expired session is forgotten."""
    conn = opened()
    conn.session_gone()
    assert conn.state is chat.State.AWAITING_HELLO and conn.session is None
    out = frames(conn.receive_text('{"type":"message","id":"b","text":"hi"}', 1.0))
    assert out[0]["code"] == "bad_request"
    assert conn.receive_text('{"type":"hello"}', 1.1) == [chat.Hello(None, 0)]


def test_ten_bad_frames_in_a_row_close_1008() -> None:
    """Nine bad frames get errors; the tenth also closes the connection with 1008."""
    conn = opened()
    for _ in range(9):
        acts = conn.receive_text("garbage", 1.0)
        assert len(acts) == 1 and isinstance(acts[0], chat.Send)
    acts = conn.receive_text("garbage", 1.0)
    assert isinstance(acts[-1], chat.Close) and acts[-1].code == chat.CLOSE_POLICY
    assert conn.state is chat.State.CLOSED
    assert conn.receive_text('{"type":"ping"}', 1.0) == []
    assert conn.receive_binary() == []


def test_a_good_frame_resets_the_bad_streak() -> None:
    """Only bad frames *in a row* count."""
    conn = opened()
    for _ in range(9):
        conn.receive_text("garbage", 1.0)
    conn.receive_text('{"type":"ping"}', 1.0)
    for _ in range(9):
        assert not any(isinstance(a, chat.Close) for a in conn.receive_text("x", 1.0))


def test_binary_frames_are_bad_requests() -> None:
    """A binary frame is a protocol error naming the rule."""
    conn = opened()
    out = frames(conn.receive_binary())
    assert out[0]["code"] == "bad_request" and "Binary" in str(out[0]["message"])


def test_rate_limit_is_per_connection_and_refills() -> None:
    """messages_per_minute=3: the 4th message at once is rate_limited; 20 s later one passes."""
    conn = opened(0.0)
    msg = '{"type":"message","id":"%d","text":"hi"}'
    for i in range(3):
        assert conn.receive_text(msg % i, 0.0) == [chat.Message(str(i), "hi", None)]
    limited = frames(conn.receive_text(msg % 3, 0.0))
    assert limited[0]["code"] == "rate_limited" and limited[0]["retryable"] is True
    assert limited[0]["id"] == "3"
    assert conn.state is chat.State.OPEN
    assert conn.receive_text(msg % 4, 20.0) == [chat.Message("4", "hi", None)]
    assert frames(conn.receive_text(msg % 5, 20.0))[0]["code"] == "rate_limited"


def test_a_moved_connection_carries_its_limiter_bad_count_and_age() -> None:
    """What travels when a connection moves to another worker (chatd.proto.adoption): the
    tokens left and their refill age; the adopting side goes on from there, clamped to its
    own limit, without a hello."""
    old = opened(100.0)
    msg = '{"type":"message","id":"%d","text":"hi"}'
    for i in range(2):
        old.receive_text(msg % i, 100.0)
    old.receive_text("{", 101.0)
    tokens, age = old.limiter_state(104.0)
    assert (tokens, age, old.bad_in_a_row) == (1.0, 4.0, 1)
    new = chat.ChatConnection(LIMITS, 500.0)
    new.adopted("S", tokens, age, old.bad_in_a_row, age=4.0, now=500.0)
    assert (new.state, new.session, new.bad_in_a_row, new.opened) == (
        chat.State.OPEN,
        "S",
        1,
        496.0,
    )
    assert new.receive_text(msg % 2, 500.0) == [chat.Message("2", "hi", None)]  # the one left
    assert frames(new.receive_text(msg % 3, 500.0))[0]["code"] == "rate_limited"
    # 4 s of refill already counted on the old side: 16 s more make the next token.
    assert new.receive_text(msg % 4, 516.0) == [chat.Message("4", "hi", None)]
    clamped = chat.ChatConnection(LIMITS, 0.0)
    clamped.adopted("S", 50.0, 0.0, 0, age=0.0, now=0.0)
    assert clamped.limiter_state(0.0) == (3.0, 0.0)


def test_hello_timeout_closes_only_before_hello() -> None:
    """The hello timer closes 1008 while waiting for hello, and does nothing after it."""
    conn = chat.ChatConnection(LIMITS, 0.0)
    assert conn.hello_timed_out() == [chat.Close(chat.CLOSE_POLICY, "no hello in time")]
    assert opened().hello_timed_out() == []


def test_closed_connection_ignores_frames() -> None:
    """After closed(), frames produce no actions."""
    conn = opened()
    conn.closed()
    assert conn.receive_text('{"type":"ping"}', 0.0) == []


# --- server frames ---------------------------------------------------------------------------


def test_server_frames() -> None:
    """Every server frame carries the fields of protocol.md."""
    assert json.loads(chat.welcome_frame("S", 4, True, "1/99")) == {
        "type": "welcome",
        "session": "S",
        "last_seq": 4,
        "resumed": True,
        "worker": "1/99",
        "protocol": 1,
    }
    assert json.loads(chat.ack_frame("a", 1)) == {"type": "ack", "id": "a", "seq": 1}
    assert json.loads(chat.ack_frame("a", 1, "hi"))["text"] == "hi"
    assert json.loads(chat.queued_frame("a", 3)) == {"type": "queued", "id": "a", "position": 3}
    assert json.loads(chat.notice_frame("a", "retrying", "m")) == {
        "type": "notice",
        "id": "a",
        "code": "retrying",
        "message": "m",
    }
    assert json.loads(chat.token_frame("a", "x")) == {"type": "token", "id": "a", "text": "x"}
    stats = {"ttft_ms": 1.0, "total_ms": 2.0, "tokens": 3}
    assert json.loads(chat.reply_frame("a", 2, "t", "stop", stats)) == {
        "type": "reply",
        "id": "a",
        "seq": 2,
        "text": "t",
        "done_reason": "stop",
        "stats": stats,
    }
    err = json.loads(chat.error_frame("busy", "full", msg_id="a", seq=5))
    assert err == {
        "type": "error",
        "code": "busy",
        "message": "full",
        "retryable": True,
        "id": "a",
        "seq": 5,
    }
    assert json.loads(chat.PONG) == {"type": "pong"}


def test_stored_event_frames() -> None:
    """Replayed events: a user message as ack with text, a reply, a final error."""
    assert json.loads(chat.stored_event_frame("user", "a", 1, "hi", {})) == {
        "type": "ack",
        "id": "a",
        "seq": 1,
        "text": "hi",
    }
    rep = json.loads(
        chat.stored_event_frame("reply", "a", 2, "yo", {"done_reason": "length", "stats": {}})
    )
    assert (rep["type"], rep["seq"], rep["done_reason"]) == ("reply", 2, "length")
    err = json.loads(
        chat.stored_event_frame("error", "a", 2, "slow", {"code": "llm_timeout", "retryable": True})
    )
    assert (err["type"], err["code"], err["seq"], err["retryable"]) == (
        "error",
        "llm_timeout",
        2,
        True,
    )
    odd = json.loads(chat.stored_event_frame("error", "a", 3, "?", {"code": "nonsense"}))
    assert odd["code"] == "internal"


def test_every_code_has_a_retryable_flag() -> None:
    """The table of error codes matches protocol.md."""
    assert set(chat.RETRYABLE) == {
        "bad_request",
        "too_large",
        "rate_limited",
        "busy",
        "llm_timeout",
        "llm_unavailable",
        "llm_error",
        "unknown_session",
        "shutting_down",
        "store_unavailable",
        "internal",
    }
