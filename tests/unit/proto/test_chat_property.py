"""Property tests of the chat protocol core: any sequence of frames, any JSON in any field.

Whatever a client sends, the core answers only with error frames (``bad_request``,
``too_large``, ``rate_limited``), pongs, policy closes, or the actions a valid frame stands for,
and never raises. Invariants after every step: a connection is in one of its states; it is
closed only by a policy close it returned (10 bad frames in a row), and returns nothing once
closed; ``hello`` passes at most once per hello-resolution; a message or cancel passes only
on an open connection; every error frame is valid JSON with a protocol code.
"""

from __future__ import annotations

import json

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.proto import chat

LIMITS = chat.Limits(max_message_bytes=64, messages_per_minute=5, models=frozenset({"m"}))

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()  # any size: a client may send 2**100
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
FIELDS = ("type", "id", "text", "session", "last_seq", "model")
TYPES = ("hello", "message", "cancel", "ping", "welcome", "bogus", 3, None)
frames = st.one_of(
    # Well-formed-looking frames with any value in any field.
    st.fixed_dictionaries(
        {"type": st.sampled_from(TYPES)},
        optional={f: st.one_of(json_values, st.text(max_size=100)) for f in FIELDS[1:]},
    ).map(json.dumps),
    json_values.map(json.dumps),  # any JSON document
    st.binary(max_size=120),  # any bytes (not UTF-8, not JSON)
    st.text(max_size=120),  # any text
    st.just("binary"),  # a binary WebSocket frame
)
# What the I/O layer may do between frames: resolve a pending hello either way.
steps = st.lists(
    st.tuples(frames, st.sampled_from(["none", "welcome", "fail"]), st.floats(0, 30)),
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(steps)
def test_any_frames_get_only_protocol_answers_and_invariants_hold(
    seq: list[tuple[str, str, float]],
) -> None:
    now = 0.0
    conn = chat.ChatConnection(LIMITS, now)
    bad = 0
    for frame, resolve, dt in seq:
        now += dt
        before = conn.state
        binary = frame == "binary"
        actions = conn.receive_binary() if binary else conn.receive_text(frame, now)
        if before is chat.State.CLOSED:
            assert actions == []
            continue
        for action in actions:
            if isinstance(action, chat.Send):
                obj = orjson.loads(action.frame)
                assert obj["type"] in ("error", "pong"), obj
                if obj["type"] == "error":
                    assert obj["code"] in ("bad_request", "too_large", "rate_limited"), obj
                    assert obj["retryable"] is chat.RETRYABLE[obj["code"]]
                    assert isinstance(obj["message"], str) and obj["message"]
            elif isinstance(action, chat.Close):
                assert action.code == chat.CLOSE_POLICY
                assert action is actions[-1] and conn.state is chat.State.CLOSED
            elif isinstance(action, chat.Hello):
                assert before is chat.State.AWAITING_HELLO
                assert conn.state is chat.State.RESOLVING
            elif isinstance(action, chat.Message | chat.Cancel):
                assert before is chat.State.OPEN
                if isinstance(action, chat.Message):
                    assert 1 <= len(action.id) <= 64
                    assert len(action.text.encode()) <= LIMITS.max_message_bytes
            else:
                raise AssertionError(f"unexpected action {action!r}")
        sent = [a.frame for a in actions if isinstance(a, chat.Send)]
        errors = [f for f in sent if f.startswith(b'{"type":"error"')]
        bad = bad + 1 if errors and not any(b'"rate_limited"' in e for e in errors) else 0
        if conn.state is chat.State.CLOSED:
            assert bad >= chat.MAX_BAD_FRAMES
        assert conn.state in set(chat.State)
        if conn.state is chat.State.RESOLVING:
            if resolve == "welcome":
                conn.welcomed("s")
            elif resolve == "fail":
                conn.hello_failed()
