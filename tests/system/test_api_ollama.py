"""Ollama's API on chatd's port, judged by the official ``ollama`` Python client and the wire.

A real chatd (2 workers) in front of the fake Ollama, once with the backend spoken to as
Ollama (``api = "ollama"``: the chunks pass through) and once as an OpenAI-compatible server
(``api = "openai"``, the fake's ``/v1``: chatd translates both ways). The client cannot tell.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
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
    url = fake.url  # an "openai" backend is asked /v1/... below its URL
    tmp = tmp_path_factory.mktemp(f"api-{api}")
    with running_chatd(tmp, url, backends=[{"url": url, "api": api, "max_parallel": 4}]) as d:
        d.backend_api = api  # type: ignore[attr-defined]
        yield d


def client(d: Chatd) -> ollama.Client:
    return ollama.Client(host=d.http, timeout=30)


def raw(
    d: Chatd, method: str, path: str, body: Any = None, **headers: str
) -> tuple[int, Any, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def expected(text: str) -> str:
    return "".join(reply_tokens(text, TOKENS))


def test_root_is_ollamas_exact_answer_and_the_page_stays_for_browsers(chatd: Chatd) -> None:
    status, headers, body = raw(chatd, "GET", "/")
    assert (status, body) == (200, b"Ollama is running")
    assert headers["Content-Type"].startswith("text/plain")
    status, headers, body = raw(chatd, "HEAD", "/")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == "17"
    status, headers, body = raw(chatd, "GET", "/", Accept="text/html,application/xhtml+xml")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"<html" in body.lower() or b"<!doctype" in body.lower()
    status, _, page = raw(chatd, "GET", "/chat/")
    assert status == 200 and page == body


def test_version_looks_like_semver(chatd: Chatd) -> None:
    status, _, body = raw(chatd, "GET", "/api/version")
    assert status == 200
    parts = json.loads(body)["version"].split("-")[0].split(".")
    assert len(parts) >= 2 and all(p.isdigit() for p in parts)


def test_list_and_show(chatd: Chatd) -> None:
    c = client(chatd)
    names = [m.model for m in c.list().models]
    assert MODEL in names
    shown = c.show(MODEL)
    assert shown.modelfile is not None or shown.details is not None
    with pytest.raises(ollama.ResponseError) as info:
        c.show("no-such-model:1b")
    assert info.value.status_code == 404
    assert info.value.error == "model 'no-such-model:1b' not found"


def test_chat_streamed_and_not(chatd: Chatd) -> None:
    c = client(chatd)
    messages = [{"role": "user", "content": "tell me a story"}]
    whole = c.chat(model=MODEL, messages=messages)  # stream=False: the client's default
    assert whole.message.role == "assistant"
    assert whole.message.content == expected("tell me a story")
    assert whole.done is True and whole.done_reason == "stop"
    assert whole.eval_count == TOKENS
    parts = list(c.chat(model=MODEL, messages=messages, stream=True))
    assert "".join(p.message.content for p in parts) == expected("tell me a story")
    assert parts[-1].done is True and all(not p.done for p in parts[:-1])
    assert len(parts) >= TOKENS  # a chunk per token, not one buffered answer


def test_generate_streamed_and_not(chatd: Chatd) -> None:
    c = client(chatd)
    assert c.generate(model=MODEL, prompt="write code").response == expected("write code")
    pieces = [p.response for p in c.generate(model=MODEL, prompt="write code", stream=True)]
    assert "".join(pieces) == expected("write code")


def test_ndjson_on_the_wire_has_no_blank_line(chatd: Chatd) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "one two"}]}
    status, headers, data = raw(chatd, "POST", "/api/chat", body)
    assert status == 200
    assert headers["Content-Type"] == "application/x-ndjson"
    assert data.endswith(b"\n")
    lines = data.split(b"\n")[:-1]
    assert all(line.strip() for line in lines)
    chunks = [json.loads(line) for line in lines]
    assert [c["done"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(c["message"]["role"] == "assistant" for c in chunks)
    assert "".join(c["message"]["content"] for c in chunks) == expected("one two")


def test_load_and_unload_take_no_generation(chatd: Chatd) -> None:
    c = client(chatd)
    loaded = c.generate(model=MODEL, prompt="")
    assert loaded.done_reason == "load"
    assert c.chat(model=MODEL, messages=[]).done_reason == "load"
    unloaded = c.generate(model=MODEL, prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"


def test_ps_lists_what_the_ollama_backend_has_loaded(chatd: Chatd) -> None:
    c = client(chatd)
    c.generate(model=MODEL, prompt="")  # a load
    models = [m.model for m in c.ps().models]
    if chatd.backend_api == "ollama":  # type: ignore[attr-defined]
        assert MODEL in models
    else:  # an OpenAI-compatible server has no /api/ps
        assert models == []


def test_the_cli_sequence_on_the_wire(chatd: Chatd) -> None:
    """What ``ollama run`` sends, in order: HEAD /, /api/show, a preload, then a chat."""
    assert raw(chatd, "HEAD", "/")[0] == 200
    assert raw(chatd, "POST", "/api/show", {"model": MODEL})[0] == 200
    status, _, body = raw(chatd, "POST", "/api/generate", {"model": MODEL, "keep_alive": "5m"})
    assert status == 200 and json.loads(body.splitlines()[-1])["done_reason"] == "load"
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    status, _, body = raw(chatd, "POST", "/api/chat", chat)
    assert status == 200
    assert "".join(json.loads(x)["message"]["content"] for x in body.splitlines()) == expected("hi")


def test_embed_and_legacy_embeddings(chatd: Chatd) -> None:
    c = client(chatd)
    out = c.embed(model="nomic-embed-text", input=["first text", "second text"])
    assert len(out.embeddings) == 2
    assert len(out.embeddings[0]) > 0 and out.embeddings[0] != out.embeddings[1]
    again = c.embed(model="nomic-embed-text", input="first text")
    assert again.embeddings[0] == pytest.approx(out.embeddings[0])
    legacy = c.embeddings(model="nomic-embed-text", prompt="first text")
    assert len(legacy.embedding) == len(out.embeddings[0])


def test_langchain_chat_ollama(chatd: Chatd) -> None:
    langchain_ollama = pytest.importorskip("langchain_ollama")
    llm = langchain_ollama.ChatOllama(model=MODEL, base_url=chatd.http)
    assert llm.invoke("a question").content == expected("a question")


def test_every_request_is_logged_without_its_token(chatd: Chatd, tmp_path: Path) -> None:
    raw(chatd, "GET", "/api/tags", Authorization="Bearer sekrit-token-123")
    log = chatd.log()
    assert "GET /api/tags key=127.0.0.1" in log
    assert "sekrit-token-123" not in log


def test_plain_answers_frame_their_body_once(chatd: Chatd) -> None:
    """One Content-Length on every whole answer (aiohttp and others refuse two)."""
    for method, path in (("GET", "/healthz"), ("HEAD", "/healthz"), ("GET", "/nope"),
                         ("GET", "/api/tags"), ("GET", "/")):  # fmt: skip
        _, headers, _ = raw(chatd, method, path)
        assert len(headers.get_all("Content-Length")) == 1, (method, path)
