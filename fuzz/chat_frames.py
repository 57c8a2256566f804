"""Fuzz target for the chat protocol core (:mod:`chatd.proto.chat`), with atheris.

::

    pip install atheris        # not a dependency of chatd: a developer's tool
    python fuzz/chat_frames.py -max_total_time=60 fuzz/corpus/chat_frames/

Each input is a sequence of client frames separated by a zero byte; a frame starting with
``\\x01`` is a binary frame, any other is fed as text (as bytes, and as str when it decodes).
What must hold, else the target raises and atheris reports a crash: the core never raises;
it answers only with error frames carrying a protocol code, pongs, policy closes, and the
actions a valid frame stands for; a closed connection answers nothing.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import orjson

    from chatd.proto import chat

LIMITS = chat.Limits(max_message_bytes=64, messages_per_minute=30, models=frozenset({"m"}))
CODES = {"bad_request", "too_large", "rate_limited"}


def check(actions: list[chat.Action], closed_before: bool) -> None:
    if closed_before:
        assert actions == [], actions
    for action in actions:
        if isinstance(action, chat.Send):
            obj = orjson.loads(action.frame)
            assert obj["type"] == "pong" or obj["code"] in CODES, obj
        elif isinstance(action, chat.Close):
            assert action.code == chat.CLOSE_POLICY
        else:
            assert isinstance(action, chat.Hello | chat.Message | chat.Cancel), action


def test_one_input(data: bytes) -> None:
    conn = chat.ChatConnection(LIMITS, 0.0)
    for i, frame in enumerate(data.split(b"\0")):
        closed = conn.state is chat.State.CLOSED
        if frame.startswith(b"\x01"):
            check(conn.receive_binary(), closed)
            continue
        check(conn.receive_text(frame, float(i)), closed)
        if conn.state is chat.State.RESOLVING:
            if i % 2:
                conn.welcomed("s")
            else:
                conn.hello_failed()
        try:
            text = frame.decode()
        except UnicodeDecodeError:
            continue
        closed = conn.state is chat.State.CLOSED
        check(conn.receive_text(text, float(i)), closed)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
