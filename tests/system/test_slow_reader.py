"""A client that sends and never reads cannot take a worker's memory.

The reader here is a raw TCP socket that does the WebSocket handshake itself, says hello,
sends messages whose replies are large, and then reads nothing (with a small receive buffer,
so the kernel holds little for it). Without a bound, every reply and token frame piled up in
the worker for as long as the connection lived (1.5 GB was seen), and the keepalive never
fired because its ping waited behind the unread data. With ``max_outbound_bytes`` the worker
closes it (1008) once that much is unread, counts it in ``chatd_slow_closes_total``, its RSS
stays flat, a bystander chats on undisturbed, and every reply is in the store for its resume.
"""

from __future__ import annotations

import json
import re
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread, expected_reply
from tests.support import Chatd, Client, client_frame, http_get, running_chatd, t, wait_for

pytestmark = pytest.mark.system

MESSAGES = 120
TEXT = "a message whose reply is long"
TOKENS = 4000  # a reply is ~40 KB and its token frames as much again: ~10 MB for MESSAGES
LIMIT = 1 << 20  # max_outbound_bytes under test


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama(["qwen2.5-coder:7b"], tokens=TOKENS)) as f:
        yield f


frame = client_frame


def never_reading_client(d: Chatd) -> tuple[socket.socket, str]:
    """A handshaken, welcomed connection with a tiny receive buffer; returns it and its session."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(t(10))
    s.connect(("127.0.0.1", d.port))
    s.sendall(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    got = b""
    while b'"welcome"' not in got:
        if b"\r\n\r\n" in got and not got.startswith(b"HTTP/1.1 101"):
            raise AssertionError(got[:200])
        if got.endswith(b"\r\n\r\n"):
            s.sendall(frame(b'{"type":"hello"}'))
        chunk = s.recv(4096)
        assert chunk, "closed during the handshake"
        got += chunk
    match = re.search(rb'"session":"([^"]+)"', got)
    assert match is not None
    return s, match.group(1).decode()


def metric(d: Chatd, name: str) -> float:
    status, _, body = http_get(f"{d.http}/metrics")
    assert status == 200
    found = re.search(rf"^{name} (\S+)$", body.decode(), re.M)
    return float(found.group(1)) if found else 0.0


def test_a_client_that_never_reads_is_closed_at_its_bound(tmp_path: Path, fake: FakeOllama) -> None:
    limits = {"max_outbound_bytes": LIMIT, "messages_per_minute": 100000}
    with running_chatd(tmp_path, fake.url, workers=1, limits=limits) as d:
        st = d.status()
        assert st is not None
        rss_before = st["workers"][0]["rss_bytes"]
        pid = st["workers"][0]["pid"]
        s, session = never_reading_client(d)
        for i in range(MESSAGES):
            text = json.dumps({"type": "message", "id": f"m{i}", "text": TEXT})
            s.sendall(frame(text.encode()))
        # The worker cuts it off once LIMIT bytes are unread (it reads none of them).
        wait_for(lambda: metric(d, "chatd_slow_closes_total") >= 1, 60, "the slow reader closed")
        assert "bytes unread" in d.log()
        # A bystander chats on, on the same worker.
        c = Client(d.url)
        c.hello()
        assert c.ask("b", "bystander here")[-1]["text"] == expected_reply("bystander here", TOKENS)
        c.close()

        # Every message the worker acknowledged has its reply in the store (nothing lost),
        # and the worker's memory did not grow with what the client did not read.
        def answered() -> int:
            with sqlite3.connect(d.db) as db:
                n = db.execute(
                    "SELECT COUNT(*) FROM events WHERE session = ? AND kind = 'reply'", (session,)
                ).fetchone()[0]
                users = db.execute(
                    "SELECT COUNT(*) FROM events WHERE session = ? AND kind = 'user'", (session,)
                ).fetchone()[0]
            return int(n) if n == users else -1

        stored = wait_for(lambda: answered() > 0 and answered(), 60, "every message answered")
        st = d.status()
        assert st is not None and st["workers"][0]["pid"] == pid
        grown = st["workers"][0]["rss_bytes"] - rss_before
        assert grown < 64 * 1024 * 1024, f"worker RSS grew by {grown / 1e6:.0f} MB"
        s.close()
        # The client resumes and gets every stored reply.
        r = Client(d.url)
        welcome = r.hello(session, 0)
        assert welcome["resumed"]
        replies = r.until(
            lambda f: f["type"] == "reply" and f["seq"] == welcome["last_seq"], timeout=30
        )
        assert sum(1 for f in replies if f["type"] == "reply") == stored
        r.close()
