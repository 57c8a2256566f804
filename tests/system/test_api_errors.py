"""Every error of the Ollama and OpenAI APIs, in each API's own shape, through a real chatd.

Ollama's shape is ``{"error": "..."}``; OpenAI's ``{"error": {"message", "type", "param",
"code"}}``. Failures before the first chunk carry their status; after it, they are written in
the stream (an NDJSON ``{"error"}`` line; an SSE ``data: {"error": ...}`` event and no
``[DONE]``) and the official clients raise them.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

import ollama
import openai
import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from tests.support import Chatd, fake_config, free_port, running_chatd

pytestmark = pytest.mark.system

MODEL = "qwen2.5-coder:7b"
TOKEN = "api-token-1"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama([MODEL], tokens=4)) as f:
        yield f


@pytest.fixture(autouse=True)
def healthy_fake(fake: FakeOllama) -> Iterator[None]:
    yield
    fake_config(fake.url, status=0, error_after_tokens=None, hang=False)


@pytest.fixture(scope="module")
def chatd(fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chatd]:
    tmp = tmp_path_factory.mktemp("api-errors")
    with running_chatd(
        tmp, fake.url, auth={"tokens": [TOKEN]}, api={"max_body_bytes": 131072}
    ) as d:
        yield d


def call(
    d: Chatd, method: str, path: str, body: Any = None, token: str | None = TOKEN, raw: bytes = b""
) -> tuple[int, Any, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        data = raw or (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def ollama_shape(body: bytes) -> str:
    obj = json.loads(body)
    assert set(obj) == {"error"} and isinstance(obj["error"], str)
    return str(obj["error"])


def openai_shape(body: bytes) -> dict[str, Any]:
    obj = json.loads(body)
    assert set(obj) == {"error"}
    assert set(obj["error"]) == {"message", "type", "param", "code"}
    return obj["error"]  # type: ignore[no-any-return]


def test_401_in_both_shapes(chatd: Chatd) -> None:
    status, headers, body = call(chatd, "POST", "/api/chat", CHAT, token=None)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert "API key" in ollama_shape(body)
    status, _, body = call(chatd, "POST", "/v1/chat/completions", CHAT, token="wrong")
    assert status == 401
    assert openai_shape(body)["type"] == "authentication_error"
    # Ollama's health check stays open (the ollama CLI sends it without a token).
    assert call(chatd, "HEAD", "/", token=None)[0] == 200
    with pytest.raises(ollama.ResponseError) as info:
        ollama.Client(host=chatd.http).list()
    assert info.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{chatd.http}/v1", api_key="wrong").models.list()
    assert ollama.Client(host=chatd.http, headers={"Authorization": f"Bearer {TOKEN}"}).list()


def test_400_bad_json_names_the_problem(chatd: Chatd) -> None:
    status, _, body = call(chatd, "POST", "/api/chat", raw=b"{not json")
    assert status == 400 and "invalid JSON" in ollama_shape(body)
    status, _, body = call(chatd, "POST", "/v1/chat/completions", {"model": MODEL})
    assert status == 400
    err = openai_shape(body)
    assert err["type"] == "invalid_request_error" and err["param"] == "messages"
    status, _, body = call(chatd, "POST", "/api/generate", {"prompt": "x"})
    assert status == 400 and ollama_shape(body) == "model is required"


def test_404_405_403_in_both_shapes(chatd: Chatd) -> None:
    status, _, body = call(chatd, "GET", "/api/nothing")
    assert status == 404 and "no such endpoint" in ollama_shape(body)
    status, _, body = call(chatd, "GET", "/v1/nothing")
    assert status == 404 and openai_shape(body)["type"] == "not_found_error"
    status, headers, body = call(chatd, "GET", "/api/chat")
    assert status == 405 and headers["Allow"] == "POST"
    ollama_shape(body)
    status, _, body = call(chatd, "POST", "/api/pull", {"model": MODEL})
    assert status == 403 and "model management" in ollama_shape(body)


def test_unknown_model_is_the_backends_404(chatd: Chatd) -> None:
    body = {**CHAT, "model": "missing:1b"}
    status, _, data = call(chatd, "POST", "/api/chat", body)
    assert status == 404 and "missing:1b" in ollama_shape(data)
    status, _, data = call(chatd, "POST", "/v1/chat/completions", body)
    assert status == 404 and openai_shape(data)["type"] == "not_found_error"


def test_mid_stream_error_is_written_in_the_stream(chatd: Chatd, fake: FakeOllama) -> None:
    fake_config(fake.url, error_after_tokens=2)
    status, _, data = call(chatd, "POST", "/api/chat", {**CHAT, "stream": True})
    assert status == 200
    lines = data.splitlines()
    assert len(lines) == 3 and all(lines)
    assert "error" in json.loads(lines[-1]) and "done" not in json.loads(lines[-1])
    client = ollama.Client(host=chatd.http, headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(ollama.ResponseError) as info:
        list(client.chat(model=MODEL, messages=CHAT["messages"], stream=True))
    assert info.value.status_code == -1  # an error inside the stream, as Ollama's own

    status, _, data = call(chatd, "POST", "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200
    events = data.strip().split(b"\n\n")
    assert events[-1] != b"data: [DONE]"
    err = json.loads(events[-1][len(b"data: ") :])["error"]
    assert err["type"] == "server_error" and err["message"]
    sdk = openai.OpenAI(base_url=f"{chatd.http}/v1", api_key=TOKEN)
    with pytest.raises(openai.APIError):
        list(sdk.chat.completions.create(model=MODEL, messages=CHAT["messages"], stream=True))


def test_backend_error_before_the_first_chunk_keeps_its_status(
    chatd: Chatd, fake: FakeOllama
) -> None:
    fake_config(fake.url, status=400)
    status, _, data = call(chatd, "POST", "/api/chat", {**CHAT, "stream": True})
    assert status == 400
    ollama_shape(data)
    status, _, data = call(chatd, "POST", "/v1/chat/completions", CHAT)
    assert status == 400 and openai_shape(data)["type"] == "invalid_request_error"


def test_no_backend_is_a_502_in_both_shapes(tmp_path: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with running_chatd(tmp_path, dead) as d:
        status, _, data = call(d, "POST", "/api/chat", CHAT, token=None)
        assert status in (502, 503)
        assert ollama_shape(data)
        status, _, data = call(d, "POST", "/v1/chat/completions", CHAT, token=None)
        assert status in (502, 503) and openai_shape(data)["type"] == "server_error"
        # /api/show cannot say "not found" when no backend could be asked (the CLI would
        # offer to pull).
        status, _, data = call(d, "POST", "/api/show", {"model": "m"}, token=None)
        assert status == 502 and "could say" in ollama_shape(data)


def test_repeated_headers_are_refused_not_crashed_on(chatd: Chatd) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", chatd.port, timeout=30)
    conn.putrequest("GET", "/api/tags")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 401  # two tokens: neither is believed
    ollama_shape(resp.read())
    conn.putrequest("GET", "/")
    conn.putheader("Accept", "text/plain")
    conn.putheader("Accept", "text/html")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/html")
    resp.read()
    conn.close()
    assert "Traceback" not in chatd.log()


def test_a_body_over_the_bound_is_a_413_in_the_apis_shape(chatd: Chatd) -> None:
    big = json.dumps({**CHAT, "pad": "x" * 200_000}).encode()
    status, _, body = call(chatd, "POST", "/api/chat", raw=big)
    assert status == 413 and "body over 131072 bytes" in ollama_shape(body)
    status, _, body = call(chatd, "POST", "/v1/chat/completions", raw=big)
    assert status == 413 and openai_shape(body)["code"] == "request_too_large"
    # Told in advance (Expect: 100-continue), the client is refused without sending it.
    sock = socket.create_connection(("127.0.0.1", chatd.port), timeout=10)
    sock.sendall(
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 200\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
    )
    assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    sock.close()


def test_a_foreign_web_page_cannot_use_the_apis(chatd: Chatd) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", chatd.port, timeout=30)
    headers = {"Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"}
    conn.request("POST", "/api/chat", json.dumps(CHAT), headers)
    resp = conn.getresponse()
    assert resp.status == 403 and "evil.example" in ollama_shape(resp.read())
    # The page chatd serves itself (same origin) may.
    headers["Origin"] = f"http://127.0.0.1:{chatd.port}"
    conn.request("GET", "/api/tags", headers=headers)
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read()
    conn.close()


def test_a_base_url_ending_in_a_slash_still_reaches_the_api(chatd: Chatd) -> None:
    status, _, body = call(chatd, "POST", "//api/chat", {**CHAT, "stream": False})
    assert status == 200 and json.loads(body)["done"] is True
