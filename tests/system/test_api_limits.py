"""The APIs under the daemon's bounds and supervision: a client that stops reading a stream is
cut at ``max_outbound_bytes`` (as a WebSocket is), and a reload lets a streamed reply finish.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from chatd.dev.fake_ollama.wire import reply_tokens
from tests.support import BIN, fake_config, running_chatd, t, wait_for

pytestmark = pytest.mark.system

MODEL = "qwen2.5-coder:7b"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama([MODEL], tokens=4)) as f:
        yield f


@pytest.fixture(autouse=True)
def reset(fake: FakeOllama) -> Iterator[None]:
    yield
    fake_config(fake.url, fault=None, token_ms=0, tokens=4)


def request_bytes(body: dict[str, object]) -> bytes:
    data = json.dumps(body)
    return (
        f"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n{data}"
    ).encode()


def test_a_client_that_stops_reading_a_stream_is_cut(tmp_path: Path, fake: FakeOllama) -> None:
    fake_config(fake.url, fault="huge_token", fault_after_tokens=1, fault_bytes=32 * 1024 * 1024)
    with running_chatd(tmp_path, fake.url, limits={"max_outbound_bytes": 262144}) as d:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", d.port))
        body = {"model": MODEL, "messages": [{"role": "user", "content": "big"}]}
        sock.sendall(request_bytes(body))
        # The client reads nothing: the worker buffers past the bound and cuts it.
        wait_for(lambda: "stopped reading a stream: cut" in d.log(), 30, "the slow reader cut")
        sock.settimeout(t(10))
        received = 0
        try:  # what the kernel held, then the end (an EOF or a reset)
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        sock.close()
        assert received < 32 * 1024 * 1024
        # The worker serves the others as before.
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
        conn.request("GET", "/api/tags")
        assert conn.getresponse().status == 200


def test_a_reload_lets_a_streamed_reply_finish(tmp_path: Path, fake: FakeOllama) -> None:
    fake_config(fake.url, token_ms=100, tokens=20)
    with running_chatd(tmp_path, fake.url) as d:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "during reload"}]}
        conn.request("POST", "/api/chat", json.dumps(body))
        resp = conn.getresponse()
        assert resp.status == 200
        first = json.loads(resp.readline())
        reload = subprocess.Popen(
            [str(BIN / "chatctl"), "--socket", d.socket, "reload"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        rest = [json.loads(line) for line in resp.read().splitlines()]
        conn.close()
        assert reload.wait(t(60)) == 0
        chunks = [first, *rest]
        assert chunks[-1]["done"] is True
        text = "".join(c["message"]["content"] for c in chunks)
        assert text == "".join(reply_tokens("during reload", 20))
