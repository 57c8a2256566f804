"""A real language model end to end: chatd relaying to llama.cpp's server running SmolLM2-135M.

This is the path of ``make run`` on a machine without Ollama: the OpenAI API (SSE), a server
that closes its connection after each streamed reply, real token timing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatd.dev.local_model.main import BUNDLED_MODEL_NAME, start_local_model
from tests.support import Chatd, Client, running_chatd, t

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def model_url() -> Iterator[str]:
    proc, url = start_local_model(0, args=["--max-tokens", "24", "--parallel", "2"])
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(t(15))


@pytest.fixture(scope="module")
def chatd(model_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chatd]:
    with running_chatd(
        tmp_path_factory.mktemp("real"),
        model_url,
        workers=1,
        llm={"model": BUNDLED_MODEL_NAME, "first_token_timeout": 60.0, "idle_timeout": 30.0},
        backends=[{"url": model_url, "api": "openai", "max_parallel": 2}],
    ) as d:
        yield d


def test_a_conversation_with_a_real_model(chatd: Chatd) -> None:
    """Three turns: each acked, streamed in real tokens, replied and stored in order."""
    c = Client(chatd.url)
    session = c.hello()["session"]
    questions = ["What is the capital of France?", "Name a colour.", "Say hello."]
    for n, question in enumerate(questions):
        frames = c.ask(
            f"q{n}",
            question,
        )
        assert frames[0] == {"type": "ack", "id": f"q{n}", "seq": 2 * n + 1}
        reply = frames[-1]
        assert reply["type"] == "reply", reply
        assert reply["seq"] == 2 * n + 2 and reply["done_reason"] in ("stop", "length")
        assert reply["text"].strip(), "the model said nothing"
        streamed = "".join(f["text"] for f in frames if f["type"] == "token")
        assert streamed and reply["text"].startswith(streamed)  # a real model streams
        assert reply["stats"]["tokens"] >= 1 and reply["stats"]["ttft_ms"] > 0
    c.close()
    with sqlite3.connect(Path(chatd.db)) as db:
        kinds = [
            k
            for (k,) in db.execute(
                "SELECT kind FROM events WHERE session=? ORDER BY seq", (session,)
            )
        ]
    assert kinds == ["user", "reply"] * 3


def test_two_clients_at_once(chatd: Chatd) -> None:
    """Two sessions generate concurrently on the model's two slots."""
    a, b = Client(chatd.url), Client(chatd.url)
    a.hello()
    b.hello()
    a.send({"type": "message", "id": "a", "text": "Count to five."})
    b.send({"type": "message", "id": "b", "text": "Name a fruit."})
    ra = a.until(lambda f: f["type"] in ("reply", "error") and f.get("id") == "a", timeout=90)[-1]
    rb = b.until(lambda f: f["type"] in ("reply", "error") and f.get("id") == "b", timeout=90)[-1]
    assert ra["type"] == rb["type"] == "reply", (ra, rb)
    a.close()
    b.close()


def test_the_official_clients_with_a_real_model(chatd: Chatd) -> None:
    """ollama-python and the openai SDK through chatd to llama.cpp: chatd translates
    Ollama's API to the server's OpenAI API, and relays OpenAI's as it is."""
    import ollama
    import openai

    client = ollama.Client(host=chatd.http, timeout=120)
    assert BUNDLED_MODEL_NAME in [m.model for m in client.list().models]
    question = [{"role": "user", "content": "Say hello."}]
    whole = client.chat(model=BUNDLED_MODEL_NAME, messages=question)
    assert whole.message.content.strip() and whole.done_reason in ("stop", "length")
    parts = list(client.chat(model=BUNDLED_MODEL_NAME, messages=question, stream=True))
    assert len(parts) > 2 and parts[-1].done  # real tokens, one chunk each
    assert "".join(p.message.content for p in parts).strip()
    assert client.generate(model=BUNDLED_MODEL_NAME, prompt="The sky is").response.strip()

    sdk = openai.OpenAI(base_url=f"{chatd.http}/v1", api_key="unused", timeout=120)
    chunks = list(
        sdk.chat.completions.create(
            model=BUNDLED_MODEL_NAME,
            messages=question,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
