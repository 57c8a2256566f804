"""OpenAI's API on chatd's port, judged by the official ``openai`` Python SDK and the wire.

The same real chatd in front of the fake Ollama, with the backend spoken to as Ollama (chatd
translates) and as an OpenAI-compatible server (the fake's ``/v1``).
"""

from __future__ import annotations

import base64
import http.client
import json
import struct
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from chatd.dev.fake_ollama.wire import reply_tokens
from tests.support import Chatd, running_chatd

pytestmark = pytest.mark.system

MODEL = "qwen2.5-coder:7b"
TOKENS = 6


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama([MODEL, "nomic-embed-text"], tokens=TOKENS)) as f:
        yield f


@pytest.fixture(scope="module", params=["ollama", "openai"])
def chatd(
    request: pytest.FixtureRequest, fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Chatd]:
    api = request.param
    tmp = tmp_path_factory.mktemp(f"v1-{api}")
    backends = [{"url": fake.url, "api": api, "max_parallel": 4}]
    with running_chatd(tmp, fake.url, backends=backends) as d:
        yield d


def sdk(d: Chatd, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{d.http}/v1", api_key="unused", timeout=30, **kwargs)


def expected(text: str) -> str:
    return "".join(reply_tokens(text, TOKENS))


def sse_events(data: bytes) -> list[bytes]:
    assert data.endswith(b"\n\n")
    events = data[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") for e in events)
    return [e[len(b"data: ") :] for e in events]


def test_chat_stream_with_usage(chatd: Chatd) -> None:
    stream = sdk(chatd).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello there"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected("hello there")
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == ["stop"]
    assert finish[0].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == TOKENS
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_chat_not_streamed(chatd: Chatd) -> None:
    out = sdk(chatd).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}]
    )
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected("hello there")
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.completion_tokens == TOKENS


def test_sse_on_the_wire_ends_with_done(chatd: Chatd) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", chatd.port, timeout=30)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    events = sse_events(resp.read())
    conn.close()
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "usage" not in chunks[0]  # not asked for: no usage member at all
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_models_list_and_retrieve(chatd: Chatd) -> None:
    client = sdk(chatd)
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_completions(chatd: Chatd) -> None:
    out = sdk(chatd).completions.create(model=MODEL, prompt="def fib", max_tokens=50)
    assert out.choices[0].text == expected("def fib")
    pieces = sdk(chatd).completions.create(model=MODEL, prompt="def fib", stream=True)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == expected("def fib")


def test_embeddings(chatd: Chatd) -> None:
    client = sdk(chatd)
    out = client.embeddings.create(model="nomic-embed-text", input=["a text", "another"])
    assert [d.index for d in out.data] == [0, 1]
    assert len(out.data[0].embedding) > 0
    # Without encoding_format the SDK asks base64 and decodes it itself (out, above); asked
    # explicitly, it hands the string over: little-endian float32s, as OpenAI sends them.
    b64 = client.embeddings.create(
        model="nomic-embed-text", input="a text", encoding_format="base64"
    )
    raw = base64.b64decode(str(b64.data[0].embedding))
    floats = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert floats == pytest.approx(out.data[0].embedding, rel=1e-6)
