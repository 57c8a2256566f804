"""Live handoff: a client resumed on another worker gets the reply generated elsewhere, live.

Two workers and a slow fake Ollama. The client sends a message on worker A, its connection is
cut, and it resumes (``hello {session, last_seq}``) on worker B while A still generates the
reply. B watches the session at the master; A, which has no subscriber of the session any
more, announces the stored reply; the master forwards the notice to B, which reads the reply
from the log and pushes it. The client here is the raw protocol client (no stall fallback, no
resend): it sends nothing after its hello, so the reply can only come from the handoff.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from chatd.dev.fake_ollama.wire import expected_reply
from tests.support import Client, running_chatd, t

pytestmark = pytest.mark.system
TOKENS = 20
TOKEN_MS = 100  # the reply takes ~2 s to generate


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(
        FakeOllama(["qwen2.5-coder:7b"], tokens=TOKENS, token_ms=TOKEN_MS, first_token_ms=0)
    ) as f:
        yield f


def _resume_elsewhere(url: str, session: str, last_seq: int, not_on: str) -> tuple[Client, Any]:
    """Reconnect until the hello lands on another worker than ``not_on``."""
    for _ in range(100):
        c = Client(url)
        welcome = c.hello(session, last_seq=last_seq)
        assert welcome["type"] == "welcome" and welcome["resumed"] is True, welcome
        if welcome["worker"] != not_on:
            return c, welcome
        c.close()
    raise AssertionError(f"100 connections all landed on worker {not_on}")


def test_resumed_on_another_worker_gets_the_reply_live(fake: FakeOllama, tmp_path: Path) -> None:
    with running_chatd(tmp_path, fake.url, workers=2) as d:
        a = Client(d.url)
        welcome = a.hello()
        session, worker_a = welcome["session"], welcome["worker"]
        sent = time.monotonic()
        a.send({"type": "message", "id": "m-handoff", "text": "hello there"})
        ack = a.until(lambda f: f["type"] == "ack")[-1]
        assert ack["id"] == "m-handoff" and ack["seq"] == 1
        a.until(lambda f: f["type"] == "token")  # A is generating
        a.close()

        b, welcome_b = _resume_elsewhere(d.url, session, ack["seq"], worker_a)
        try:
            assert welcome_b["last_seq"] == 1  # the reply is not stored yet
            generation_s = TOKENS * TOKEN_MS / 1000.0
            frames = b.until(lambda f: f["type"] in ("reply", "error"), timeout=generation_s + 5)
            elapsed = time.monotonic() - sent
            reply = frames[-1]
            assert reply["type"] == "reply", reply
            assert reply["id"] == "m-handoff" and reply["seq"] == 2
            assert reply["text"] == expected_reply("hello there", TOKENS)
            assert elapsed < generation_s + t(2.0), f"reply after {elapsed:.1f}s"
            # Exactly once: nothing else arrives (a duplicate would come right after).
            with pytest.raises(TimeoutError):
                extra = b.recv(timeout=1.0)
                raise AssertionError(f"unexpected frame after the reply: {extra}")
        finally:
            b.close()
        assert "Traceback" not in d.log()
