"""The fake Ollama's wider API: HEAD, /api/show, embeddings, /v1/completions, /v1/models/{id},
load and unload, and what each model (chat, coder, thinking, embedding) accepts.

Each answer is checked as Ollama v0.33 (server/routes.go, api/types.go, middleware/openai.go,
openai/openai.go) gives it: through the official ``ollama`` client where it has a call for it,
and on the exact JSON and SSE bytes for the /v1 endpoints. One in-process FakeOllama serves the
module (knobs and counters reset before each test); the max_parallel test has its own.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
import struct
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import ollama
import orjson
import pytest

from chatd.dev.fake_ollama.main import (
    BUSY_TEXT,
    EMBED_DIM,
    FakeOllama,
    FakeOllamaThread,
    embedding,
    expected_reply,
    reply_tokens,
)

pytestmark = pytest.mark.timeout(30)

CODER = "qwen2.5-coder:7b"  # completion, tools, insert
CHAT = "tiny:1b"  # completion, tools
THINKER = "qwen3:8b"  # completion, tools, thinking
EMBED = "nomic-embed-text:latest"  # embedding
MODELS = [CODER, CHAT, THINKER, EMBED]
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
    "trickle_ms": 1000,
}
NO_EMBEDDINGS = "This server does not support embeddings. Start it with `--embeddings`"
CMPL_ID = re.compile(r"^cmpl-\d+$")


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama(MODELS)) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeOllama) -> FakeOllama:
    configure(server, **DEFAULTS, reset_stats=True)
    for model in MODELS:  # nothing loaded: each test sees its own loads
        post(server, "/api/generate", {"model": model, "keep_alive": 0})
    return server


def configure(fake: FakeOllama, **knobs: Any) -> None:
    r = httpx.post(f"{fake.url}/_fake/config", json=knobs)
    assert r.status_code == 200, r.text


def post(fake: FakeOllama, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(f"{fake.url}{path}", json=body, timeout=10, **kw)


def stats(fake: FakeOllama) -> dict[str, int]:
    result: dict[str, int] = httpx.get(f"{fake.url}/_fake/stats").json()
    return result


def recent(fake: FakeOllama) -> list[tuple[str, dict[str, Any]]]:
    got = httpx.get(f"{fake.url}/_fake/requests").json()
    assert len(got["paths"]) == len(got["requests"])
    return list(zip(got["paths"], got["requests"], strict=True))


def client(fake: FakeOllama) -> ollama.Client:
    return ollama.Client(host=fake.url, timeout=10)


def loaded(fake: FakeOllama) -> set[str]:
    return {m.model or "" for m in client(fake).ps().models}


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def openai_error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def sse(raw: bytes) -> list[Any]:
    """The SSE events of a /v1 stream: each a JSON object, or the string "[DONE]"."""
    assert raw.endswith(b"\n\n")
    events = raw.split(b"\n\n")[:-1]
    assert all(e.startswith(b"data: ") for e in events), raw
    return [e[6:].decode() if e == b"data: [DONE]" else orjson.loads(e[6:]) for e in events]


def f32(x: float) -> float:
    """``x`` as the float32 it stands for."""
    value: float = struct.unpack("<f", struct.pack("<f", x))[0]
    return value


# -- HEAD and version ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/api/version", "/api/tags"])
def test_head_answers_like_get_without_a_body(fake: FakeOllama, path: str) -> None:
    get = httpx.get(f"{fake.url}{path}")
    head = httpx.head(f"{fake.url}{path}")
    assert get.status_code == head.status_code == 200
    assert head.content == b""
    for name in ("content-type", "content-length"):
        assert head.headers[name] == get.headers[name]
    assert int(head.headers["content-length"]) == len(get.content) > 0


def test_head_elsewhere_is_405_as_in_ollama(fake: FakeOllama) -> None:
    for path in ("/api/ps", "/v1/models", f"/v1/models/{CHAT}"):
        assert httpx.head(f"{fake.url}{path}").status_code == 405, path


def test_version_is_semver(fake: FakeOllama) -> None:
    body = httpx.get(f"{fake.url}/api/version").json()  # the client has no call for it
    assert set(body) == {"version"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", body["version"]), body


# -- /api/show ----------------------------------------------------------------------------------


def test_show_a_coder_model_with_the_official_client(fake: FakeOllama) -> None:
    r = client(fake).show(CODER)
    assert r.capabilities == ["completion", "tools", "insert"]
    assert r.template is not None
    assert "{{ .Prompt }}" in r.template and "{{ .Suffix }}" in r.template  # FIM
    assert r.details is not None and r.details.format == "gguf"
    assert r.details.family == "qwen2" and r.details.families == ["qwen2"]
    assert r.details.parameter_size == "7B" and r.details.quantization_level == "Q4_K_M"
    info = r.modelinfo or {}
    assert info["general.architecture"] == "qwen2"
    assert isinstance(info["general.parameter_count"], int)
    assert info["qwen2.context_length"] > 0
    assert r.parameters is not None and re.match(r"num_ctx +4096\n", r.parameters)
    assert 'stop                           "<|im_end|>"' in r.parameters.split("\n")
    assert r.license and r.modelfile is not None
    assert r.modelfile.startswith('# Modelfile generated by "ollama show"\n')
    assert f"# FROM {CODER}\n" in r.modelfile and "\nPARAMETER num_ctx 4096\n" in r.modelfile
    tags = httpx.get(f"{fake.url}/api/tags").json()["models"]
    raw = post(fake, "/api/show", {"model": CODER}).json()
    assert raw["modified_at"] == tags[0]["modified_at"]


def test_show_body_fields_in_ollamas_order(fake: FakeOllama) -> None:
    for model, caps in [
        (CHAT, ["completion", "tools"]),
        (THINKER, ["completion", "tools", "thinking"]),
        (EMBED, ["embedding"]),
    ]:
        r = post(fake, "/api/show", {"model": model})
        assert r.status_code == 200
        body = r.json()
        assert list(body) == [
            "license",
            "modelfile",
            "parameters",
            "template",
            "details",
            "model_info",
            "capabilities",
            "modified_at",
        ]
        assert body["capabilities"] == caps, model
        assert "{{ .Prompt }}" in body["template"]
        assert "{{ .Suffix }}" not in body["template"]
    thinker = post(fake, "/api/show", {"model": THINKER}).json()
    assert "<think>" in thinker["template"]


def test_show_an_embedding_model(fake: FakeOllama) -> None:
    r = client(fake).show("nomic-embed-text")  # a bare name is its :latest
    assert r.capabilities == ["embedding"]
    assert r.details is not None and r.details.family == "nomic-bert"
    info = r.modelinfo or {}
    assert info["nomic-bert.embedding_length"] == EMBED_DIM


def test_show_takes_the_legacy_name_key(fake: FakeOllama) -> None:
    r = post(fake, "/api/show", {"name": CHAT})
    assert r.status_code == 200 and r.json()["capabilities"] == ["completion", "tools"]


def test_show_errors(fake: FakeOllama) -> None:
    with pytest.raises(ollama.ResponseError) as exc:
        client(fake).show("nope:1b")
    assert exc.value.status_code == 404 and exc.value.error == "model 'nope:1b' not found"
    # Ollama names the model as it resolved it: a bare name gets its :latest.
    r = post(fake, "/api/show", {"model": "nope"})
    assert r.status_code == 404 and r.json() == {"error": "model 'nope:latest' not found"}
    r = post(fake, "/api/show", {})
    assert r.status_code == 400 and r.json() == {"error": "model is required"}
    r = httpx.post(f"{fake.url}/api/show", content=b"")
    assert r.status_code == 400 and r.json() == {"error": "missing request body"}
    r = post(fake, "/api/show", {"model": 7})
    assert r.status_code == 400
    go_error = "json: cannot unmarshal number into Go struct field ShowRequest.model of type string"
    assert r.json() == {"error": go_error}


# -- listings -----------------------------------------------------------------------------------


def test_list_has_the_embedding_model_and_capabilities(fake: FakeOllama) -> None:
    assert [m.model for m in client(fake).list().models] == MODELS
    tags = httpx.get(f"{fake.url}/api/tags").json()["models"]
    assert list(tags[0]) == [
        "name",
        "model",
        "modified_at",
        "size",
        "digest",
        "details",
        "capabilities",
    ]
    caps = {m["model"]: m["capabilities"] for m in tags}
    assert caps == {
        CODER: ["completion", "tools", "insert"],
        CHAT: ["completion", "tools"],
        THINKER: ["completion", "tools", "thinking"],
        EMBED: ["embedding"],
    }


def test_v1_model_by_id(fake: FakeOllama) -> None:
    listed = httpx.get(f"{fake.url}/v1/models").json()["data"]
    assert [m["id"] for m in listed] == MODELS
    r = httpx.get(f"{fake.url}/v1/models/{CHAT}")
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["id", "object", "created", "owned_by"]
    assert body == {"id": CHAT, "object": "model", "created": listed[1]["created"]} | {
        "owned_by": "library"
    }
    r = httpx.get(f"{fake.url}/v1/models/nope")
    assert r.status_code == 404
    assert r.json() == openai_error("model 'nope:latest' not found", "not_found_error")


# -- load and unload ----------------------------------------------------------------------------


def test_generate_load_and_unload_show_in_ps(fake: FakeOllama) -> None:
    c = client(fake)
    assert loaded(fake) == set()
    assert c.generate(CHAT, "").done_reason == "load"
    assert loaded(fake) == {CHAT}
    r = c.generate(CHAT, "", keep_alive=0)
    assert r.done and r.done_reason == "unload" and r.response == ""
    assert loaded(fake) == set()
    raw = post(fake, "/api/generate", {"model": CHAT, "prompt": "", "keep_alive": "0s"}).json()
    assert list(raw) == ["model", "created_at", "response", "done", "done_reason"]
    assert raw["done_reason"] == "unload"
    assert stats(fake)["requests_total"] == 0  # loads and unloads are no generations


def test_an_embedding_model_loads_by_embedding_and_unloads_like_any(fake: FakeOllama) -> None:
    c = client(fake)
    assert c.embed(EMBED, []).embeddings == []  # an empty input loads
    assert loaded(fake) == {EMBED}
    # Unloading comes before Ollama's capability check: it works on an embedding model.
    assert c.generate(EMBED, "", keep_alive=0).done_reason == "unload"
    assert loaded(fake) == set()
    c.embed(EMBED, "x", keep_alive=0)  # embeds, then unloads at once
    assert loaded(fake) == set()
    c.embeddings(EMBED, "x")
    assert loaded(fake) == {EMBED}


# -- /api/generate's fields and what each model accepts -----------------------------------------


def test_generate_accepts_ollamas_fields_and_records_them(fake: FakeOllama) -> None:
    configure(fake, tokens=4)
    body = {
        "model": CODER,
        "prompt": "def add(a, b):",
        "suffix": "    return c",
        "system": "you write python",
        "images": [base64.b64encode(b"\x89PNG").decode()],
        "think": False,
        "format": "json",
        "options": {"temperature": 0, "num_ctx": 2048},
        "stream": False,
    }
    r = post(fake, "/api/generate", body)
    assert r.status_code == 200, r.text
    assert r.json()["response"] == expected_reply("def add(a, b):", 4)
    raw = post(fake, "/api/generate", {"model": CODER, "prompt": "x", "raw": True, "stream": False})
    assert raw.status_code == 200 and raw.json()["response"] == expected_reply("x", 4)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    fmt = post(fake, "/api/generate", {"model": CODER, "prompt": "y", "format": schema})
    assert fmt.status_code == 200
    assert recent(fake) == [
        ("/api/generate", body),
        ("/api/generate", {"model": CODER, "prompt": "x", "raw": True, "stream": False}),
        ("/api/generate", {"model": CODER, "prompt": "y", "format": schema}),
    ]


def test_generate_with_suffix_through_the_official_client(fake: FakeOllama) -> None:
    configure(fake, tokens=5)
    r = client(fake).generate(CODER, "def f(", suffix="\n    return 1")
    assert r.response == expected_reply("def f(", 5) and r.done_reason == "stop"
    parts = list(client(fake).generate(CODER, "a b", suffix="c", stream=True))
    assert "".join(p.response or "" for p in parts) == expected_reply("a b", 5)
    # A model whose template has no .Suffix cannot insert: Ollama names it in full.
    with pytest.raises(ollama.ResponseError) as exc:
        client(fake).generate(CHAT, "def f(", suffix="x")
    assert exc.value.status_code == 400
    assert exc.value.error == f"registry.ollama.ai/library/{CHAT} does not support insert"


def test_think_needs_a_thinking_model(fake: FakeOllama) -> None:
    configure(fake, tokens=3)
    c = client(fake)
    assert c.generate(THINKER, "why", think=True).response == expected_reply("why", 3)
    assert c.chat(THINKER, messages=user("why"), think="low").message.content
    assert c.generate(CODER, "why", think=False).done
    for call in (
        lambda: c.generate(CODER, "why", think=True),
        lambda: c.chat(CODER, messages=user("why"), think="high"),
    ):
        with pytest.raises(ollama.ResponseError) as exc:
            call()
        assert exc.value.status_code == 400
        assert exc.value.error == f'"{CODER}" does not support thinking'
    bad = post(fake, "/api/generate", {"model": THINKER, "prompt": "x", "think": "ultra"})
    assert bad.status_code == 400
    assert bad.json() == {
        "error": 'invalid think value: "ultra" (must be "high", "medium", "low", "max", true, '
        "or false)"
    }


def test_raw_refuses_a_system_prompt(fake: FakeOllama) -> None:
    body = {"model": CODER, "prompt": "x", "raw": True, "system": "s"}
    r = post(fake, "/api/generate", body)
    assert r.status_code == 400
    assert r.json() == {"error": "raw mode does not support template, system, or context"}


def test_an_embedding_model_refuses_chat_and_generate(fake: FakeOllama) -> None:
    c = client(fake)
    with pytest.raises(ollama.ResponseError) as exc:
        c.chat("nomic-embed-text", messages=user("hi"))
    assert exc.value.status_code == 400
    assert exc.value.error == '"nomic-embed-text" does not support chat'
    with pytest.raises(ollama.ResponseError) as exc:
        c.generate(EMBED, "hi")
    assert exc.value.status_code == 400
    assert exc.value.error == f'"{EMBED}" does not support generate'
    # A load is refused too, so it stays unloaded.
    r = post(fake, "/api/chat", {"model": EMBED, "messages": []})
    assert r.status_code == 400 and r.json() == {"error": f'"{EMBED}" does not support chat'}
    r = post(fake, "/v1/chat/completions", {"model": EMBED, "messages": user("hi")})
    assert r.status_code == 400
    assert r.json() == openai_error(f'"{EMBED}" does not support chat', "invalid_request_error")
    assert loaded(fake) == set()


def test_request_decoding_errors_as_go_gives_them(fake: FakeOllama) -> None:
    cases = [
        (
            "/api/generate",
            {"model": CODER, "prompt": 5},
            "json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type "
            "string",
        ),
        (
            "/api/chat",
            {"model": CODER, "messages": "hi"},
            "json: cannot unmarshal string into Go struct field ChatRequest.messages of type "
            "[]api.Message",
        ),
        (
            "/api/embed",
            {"model": EMBED, "input": "x", "dimensions": 1.5},
            "json: cannot unmarshal number 1.5 into Go struct field EmbedRequest.dimensions of "
            "type int",
        ),
        ("/api/chat", [1, 2], "json: cannot unmarshal array into Go value of type api.ChatRequest"),
        ("/api/generate", {"prompt": "x"}, "model '' not found"),  # generate: a 404, see below
    ]
    for path, body, message in cases:
        r = post(fake, path, body)
        assert r.json() == {"error": message}, path
        assert r.status_code == (404 if "not found" in message else 400)
    assert stats(fake)["requests_total"] == 1  # only the last one reached the model check


# -- /api/embed ---------------------------------------------------------------------------------


def test_embed_with_the_official_client(fake: FakeOllama) -> None:
    r = client(fake).embed(EMBED, ["hello world", "second text", "hello world"])
    assert r.model == EMBED
    assert [list(v) for v in r.embeddings] == [
        list(embedding("hello world")),
        list(embedding("second text")),
        list(embedding("hello world")),
    ]
    assert r.embeddings[0] != r.embeddings[1]
    for vec in r.embeddings:
        assert len(vec) == EMBED_DIM
        assert math.isclose(math.fsum(v * v for v in vec), 1.0, rel_tol=1e-5)
    assert r.prompt_eval_count == 6  # words, for the fake
    assert r.total_duration and r.load_duration
    one = client(fake).embed("nomic-embed-text", "hello world")  # a string, a bare name
    assert [list(v) for v in one.embeddings] == [list(embedding("hello world"))]


def test_embed_dimensions_cut_and_renormalize(fake: FakeOllama) -> None:
    r = client(fake).embed(EMBED, "abc", dimensions=3)
    vec = list(r.embeddings[0])
    assert vec == list(embedding("abc", 3)) and len(vec) == 3
    assert math.isclose(math.fsum(v * v for v in vec), 1.0, rel_tol=1e-5)
    full = embedding("abc")
    norm = math.sqrt(math.fsum(v * v for v in full[:3]))
    assert [round(v, 5) for v in vec] == [round(v / norm, 5) for v in full[:3]]
    # Larger than the model's vectors: no change, as in Ollama.
    big = client(fake).embed(EMBED, "abc", dimensions=EMBED_DIM * 4)
    assert list(big.embeddings[0]) == list(full)


def test_embed_wire_shape(fake: FakeOllama) -> None:
    r = post(fake, "/api/embed", {"model": EMBED, "input": "a b c", "truncate": True})
    assert r.status_code == 200
    body = r.json()
    assert list(body) == [
        "model",
        "embeddings",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
    ]
    assert body["embeddings"] == [list(embedding("a b c"))]
    assert body["prompt_eval_count"] == 3
    # Go writes float32 with their shortest digits: every value reads back as a float32.
    assert all(f32(v) == f32(float(repr(v))) and len(repr(v)) <= 12 for v in body["embeddings"][0])
    empty = post(fake, "/api/embed", {"model": EMBED, "input": []})
    assert empty.json() == {"model": EMBED, "embeddings": []}
    assert post(fake, "/api/embed", {"model": EMBED, "input": ""}).json()["embeddings"] == []
    assert post(fake, "/api/embed", {"model": EMBED}).json()["embeddings"] == []


def test_embed_truncation(fake: FakeOllama) -> None:
    words = [f"w{i}" for i in range(2_100)]  # past the embedding model's 2,048
    r = post(fake, "/api/embed", {"model": EMBED, "input": " ".join(words)})
    assert r.status_code == 200
    assert r.json()["embeddings"] == [list(embedding(" ".join(words[:2_048])))]
    assert r.json()["prompt_eval_count"] == 2_048
    r = post(fake, "/api/embed", {"model": EMBED, "input": " ".join(words), "truncate": False})
    assert r.status_code == 400
    assert r.json() == {"error": "the input length exceeds the context length"}


def test_embed_errors(fake: FakeOllama) -> None:
    with pytest.raises(ollama.ResponseError) as exc:
        client(fake).embed(CHAT, "hi")
    assert exc.value.status_code == 501 and exc.value.error == NO_EMBEDDINGS
    assert loaded(fake) == {CHAT}  # it was loaded to find out, as in Ollama
    with pytest.raises(ollama.ResponseError) as exc:
        client(fake).embed("nope", "hi")
    assert exc.value.status_code == 404 and exc.value.error == "model 'nope' not found"
    cases = [
        ({"input": "x"}, 404, "model '' not found"),
        ({"model": EMBED, "input": ["ok", 3]}, 400, "invalid input type"),
        ({"model": EMBED, "input": 3}, 400, "invalid input type"),
    ]
    for body, status, message in cases:
        r = post(fake, "/api/embed", body)
        assert (r.status_code, r.json()) == (status, {"error": message}), body
    r = httpx.post(f"{fake.url}/api/embed", content=b"")
    assert r.status_code == 400 and r.json() == {"error": "missing request body"}


# -- /api/embeddings (legacy) -------------------------------------------------------------------


def test_legacy_embeddings(fake: FakeOllama) -> None:
    got = client(fake).embeddings(EMBED, "hello world")
    vec = embedding("hello world")
    # The same vector, widened to float64 as Ollama does: every digit of the float32.
    assert list(got.embedding) == [f32(v) for v in vec]
    raw = post(fake, "/api/embeddings", {"model": EMBED, "prompt": "hello world"}).json()
    assert list(raw) == ["embedding"] and raw["embedding"] == [f32(v) for v in vec]
    assert post(fake, "/api/embeddings", {"model": EMBED, "prompt": ""}).json() == {"embedding": []}
    with pytest.raises(ollama.ResponseError) as exc:
        client(fake).embeddings(CHAT, "hi")
    assert exc.value.status_code == 500 and exc.value.error == NO_EMBEDDINGS
    r = post(fake, "/api/embeddings", {"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    assert r.json() == {"error": 'model "nope" not found, try pulling it first'}
    r = post(fake, "/api/embeddings", {"prompt": "x"})
    assert r.status_code == 400 and r.json() == {"error": "model is required"}


def test_embed_with_the_async_client(fake: FakeOllama) -> None:
    async def go() -> tuple[list[list[float]], list[float]]:
        c = ollama.AsyncClient(host=fake.url, timeout=10)
        many = await c.embed(EMBED, ["x", "y"])
        legacy = await c.embeddings(EMBED, "x")
        return [list(v) for v in many.embeddings], list(legacy.embedding)

    many, legacy = asyncio.run(go())
    assert many == [list(embedding("x")), list(embedding("y"))]
    assert legacy == [f32(v) for v in embedding("x")]


# -- /v1/embeddings -----------------------------------------------------------------------------


def test_v1_embeddings_float_and_base64(fake: FakeOllama) -> None:
    r = post(fake, "/v1/embeddings", {"model": EMBED, "input": ["one", "two words"]})
    assert r.status_code == 200
    assert r.json() == {
        "object": "list",
        "data": [
            {"object": "embedding", "embedding": list(embedding("one")), "index": 0},
            {"object": "embedding", "embedding": list(embedding("two words")), "index": 1},
        ],
        "model": EMBED,
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    assert list(r.json()) == ["object", "data", "model", "usage"]
    body = {"model": EMBED, "input": "one", "encoding_format": "base64", "dimensions": 4}
    b64 = post(fake, "/v1/embeddings", body).json()["data"][0]["embedding"]
    packed = base64.b64decode(b64)
    assert len(packed) == 4 * 4
    assert list(struct.unpack("<4f", packed)) == [f32(v) for v in embedding("one", 4)]
    # OpenAI's empty string is one (empty) text to embed.
    empty = post(fake, "/v1/embeddings", {"model": EMBED, "input": ""}).json()
    assert empty["data"] == [{"object": "embedding", "embedding": list(embedding("")), "index": 0}]


def test_v1_embeddings_errors(fake: FakeOllama) -> None:
    cases = [
        ({"model": EMBED, "input": []}, 400, "invalid input", "invalid_request_error"),
        ({"model": EMBED}, 400, "invalid input", "invalid_request_error"),
        (
            {"model": EMBED, "input": "x", "encoding_format": "hex"},
            400,
            "Invalid value for 'encoding_format' = hex. Supported values: ['float', 'base64'].",
            "invalid_request_error",
        ),
        ({"model": "nope", "input": "x"}, 404, "model 'nope' not found", "not_found_error"),
        ({"model": CHAT, "input": "x"}, 501, NO_EMBEDDINGS, "api_error"),
    ]
    for body, status, message, kind in cases:
        r = post(fake, "/v1/embeddings", body)
        assert (r.status_code, r.json()) == (status, openai_error(message, kind)), body
    r = httpx.post(f"{fake.url}/v1/embeddings", content=b"")
    assert r.status_code == 400 and r.json() == openai_error("EOF", "invalid_request_error")


# -- embeddings: counters, recent requests, knobs, parallel slots -------------------------------


def test_embedding_requests_are_counted_and_recorded(fake: FakeOllama) -> None:
    post(fake, "/api/embed", {"model": EMBED, "input": "a"})
    post(fake, "/api/embeddings", {"model": EMBED, "prompt": "b"})
    post(fake, "/v1/embeddings", {"model": EMBED, "input": ["c"]})
    post(fake, "/api/embed", {"model": EMBED, "input": []})  # a load: neither
    post(fake, "/api/chat", {"model": CHAT, "messages": user("d"), "stream": False})
    assert recent(fake) == [
        ("/api/embed", {"model": EMBED, "input": "a"}),
        ("/api/embeddings", {"model": EMBED, "prompt": "b"}),
        ("/v1/embeddings", {"model": EMBED, "input": ["c"]}),
        ("/api/chat", {"model": CHAT, "messages": user("d"), "stream": False}),
    ]
    assert stats(fake) == {"in_flight": 0, "max_in_flight": 1, "requests_total": 4}


def test_embedding_status_knob(fake: FakeOllama) -> None:
    configure(fake, status=503)
    r = post(fake, "/api/embed", {"model": EMBED, "input": "a"})
    assert r.status_code == 503 and r.json() == {"error": BUSY_TEXT}
    r = post(fake, "/v1/embeddings", {"model": EMBED, "input": "a"})
    assert r.status_code == 503 and r.json() == openai_error(BUSY_TEXT, "api_error")
    assert stats(fake)["requests_total"] == 2
    configure(fake, status=0)
    assert post(fake, "/api/embed", {"model": EMBED, "input": "a"}).status_code == 200


def test_hang_holds_embedding_requests_in_flight(fake: FakeOllama) -> None:
    configure(fake, hang=True)

    async def held() -> dict[str, Any]:
        async with aiohttp.ClientSession() as s:

            async def embed() -> dict[str, Any]:
                payload = {"model": EMBED, "input": "held"}
                async with s.post(f"{fake.url}/api/embed", json=payload) as r:
                    assert r.status == 200
                    result: dict[str, Any] = await r.json()
                    return result

            task = asyncio.create_task(embed())
            for _ in range(500):
                async with s.get(f"{fake.url}/_fake/stats") as r:
                    if (await r.json())["in_flight"] == 1:
                        break
                await asyncio.sleep(0.01)
            assert not task.done()
            async with s.post(f"{fake.url}/_fake/config", json={"hang": False}) as r:
                assert r.status == 200
            return await task

    assert asyncio.run(held())["embeddings"] == [list(embedding("held"))]
    assert stats(fake)["in_flight"] == 0


def test_embeddings_share_the_max_parallel_slots() -> None:
    # One slot: a generation trickling its reply holds it; an embedding must wait for it.
    knobs = {"tokens": 4, "fault": "trickle", "trickle_ms": 200}
    with FakeOllamaThread(FakeOllama([CHAT, EMBED], max_parallel=1, **knobs)) as f:

        async def go() -> tuple[bool, dict[str, Any]]:
            async with aiohttp.ClientSession() as s:

                async def in_flight() -> int:
                    async with s.get(f"{f.url}/_fake/stats") as r:
                        return int((await r.json())["in_flight"])

                async def embed() -> dict[str, Any]:
                    payload = {"model": EMBED, "input": "waits"}
                    async with s.post(f"{f.url}/api/embed", json=payload) as r:
                        result: dict[str, Any] = await r.json()
                        return result

                chat = await s.post(f"{f.url}/api/chat", json={"model": CHAT, "messages": []})
                chat.close()  # loaded; now a generation that holds the only slot
                gen = await s.post(f"{f.url}/api/chat", json={"model": CHAT, "messages": user("x")})
                await gen.content.read(1)  # headers and the first byte: the slot is taken
                task = asyncio.create_task(embed())
                for _ in range(500):
                    if await in_flight() == 2:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)
                waited = not task.done()
                gen.close()  # the generation's client leaves: its slot frees
                return waited, await task

        waited, body = asyncio.run(go())
        assert waited, "the embedding did not wait for the only slot"
        assert body["embeddings"] == [list(embedding("waits"))]
        assert f.stats.max_in_flight == 2


# -- /v1/completions ----------------------------------------------------------------------------


def test_v1_completions_whole(fake: FakeOllama) -> None:
    configure(fake, tokens=5)
    r = post(fake, "/v1/completions", {"model": CODER, "prompt": "once upon a time"})
    assert r.status_code == 200
    body = r.json()
    assert list(body) == [
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "choices",
        "usage",
    ]
    assert CMPL_ID.match(body["id"]) and isinstance(body["created"], int)
    assert body["object"] == "text_completion" and body["model"] == CODER
    assert body["system_fingerprint"] == "fp_ollama"
    text = expected_reply("once upon a time", 5)
    assert body["choices"] == [{"text": text, "index": 0, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    short = post(fake, "/v1/completions", {"model": CODER, "prompt": "a b", "max_tokens": 2})
    choice = short.json()["choices"][0]
    assert choice["text"] == expected_reply("a b", 2) and choice["finish_reason"] == "length"
    assert short.json()["id"] != body["id"]


@pytest.mark.parametrize("token_ms", [0, 5])
def test_v1_completions_stream_with_usage(fake: FakeOllama, token_ms: int) -> None:
    configure(fake, tokens=4, token_ms=token_ms)
    payload = {
        "model": CODER,
        "prompt": "open ai",
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
        "stop": ["\n\n"],
    }
    r = post(fake, "/v1/completions", payload)
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    events = sse(r.content)
    assert events[-1] == "[DONE]" and len(events) == 6
    chunks, usage = events[:4], events[4]
    toks = list(reply_tokens("open ai", 4))
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for i, c in enumerate(chunks):
        assert list(c) == [
            "id",
            "object",
            "created",
            "choices",
            "model",
            "system_fingerprint",
            "usage",
        ]
        assert c["object"] == "text_completion" and CMPL_ID.match(c["id"])
        finish = "stop" if i == 3 else None
        assert c["choices"] == [{"text": toks[i], "index": 0, "finish_reason": finish}]
        assert c["usage"] == zero  # Ollama's empty Usage on every chunk
    assert usage["choices"] == [] and usage["id"] == chunks[0]["id"]
    assert usage["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


def test_v1_completions_stream_without_usage_and_errors(fake: FakeOllama) -> None:
    configure(fake, tokens=3)
    r = post(fake, "/v1/completions", {"model": CODER, "prompt": "x y", "stream": True})
    events = sse(r.content)
    assert events[-1] == "[DONE]" and len(events) == 4
    assert all("usage" not in e for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected_reply("x y", 3)
    configure(fake, error_after_tokens=2)
    r = post(fake, "/v1/completions", {"model": CODER, "prompt": "x y", "stream": True})
    events = sse(r.content)
    assert len(events) == 3 and "[DONE]" not in events  # two tokens, the error, cut short
    assert events[2]["error"]["type"] == "api_error"
    r = post(fake, "/v1/completions", {"model": CODER, "prompt": "x y"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"


def test_v1_completions_refusals(fake: FakeOllama) -> None:
    ok = post(fake, "/v1/completions", {"model": CODER, "prompt": "def f(", "suffix": "pass"})
    assert ok.status_code == 200
    cases = [
        (
            {"model": CHAT, "prompt": "def f(", "suffix": "pass"},
            400,
            f"registry.ollama.ai/library/{CHAT} does not support insert",
        ),
        ({"model": EMBED, "prompt": "x"}, 400, f'"{EMBED}" does not support generate'),
        ({"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
        ({"prompt": "x"}, 404, "model '' not found"),
        ({"model": CODER, "prompt": "x", "stop": ["a", 1]}, 400, "invalid type for 'stop' field: "),
        (
            {"model": CODER, "prompt": ["x"]},
            400,
            "json: cannot unmarshal array into Go struct field CompletionRequest.prompt of type "
            "string",
        ),
    ]
    for body, status, message in cases:
        r = post(fake, "/v1/completions", body)
        assert r.status_code == status, body
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        if message.endswith(": "):  # Go's %T of a JSON number
            message += "float64"
        assert r.json() == openai_error(message, kind), body


def test_v1_completions_empty_prompt_loads(fake: FakeOllama) -> None:
    r = post(fake, "/v1/completions", {"model": CHAT, "prompt": ""})
    body = r.json()
    assert body["choices"] == [{"text": "", "index": 0, "finish_reason": "load"}]
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert loaded(fake) == {CHAT}
    r = post(fake, "/v1/completions", {"model": CHAT, "prompt": "", "stream": True})
    events = sse(r.content)
    assert events[-1] == "[DONE]" and len(events) == 2
    assert events[0]["choices"] == [{"text": "", "index": 0, "finish_reason": "load"}]
    assert stats(fake)["requests_total"] == 0


def test_v1_chat_completions_needs_messages_first(fake: FakeOllama) -> None:
    # Ollama's /v1 layer refuses an empty list before it looks at the model.
    for model in (CODER, "nope"):
        r = post(fake, "/v1/chat/completions", {"model": model, "messages": []})
        assert r.status_code == 400
        assert r.json() == openai_error("[] is too short - 'messages'", "invalid_request_error")
