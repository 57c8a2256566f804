"""Retention: a session expires ``[sessions] ttl`` seconds after its last activity, in both stores.

With ``ttl = 2``: a session resumes within the ttl; after ~3 s idle, ``hello{session}`` gets
``unknown_session`` (not retryable, the connection stays open), and a fresh ``hello`` on that
same connection starts a new session that works. Run on SQLite and on Redis.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from tests.support import Client, running_chatd

pytestmark = [pytest.mark.system, pytest.mark.timeout(60)]

TTL = 2
IDLE = 3.2  # seconds idle before the expired resume: above TTL, with a margin


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(
        FakeOllama(["qwen2.5-coder:7b"], tokens=3, token_ms=0, first_token_ms=0)
    ) as f:
        yield f


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_session_expires_after_ttl(
    store: str, fake: FakeOllama, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    sessions: dict[str, object] = {"ttl": TTL}
    if store == "redis":
        sessions["store"] = request.getfixturevalue("redis_url")
    with running_chatd(tmp_path, fake.url, workers=1, sessions=sessions) as d:
        c = Client(d.url)
        w = c.hello()
        assert w["type"] == "welcome", w
        session = w["session"]
        frames = c.ask("m1", "hello there")
        assert frames[-1]["type"] == "reply", frames
        last_seq = frames[-1]["seq"]
        c.close()

        # Within the ttl: it resumes.
        c = Client(d.url)
        w = c.hello(session, last_seq)
        assert w["type"] == "welcome" and w["resumed"] and w["session"] == session, w
        c.close()

        time.sleep(IDLE)
        c = Client(d.url)
        err = c.hello(session, last_seq)
        assert err["type"] == "error" and err["code"] == "unknown_session", err
        assert err["retryable"] is False, err
        # The connection stays open, waiting for a hello without a session.
        w = c.hello()
        assert w["type"] == "welcome" and not w["resumed"] and w["session"] != session, w
        frames = c.ask("m1", "hello again")
        assert frames[-1]["type"] == "reply" and frames[-1]["seq"] == 2, frames
        c.close()
