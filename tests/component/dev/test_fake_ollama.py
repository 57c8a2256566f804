"""The fake Ollama server against the official ``ollama`` client and the raw wire.

Most tests share one in-process FakeOllama on a background thread (knobs reset before each);
one test runs the real ``chatd-fake-ollama`` console script as a subprocess.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import ollama
import orjson
import pytest

from chatd.dev.fake_ollama.main import (
    BUSY_TEXT,
    FakeOllama,
    FakeOllamaThread,
    expected_reply,
    reply_tokens,
)

pytestmark = pytest.mark.timeout(30)

MODEL = "qwen2.5-coder:7b"
OTHER = "tiny:1b"
DEFAULTS = {
    "first_token_ms": 0,
    "token_ms": 0,
    "tokens": 8,
    "hang": False,
    "status": None,
    "error_after_tokens": None,
    "extra_latency_ms": 0,
    "load_ms": 0,
    "fault": None,
    "fault_after_tokens": 0,
    "fault_match": None,
    "fault_bytes": 5 * 1024 * 1024,
    "trickle_ms": 1000,
}
RFC3339NANO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama([MODEL, OTHER])) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeOllama) -> FakeOllama:
    configure(server, **DEFAULTS, reset_stats=True)
    return server


def configure(fake: FakeOllama, **knobs: Any) -> dict[str, Any]:
    r = httpx.post(f"{fake.url}/_fake/config", json=knobs)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def stats(fake: FakeOllama) -> dict[str, int]:
    result: dict[str, int] = httpx.get(f"{fake.url}/_fake/stats").json()
    return result


def wait_for(pred: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def client(fake: FakeOllama) -> ollama.Client:
    return ollama.Client(host=fake.url, timeout=10)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- the reply contract -----------------------------------------------------------------------


def test_expected_reply_is_the_documented_function() -> None:
    assert expected_reply("hello world", 3) == "hello#0 world#1 hello#2"
    assert reply_tokens("", 2) == ("echo#0", " echo#1")
    assert expected_reply("x" * 100, 1) == "x" * 32 + "#0"
    assert expected_reply("a b c", 5).startswith(expected_reply("a b c", 2))


# -- official client -------------------------------------------------------------------------


def test_chat_stream(fake: FakeOllama) -> None:
    text = "hello brave new world"
    messages = [{"role": "system", "content": "be brief"}, *user(text)]
    parts = list(client(fake).chat(MODEL, messages=messages, stream=True))
    assert "".join(p.message.content or "" for p in parts) == expected_reply(text, 8)
    assert all(p.done is False for p in parts[:-1])
    last = parts[-1]
    assert last.done is True and last.done_reason == "stop" and last.eval_count == 8
    assert last.message.content  # the last token rides on the done chunk
    assert last.total_duration and last.prompt_eval_count == 6  # words in all messages


def test_chat_non_stream_ignores_history(fake: FakeOllama) -> None:
    history = [
        {"role": "system", "content": "you are a pirate"},
        *user("first question"),
        {"role": "assistant", "content": "an answer"},
        *user("second question"),
    ]
    r = client(fake).chat(MODEL, messages=history, stream=False)
    assert r.message.content == expected_reply("second question", 8)
    assert r.done is True and r.done_reason == "stop" and r.eval_count == 8
    again = client(fake).chat(MODEL, messages=user("second question"), stream=False)
    assert again.message.content == r.message.content


def test_generate_both_ways_and_num_predict(fake: FakeOllama) -> None:
    c = client(fake)
    parts = list(c.generate(MODEL, "tell me a story", stream=True))
    assert "".join(p.response or "" for p in parts) == expected_reply("tell me a story", 8)
    assert parts[-1].done and parts[-1].done_reason == "stop"
    whole = c.generate(MODEL, "tell me a story", options={"num_predict": 3})
    assert whole.response == expected_reply("tell me a story", 3)
    assert whole.done_reason == "length" and whole.eval_count == 3


def test_list_and_ps(fake: FakeOllama) -> None:
    c = client(fake)
    assert {m.model for m in c.list().models} == {MODEL, OTHER}
    c.chat(OTHER, messages=user("hi"))
    loaded = {m.model: m for m in c.ps().models}
    assert OTHER in loaded
    entry = loaded[OTHER]
    assert entry.expires_at is not None and entry.size_vram and entry.context_length
    assert entry.details is not None and entry.details.format == "gguf"


def test_unknown_model_is_404(fake: FakeOllama) -> None:
    with pytest.raises(ollama.ResponseError) as exc:
        client(fake).chat("nope:1b", messages=user("hi"))
    assert exc.value.status_code == 404
    assert exc.value.error == "model 'nope:1b' not found"


def test_status_knob_503(fake: FakeOllama) -> None:
    configure(fake, status=503)
    with pytest.raises(ollama.ResponseError) as exc:
        list(client(fake).chat(MODEL, messages=user("hi"), stream=True))
    assert exc.value.status_code == 503
    assert (
        exc.value.error
        == BUSY_TEXT
        == ("server busy, please try again.  maximum pending requests exceeded")
    )
    assert stats(fake)["requests_total"] == 1
    configure(fake, status=0)
    assert client(fake).chat(MODEL, messages=user("hi")).done


def test_error_mid_stream(fake: FakeOllama) -> None:
    configure(fake, error_after_tokens=3)
    got = []
    with pytest.raises(ollama.ResponseError) as exc:
        for part in client(fake).chat(MODEL, messages=user("one two"), stream=True):
            got.append(part)
    assert exc.value.status_code == -1
    assert [p.message.content for p in got] == list(reply_tokens("one two", 3))
    assert not any(p.done for p in got)


def test_empty_messages_load_and_unload(fake: FakeOllama) -> None:
    c = client(fake)
    r = c.chat(MODEL, messages=[])
    assert r.done and r.done_reason == "load"
    assert MODEL in {m.model for m in c.ps().models}
    r = c.chat(MODEL, messages=[], keep_alive=0)
    assert r.done_reason == "unload"
    assert MODEL not in {m.model for m in c.ps().models}
    g = c.generate(MODEL, "")
    assert g.done_reason == "load"
    assert stats(fake)["requests_total"] == 0  # loads are not generation requests


def test_bad_requests_are_400(fake: FakeOllama) -> None:
    url = f"{fake.url}/api/chat"
    cases = {
        b"": "missing request body",
        b"{oops": None,
        b'{"messages":[{"role":"user","content":"hi"}]}': "model is required",
    }
    for body, message in cases.items():
        r = httpx.post(url, content=body)
        assert r.status_code == 400, body
        assert isinstance(r.json()["error"], str)
        if message:
            assert r.json()["error"] == message
    # (The official client refuses an empty model itself, before any request.)


# -- raw wire ----------------------------------------------------------------------------------


def test_info_routes(fake: FakeOllama) -> None:
    r = httpx.get(f"{fake.url}/")
    assert r.text == "Ollama is running" and r.headers["content-type"].startswith("text/plain")
    assert httpx.head(f"{fake.url}/").status_code == 200
    assert httpx.get(f"{fake.url}/api/version").json() == {"version": "0.33.0"}
    assert httpx.head(f"{fake.url}/api/version").status_code == 200
    ids = [m["id"] for m in httpx.get(f"{fake.url}/v1/models").json()["data"]]
    assert ids == [MODEL, OTHER]


@pytest.mark.parametrize("token_ms", [0, 5])
def test_ndjson_framing(fake: FakeOllama, token_ms: int) -> None:
    configure(fake, token_ms=token_ms, tokens=5)

    async def fetch() -> tuple[str, bytes]:
        async with aiohttp.ClientSession() as s:
            payload = {"model": MODEL, "messages": user('quote " and \\ and é')}
            async with s.post(f"{fake.url}/api/chat", json=payload) as r:
                assert r.status == 200
                return r.headers["Content-Type"], await r.read()

    ctype, raw = asyncio.run(fetch())
    assert ctype == "application/x-ndjson"
    assert raw.endswith(b"\n") and b"\n\n" not in raw
    chunks = [orjson.loads(line) for line in raw.split(b"\n")[:-1]]
    assert len(chunks) == 5
    for c in chunks:
        assert RFC3339NANO_UTC.match(c["created_at"]), c["created_at"]
        assert c["message"]["role"] == "assistant" and c["model"] == MODEL
    assert [c["done"] for c in chunks] == [False] * 4 + [True]
    final = chunks[-1]
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int) and final[key] > 0
    text = "".join(c["message"]["content"] for c in chunks)
    assert text == expected_reply('quote " and \\ and é', 5)


def test_headers_wait_for_the_first_token(fake: FakeOllama) -> None:
    configure(fake, first_token_ms=400)

    async def time_to_headers() -> float:
        async with aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            payload = {"model": MODEL, "messages": user("hi")}
            async with s.post(f"{fake.url}/api/chat", json=payload) as r:
                elapsed = time.monotonic() - t0
                await r.read()
                return elapsed

    assert asyncio.run(time_to_headers()) >= 0.35


def test_hang_and_disconnects_leave_nothing_in_flight(fake: FakeOllama) -> None:
    configure(fake, hang=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{fake.url}/api/chat", json={"model": MODEL, "messages": user("hi")}, timeout=0.5
        )
    assert httpx.get(f"{fake.url}/api/version", timeout=2).status_code == 200
    assert httpx.get(f"{fake.url}/api/ps", timeout=2).status_code == 200
    wait_for(lambda: stats(fake)["in_flight"] == 0)  # the client gave up: handler cancelled
    configure(fake, hang=False, token_ms=50, tokens=100)

    async def read_one_line_then_leave() -> None:
        async with aiohttp.ClientSession() as s:
            payload = {"model": MODEL, "messages": user("hi")}
            async with s.post(f"{fake.url}/api/chat", json=payload) as r:
                await r.content.readline()

    asyncio.run(read_one_line_then_leave())
    wait_for(lambda: stats(fake)["in_flight"] == 0)
    assert stats(fake)["requests_total"] == 2


def test_stats_and_reset(fake: FakeOllama) -> None:
    # Held by `hang`, all three are in flight at once however slow this machine is.
    configure(fake, hang=True, tokens=5)

    async def three_at_once() -> list[str]:
        async with aiohttp.ClientSession() as s:

            async def one(i: int) -> str:
                payload = {"model": MODEL, "messages": user(f"req {i}"), "stream": False}
                async with s.post(f"{fake.url}/api/chat", json=payload) as r:
                    body = await r.json()
                    return str(body["message"]["content"])

            async def in_flight() -> int:
                async with s.get(f"{fake.url}/_fake/stats") as r:
                    return int((await r.json())["in_flight"])

            tasks = [asyncio.create_task(one(i)) for i in range(3)]
            for _ in range(200):
                if await in_flight() == 3:
                    break
                await asyncio.sleep(0.01)
            assert await in_flight() == 3
            async with s.post(f"{fake.url}/_fake/config", json={"hang": False}) as r:
                assert r.status == 200
            return await asyncio.gather(*tasks)

    assert asyncio.run(three_at_once()) == [expected_reply(f"req {i}", 5) for i in range(3)]
    assert stats(fake) == {"in_flight": 0, "max_in_flight": 3, "requests_total": 3}
    configure(fake, reset_stats=True)
    assert stats(fake) == {"in_flight": 0, "max_in_flight": 0, "requests_total": 0}


def test_config_rejects_bad_knobs(fake: FakeOllama) -> None:
    for body in ({"bogus": 1}, {"tokens": -1}, {"hang": "yes"}, {"status": 200}):
        r = httpx.post(f"{fake.url}/_fake/config", json=body)
        assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(f"{fake.url}/_fake/config").json() == DEFAULTS | {"status": None}


def openai_frames(raw: bytes) -> list[Any]:
    assert raw.endswith(b"\n\n")
    frames = raw.split(b"\n\n")[:-1]
    assert all(f.startswith(b"data: ") for f in frames)
    return [f[6:].decode() if f == b"data: [DONE]" else orjson.loads(f[6:]) for f in frames]


def test_openai_sse_stream_with_usage(fake: FakeOllama) -> None:
    configure(fake, tokens=4)
    payload = {
        "model": MODEL,
        "messages": user("open ai"),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = httpx.post(f"{fake.url}/v1/chat/completions", json=payload)
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    frames = openai_frames(r.content)
    assert frames[-1] == "[DONE]"
    content, finish, usage = frames[:4], frames[4], frames[5]
    assert "".join(f["choices"][0]["delta"]["content"] for f in content) == expected_reply(
        "open ai", 4
    )
    assert all(f["object"] == "chat.completion.chunk" for f in frames[:-1])
    assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert len(frames) == 7

    plain = httpx.post(f"{fake.url}/v1/chat/completions", json=payload | {"stream": False})
    body = plain.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == expected_reply("open ai", 4)
    assert body["choices"][0]["finish_reason"] == "stop"


def test_openai_errors(fake: FakeOllama) -> None:
    r = httpx.post(
        f"{fake.url}/v1/chat/completions", json={"model": "nope", "messages": user("hi")}
    )
    assert r.status_code == 404
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] is None
    configure(fake, error_after_tokens=2)
    r = httpx.post(
        f"{fake.url}/v1/chat/completions",
        json={"model": MODEL, "messages": user("hi"), "stream": True},
    )
    frames = openai_frames(r.content)
    assert len(frames) == 3 and "error" in frames[-1]  # two tokens, the error, no [DONE]


# -- a separate instance: parallel slots and cold loads -----------------------------------------


def test_max_parallel_and_cold_load() -> None:
    with FakeOllamaThread(FakeOllama([MODEL], max_parallel=1, load_ms=200, token_ms=20)) as f:
        c = client(f)
        assert c.ps().models == []

        async def two() -> list[float]:
            async with aiohttp.ClientSession() as s:

                async def one() -> float:
                    payload = {"model": MODEL, "messages": user("x"), "stream": False}
                    async with s.post(f"{f.url}/api/chat", json=payload) as r:
                        body = await r.json()
                        return float(body["load_duration"]) / 1e9

                return list(await asyncio.gather(one(), one()))

        t0 = time.monotonic()
        loads = asyncio.run(two())
        elapsed = time.monotonic() - t0
        # One shared cold load, then the two replies one after the other (7 * 20 ms each).
        assert max(loads) >= 0.18
        assert elapsed >= 0.2 + 2 * 0.14 - 0.03
        assert [m.model for m in c.ps().models] == [MODEL]
        assert stats(f)["max_in_flight"] == 2


# -- the console script ----------------------------------------------------------------------


def test_console_script_subprocess() -> None:
    script = Path(sys.executable).with_name("chatd-fake-ollama")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "chatd.dev.fake_ollama.main"]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--tokens", "3", "--model", OTHER, "--token-ms", "1"],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.fullmatch(r"chatd-fake-ollama listening on http://127\.0\.0\.1:(\d+)\n", line)
        assert m, line
        host = f"http://127.0.0.1:{m.group(1)}"

        async def chat() -> str:
            c = ollama.AsyncClient(host=host, timeout=10)
            parts = [
                p async for p in await c.chat(OTHER, messages=user("sub process"), stream=True)
            ]
            assert parts[-1].done_reason == "stop"
            return "".join(p.message.content or "" for p in parts)

        assert asyncio.run(chat()) == expected_reply("sub process", 3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- faults ------------------------------------------------------------------------------------


def ndjson(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n")
    return raw.split(b"\n")[:-1]


def chat_raw(fake: FakeOllama, text: str) -> bytes:
    r = httpx.post(f"{fake.url}/api/chat", json={"model": MODEL, "messages": user(text)})
    assert r.status_code == 200
    return r.content


@pytest.mark.parametrize("token_ms", [0, 5])
def test_malformed_lines_replace_token_k(fake: FakeOllama, token_ms: int) -> None:
    configure(fake, tokens=5, token_ms=token_ms, fault_after_tokens=2)
    good = list(reply_tokens("a b", 5))
    for kind in ("not_json", "not_object", "no_message"):
        configure(fake, fault=kind)
        lines = ndjson(chat_raw(fake, "a b"))
        assert len(lines) == 5
        assert [orjson.loads(x)["message"]["content"] for x in lines[:2]] == good[:2]
        if kind == "not_json":
            assert lines[2] == b"this is not json"
        elif kind == "not_object":
            assert orjson.loads(lines[2]) == ["not", "an", "object"]
        else:
            bad = orjson.loads(lines[2])
            assert set(bad) == {"model", "created_at", "done"} and bad["done"] is False
        rest = [orjson.loads(x) for x in lines[3:]]
        assert [c["message"]["content"] for c in rest] == good[3:]
        assert rest[-1]["done"] is True


def test_fault_at_the_done_line_and_on_v1(fake: FakeOllama) -> None:
    configure(fake, tokens=3, fault="not_json", fault_after_tokens=10)
    lines = ndjson(chat_raw(fake, "x"))
    assert len(lines) == 3 and lines[-1] == b"this is not json"  # no done line
    configure(fake, fault="no_message", fault_after_tokens=1)
    payload = {"model": MODEL, "messages": user("x"), "stream": True}
    frames = openai_frames(httpx.post(f"{fake.url}/v1/chat/completions", json=payload).content)
    assert "choices" not in frames[1] and frames[1]["object"] == "chat.completion.chunk"
    assert frames[-1] == "[DONE]"


def test_fault_match_limits_the_fault(fake: FakeOllama) -> None:
    configure(fake, tokens=4, fault="not_json", fault_match="BREAK")
    assert ndjson(chat_raw(fake, "please BREAK here"))[0] == b"this is not json"
    parts = list(client(fake).chat(MODEL, messages=user("all fine"), stream=True))
    assert "".join(p.message.content or "" for p in parts) == expected_reply("all fine", 4)
    # A non-streamed request ignores faults.
    whole = client(fake).chat(MODEL, messages=user("BREAK"), stream=False)
    assert whole.message.content == expected_reply("BREAK", 4)


def test_huge_token_with_the_official_client(fake: FakeOllama) -> None:
    configure(fake, tokens=4, fault="huge_token", fault_after_tokens=1, fault_bytes=5 << 20)
    parts = list(client(fake).chat(MODEL, messages=user("big one"), stream=True))
    toks = list(reply_tokens("big one", 4))
    toks[1] = "x" * (5 << 20)
    assert "".join(p.message.content or "" for p in parts) == "".join(toks)
    assert parts[-1].done and parts[-1].eval_count == 4


def test_reset_mid_stream(fake: FakeOllama) -> None:
    configure(fake, tokens=6, token_ms=5, fault="reset", fault_after_tokens=2)

    async def read() -> tuple[list[bytes], BaseException]:
        got: list[bytes] = []
        async with aiohttp.ClientSession() as s:
            payload = {"model": MODEL, "messages": user("reset me")}
            async with s.post(f"{fake.url}/api/chat", json=payload) as r:
                assert r.status == 200
                try:
                    async for line in r.content:
                        got.append(line)
                except aiohttp.ClientError as e:
                    return got, e
        raise AssertionError(f"the stream ended normally after {got}")

    got, exc = asyncio.run(read())
    assert [orjson.loads(x)["message"]["content"] for x in got] == list(reply_tokens("reset me", 2))
    assert isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientOSError), exc
    wait_for(lambda: stats(fake)["in_flight"] == 0)


def http_chunks(fake: FakeOllama, text: str) -> list[bytes]:
    """POST /api/chat on a raw socket; the response body's HTTP chunks as sent."""
    body = orjson.dumps({"model": MODEL, "messages": user(text)})
    head = f"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection((fake.host, fake.port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        raw = b""
        while not raw.endswith(b"\r\n0\r\n\r\n"):
            data = sock.recv(65536)
            assert data, raw
            raw += data
    rest = raw.split(b"\r\n\r\n", 1)[1]
    chunks: list[bytes] = []
    while True:
        size, rest = rest.split(b"\r\n", 1)
        if int(size, 16) == 0:
            return chunks
        chunks.append(rest[: int(size, 16)])
        rest = rest[int(size, 16) + 2 :]


def test_trickle_sends_the_rest_one_byte_at_a_time(fake: FakeOllama) -> None:
    configure(fake, tokens=3, fault="trickle", fault_after_tokens=2, trickle_ms=1)
    chunks = http_chunks(fake, "slow")
    lines = ndjson(b"".join(chunks))
    assert "".join(orjson.loads(x)["message"]["content"] for x in lines) == expected_reply(
        "slow", 3
    )
    assert [len(c) for c in chunks[:2]] == [len(x) + 1 for x in lines[:2]]  # one write a line
    assert [len(c) for c in chunks[2:]] == [1] * (len(lines[2]) + 1)  # then one byte a write


def test_fault_knobs_are_validated(fake: FakeOllama) -> None:
    for body in (
        {"fault": "explode"},
        {"fault_after_tokens": -1},
        {"fault_after_tokens": 1.5},
        {"fault_match": ""},
        {"fault_bytes": 0},
        {"trickle_ms": -1},
    ):
        r = httpx.post(f"{fake.url}/_fake/config", json=body)
        assert r.status_code == 400 and "error" in r.json(), body
