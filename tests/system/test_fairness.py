"""Fair queueing across clients: the master serves the clients' keys round robin.

A real chatd with auth on (the key of a connection is the hash of its token) in front of the
fake Ollama, one slot daemon-wide (``max_parallel = 1``), each reply taking a fixed time. A
flooding client queues a dozen messages, then a light client sends one: its reply must not
wait for the flooder's backlog. The assertions are on order and counts (the store's commit
order of the replies), never on durations.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from tests.support import Chatd, Client, fake_config, running_chatd, wait_for

pytestmark = pytest.mark.system

FLOOD = 12


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama(["qwen2.5-coder:7b"], tokens=5)) as f:
        yield f


@pytest.fixture(autouse=True)
def slow_replies(fake: FakeOllama) -> None:
    # ~0.5 s per reply: the flooder's backlog stays queued while the light client sends.
    fake_config(fake.url, first_token_ms=0, token_ms=50, tokens=10, hang=False, reset_stats=True)


def start(tmp: Path, fake: FakeOllama, max_queue: int = 64, **limits: Any) -> Any:
    return running_chatd(
        tmp,
        fake.url,
        workers=2,
        backends=[{"url": fake.url, "max_parallel": 1}],
        llm={"max_queue": max_queue, "first_token_timeout": 30.0, "idle_timeout": 30.0},
        limits={"messages_per_minute": 600, **limits},
        auth={"tokens": ["flood", "light"]},
    )


def client(d: Chatd, token: str) -> Client:
    c = Client(d.url, additional_headers={"Authorization": f"Bearer {token}"})
    assert c.hello()["type"] == "welcome"
    return c


def key_of(token: str) -> str:
    """The granter's key for a token: its hash, as chatd.worker.session.owner_of makes it."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def queue(d: Chatd) -> dict[str, Any]:
    st = d.status()
    return st["queue"] if st else {}


def send_all(c: Client, ids: list[str]) -> None:
    """Send the messages back to back, then read their acks."""
    for msg_id in ids:
        c.send({"type": "message", "id": msg_id, "text": f"text of {msg_id}"})
    acked: set[str] = set()
    while acked != set(ids):
        frame = c.recv()
        if frame["type"] == "ack":
            acked.add(frame["id"])


def finals(c: Client, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Read until every message of ``ids`` has its reply or final error."""
    got: dict[str, dict[str, Any]] = {}

    def final(f: dict[str, Any]) -> bool:
        if f.get("id") in ids and f["type"] in ("reply", "error") and "seq" in f:
            got[f["id"]] = f
        return len(got) == len(ids)

    c.until(final, 60)
    return got


def stored(d: Chatd) -> list[tuple[str, str]]:
    """Every event of every session as ``(kind, msg_id)``, in the order they were committed."""
    with sqlite3.connect(d.db) as conn:
        rows = conn.execute("SELECT kind, msg_id FROM events ORDER BY ts, rowid").fetchall()
    return [(kind, msg_id) for kind, msg_id in rows]


def test_a_light_client_waits_for_at_most_one_flooder_message(
    tmp_path: Path, fake: FakeOllama
) -> None:
    """The flooder has one message generating and 11 waiting; the light client's message is
    served right after the flooder's next one (round robin), not after all 11 (FIFO)."""
    with start(tmp_path, fake) as d:
        flood, light = client(d, "flood"), client(d, "light")
        try:
            ids = [f"f{i}" for i in range(1, FLOOD + 1)]
            send_all(flood, ids)
            wait_for(lambda: queue(d).get("depth") == FLOOD - 1, 10, "the flooder's backlog")
            # chatctl status names the flooder by its token's hash (its running message was
            # granted while nobody waited: leased, so counted against no client).
            (flooder,) = queue(d)["keys"]
            assert flooder == {"key": key_of("flood"), "queued": FLOOD - 1, "in_flight": 0}
            light.send({"type": "message", "id": "l1", "text": "just one question"})
            light_frames = light.until(lambda f: f.get("id") == "l1" and f["type"] == "reply")
            queued = [f["position"] for f in light_frames if f["type"] == "queued"]
            assert queued[:1] == [2], light_frames  # only the flooder's next one before it
            assert all(f["type"] == "reply" for f in finals(flood, ids).values())
        finally:
            flood.close()
            light.close()
        order = stored(d)
        light_asked = order.index(("user", "l1"))
        replies = [msg_id for kind, msg_id in order[light_asked:] if kind == "reply"]
        # After the light message was stored: the flooder's reply generating then, the
        # flooder's next one, then the light one; with first in, first out it would be 12th.
        assert replies.index("l1") <= 2, replies
        assert len(replies) - replies.index("l1") - 1 >= FLOOD - 4, replies  # the rest: after


def test_a_flooder_over_its_own_bound_gets_busy_and_the_light_client_is_answered(
    tmp_path: Path, fake: FakeOllama
) -> None:
    """max_queued_per_key 4 (and max_queue 5): of the flooder's 6 messages, one generates, 4
    wait and the last one gets a stored busy error naming the per-client bound at once; the
    queue keeps a place for the light client, whose message is answered."""
    with start(tmp_path, fake, max_queue=5, max_queued_per_key=4) as d:
        flood, light = client(d, "flood"), client(d, "light")
        try:
            ids = [f"f{i}" for i in range(1, 7)]
            send_all(flood, ids)
            wait_for(lambda: queue(d).get("depth") == 4, 10, "the flooder's 4 places")
            answer = light.ask("l1", "just one question", timeout=60)[-1]
            assert answer["type"] == "reply", answer
            got = finals(flood, ids)
        finally:
            flood.close()
            light.close()
        errors = [f for f in got.values() if f["type"] == "error"]
        assert len(errors) == 1 and len(got) == 6, got
        (err,) = errors
        assert err["code"] == "busy" and err["retryable"] is True, err
        assert err["message"] == (
            "Too many of your messages are waiting for the model (4 at most per client): "
            "send it again later with a new id."
        )
        st = d.status()
        assert st is not None and st["queue"]["depth"] == 0
