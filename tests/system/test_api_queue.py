"""The APIs' requests in the master's queue: round robin across keys, per-key bounds (429),
the global bound (503), and a client that leaves while queued.

One LLM slot daemon-wide (``max_parallel = 1``) in front of the fake Ollama. Assertions are on
order and counts (which request reached the backend when, what the queue holds), never on
durations.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from tests.support import Chatd, fake_config, http_get, running_chatd, wait_for

pytestmark = pytest.mark.system

MODEL = "qwen2.5-coder:7b"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama([MODEL], tokens=4)) as f:
        yield f


@pytest.fixture(autouse=True)
def reset(fake: FakeOllama) -> Iterator[None]:
    fake_config(fake.url, hang=False, token_ms=0, reset_stats=True)
    yield
    fake_config(fake.url, hang=False, token_ms=0)


def start(tmp: Path, fake: FakeOllama, **limits: Any) -> Any:
    return running_chatd(
        tmp,
        fake.url,
        backends=[{"url": fake.url, "max_parallel": 1}],
        llm={"max_queue": limits.pop("max_queue", 64), "first_token_timeout": 60.0},
        limits=limits,
        auth={"tokens": ["flood", "light"]},
    )


def key_of(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def post(d: Chatd, token: str, text: str, path: str = "/api/chat") -> tuple[int, Any, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": True}
    try:
        conn.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def in_background(fn: Any, *args: Any) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def queued(d: Chatd) -> int:
    st = d.status()
    return int(st["queue"]["depth"]) if st else -1


def arrivals(fake: FakeOllama) -> list[str]:
    """The last user message of each generation request the fake received, in order."""
    _, _, body = http_get(f"{fake.url}/_fake/requests")
    out = []
    for r in json.loads(body)["requests"]:
        msgs = r.get("messages") or []
        if msgs:
            out.append(msgs[-1]["content"])
    return out


def test_a_flooder_cannot_starve_a_light_key(tmp_path: Path, fake: FakeOllama) -> None:
    with start(tmp_path, fake) as d:
        fake_config(fake.url, hang=True)
        threads = [in_background(post, d, "flood", f"flood {i}") for i in range(6)]
        wait_for(lambda: queued(d) == 5, 20, "the flooder's backlog queued")
        light = in_background(post, d, "light", "light one")
        wait_for(lambda: queued(d) == 6, 20, "the light request queued")
        fake_config(fake.url, hang=False)
        for t in [*threads, light]:
            t.join(60)
        order = arrivals(fake)
        assert len(order) == 7
        # The first flood request held the slot without queueing. Round robin then serves
        # the keys in ring order, the flooder's (queued first) then the light one: the light
        # request is at most the second one granted from the queue, not the sixth (FIFO).
        assert order.index("light one") <= 2, order
        assert order[0].startswith("flood")


def test_a_key_over_its_bound_gets_429_and_others_do_not(tmp_path: Path, fake: FakeOllama) -> None:
    with start(tmp_path, fake, max_queued_per_key=2) as d:
        fake_config(fake.url, hang=True)
        threads = [in_background(post, d, "flood", f"flood {i}") for i in range(3)]
        wait_for(lambda: queued(d) == 2, 20, "two of the flooder's queued")
        status, headers, body = post(d, "flood", "one too many")
        assert status == 429 and headers["Retry-After"] == "1"
        assert "too many requests" in json.loads(body)["error"]
        status, headers, body = post(d, "flood", "one too many", "/v1/chat/completions")
        assert status == 429 and json.loads(body)["error"]["type"] == "rate_limit_error"
        light = in_background(post, d, "light", "light one")  # not refused: its own bound
        wait_for(lambda: queued(d) == 3, 20, "the light request queued")
        fake_config(fake.url, hang=False)
        for t in [*threads, light]:
            t.join(60)


def test_the_openai_sdk_retries_a_429(tmp_path: Path, fake: FakeOllama) -> None:
    with start(tmp_path, fake, max_queued_per_key=1) as d:
        fake_config(fake.url, hang=True)
        threads = [in_background(post, d, "flood", f"flood {i}") for i in range(2)]
        wait_for(lambda: queued(d) == 1, 20, "the flooder's queue full")

        def release_after_the_first_429() -> None:
            wait_for(lambda: "status=429" in d.log(), 20, "a 429 answered")
            fake_config(fake.url, hang=False)

        releaser = in_background(release_after_the_first_429)
        sdk = openai.OpenAI(base_url=f"{d.http}/v1", api_key="flood", max_retries=5)
        out = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert out.choices[0].message.content
        releaser.join(20)
        for t in threads:
            t.join(60)
        assert "status=429" in d.log()


def test_a_full_queue_is_ollamas_503(tmp_path: Path, fake: FakeOllama) -> None:
    with start(tmp_path, fake, max_queue=1) as d:
        fake_config(fake.url, hang=True)
        threads = [in_background(post, d, "flood", f"flood {i}") for i in range(2)]
        wait_for(lambda: queued(d) == 1, 20, "the queue full")
        status, headers, body = post(d, "light", "no room")
        assert status == 503 and headers["Retry-After"]
        assert json.loads(body) == {
            "error": "server busy, please try again.  maximum pending requests exceeded"
        }
        sdk = openai.OpenAI(base_url=f"{d.http}/v1", api_key="light", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 503
        fake_config(fake.url, hang=False)
        for t in threads:
            t.join(60)


def test_a_client_that_leaves_while_queued_leaves_the_queue(
    tmp_path: Path, fake: FakeOllama
) -> None:
    with start(tmp_path, fake) as d:
        fake_config(fake.url, hang=True)
        holder = in_background(post, d, "flood", "holds the slot")
        wait_for(lambda: fake_stats_in_flight(fake) == 1, 20, "the slot taken")
        sock = socket.create_connection(("127.0.0.1", d.port))
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "gone"}]})
        sock.sendall(
            f"POST /api/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer light\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        wait_for(lambda: queued(d) == 1, 20, "the request queued")
        sock.close()
        wait_for(lambda: queued(d) == 0, 20, "the request left the queue")
        fake_config(fake.url, hang=False)
        holder.join(60)
        assert "gone" not in arrivals(fake)


def fake_stats_in_flight(fake: FakeOllama) -> int:
    _, _, body = http_get(f"{fake.url}/_fake/stats")
    return int(json.loads(body)["in_flight"])


def test_a_client_that_leaves_mid_reply_cancels_the_backend_request(
    tmp_path: Path, fake: FakeOllama
) -> None:
    fake_config(fake.url, token_ms=200, tokens=100)  # 20 s of reply, unless cancelled
    with start(tmp_path, fake) as d:
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "long"}]}
        conn.request("POST", "/api/chat", json.dumps(body), {"Authorization": "Bearer light"})
        resp = conn.getresponse()
        assert json.loads(resp.readline())["done"] is False  # the reply is streaming
        assert fake_stats_in_flight(fake) == 1
        conn.close()  # the client leaves in the middle of the reply
        wait_for(lambda: fake_stats_in_flight(fake) == 0, 10, "the backend request cancelled")
        fake_config(fake.url, token_ms=0, tokens=4)
        # The only slot came back: another client's request is served (it would wait for
        # ever behind a slot that leaked).
        status, _, _ = post(d, "flood", "the slot came back")
        assert status == 200
        assert arrivals(fake)[-1] == "the slot came back"
        assert "status=499" in d.log()  # the access log says the client left
