"""Ollama's HTTP API core: requests checked, NDJSON lines and stream: false objects built."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatd.proto import ollama
from chatd.proto.httpapi import ApiError, Delta

T = "2024-05-01T10:00:00.123456789Z"
CALL = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def bad(fn: Callable[..., object], *args: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)
    assert (info.value.kind, info.value.status) == ("bad_request", 400)
    return info.value


def ndjson(body: bytes) -> list[dict[str, Any]]:
    """The objects of an NDJSON body, as a strict client reads it: every line ends with one
    ``\\n``, none is blank, each is one JSON object."""
    assert body.endswith(b"\n")
    lines = body[:-1].split(b"\n")
    assert all(line.strip() for line in lines), body
    objs = [orjson.loads(line) for line in lines]
    assert all(type(o) is dict for o in objs)
    return objs


def test_constants() -> None:
    assert ollama.RUNNING == b"Ollama is running"
    assert ollama.CONTENT_TYPE_NDJSON == "application/x-ndjson"
    assert ollama.CONTENT_TYPE_JSON == "application/json; charset=utf-8"


# --- /api/chat -------------------------------------------------------------------------------


def test_chat_request() -> None:
    body = {
        "model": "llama3",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi", "images": ["aGk="]},
            {"role": "assistant", "tool_calls": [CALL]},  # no content: fine
            {"role": "tool", "content": None},
        ],
    }
    call = ollama.chat_request(body)
    assert call == ollama.Call("chat", "llama3", True, False, False, body)
    assert call.body is body  # passed on as the client sent it


def test_chat_request_stream_false() -> None:
    call = ollama.chat_request({"model": "m", "messages": [{"role": "user"}], "stream": False})
    assert (call.stream, call.load) == (False, False)


@pytest.mark.parametrize("messages", [None, [], "absent"])
def test_chat_without_messages_is_a_load(messages: object) -> None:
    body: dict[str, Any] = {"model": "m"}
    if messages != "absent":
        body["messages"] = messages
    call = ollama.chat_request(body)
    assert (call.kind, call.load, call.unload, call.stream) == ("chat", True, False, True)


@pytest.mark.parametrize(
    ("keep_alive", "unload"),
    [
        (0, True),
        (0.0, True),
        ("0", True),
        ("0s", True),
        ("0m", True),
        (" 0ms ", True),
        ("0h", True),
        ("0µs", True),
        ("0.0s", True),
        (5, False),
        (-1, False),
        (0.5, False),
        ("5m", False),
        ("-1", False),
        ("", False),
        ("forever", False),
        ("1h0m0s", False),
        (False, False),  # a boolean is not a number
        (None, False),
        ([0], False),
    ],
)
def test_keep_alive_zero_is_an_unload(keep_alive: object, unload: bool) -> None:
    call = ollama.chat_request({"model": "m", "messages": [], "keep_alive": keep_alive})
    assert (call.load, call.unload) == (True, unload)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": []}, "model is required"),
        ({"model": 1, "messages": []}, "model must be a string"),
        ({"model": "m", "messages": {"role": "user"}}, "messages must be a list"),
        ({"model": "m", "messages": "hi"}, "messages must be a list"),
        ({"model": "m", "messages": ["hi"]}, "messages[0] must be an object"),
        ({"model": "m", "messages": [{"role": "user"}, {}]}, "messages[1].role is required"),
        ({"model": "m", "messages": [{"role": 1}]}, "messages[0].role is required"),
        (
            {"model": "m", "messages": [{"role": "user", "content": ["a"]}]},
            "messages[0].content must be a string",
        ),
        ({"model": "m", "messages": [], "stream": "yes"}, "stream must be true or false"),
    ],
)
def test_chat_request_rejects(body: dict[str, Any], message: str) -> None:
    err = bad(ollama.chat_request, body)
    assert err.message == message
    assert err.param is not None


# --- /api/generate -----------------------------------------------------------------------------


def test_generate_request() -> None:
    body = {"model": "m", "prompt": "Why is the sky blue?", "stream": False, "raw": True}
    call = ollama.generate_request(body)
    assert call == ollama.Call("generate", "m", False, False, False, body)


@pytest.mark.parametrize(
    ("extra", "load"),
    [
        ({}, True),
        ({"prompt": ""}, True),
        ({"prompt": None, "suffix": ""}, True),
        ({"prompt": "", "images": []}, True),
        ({"prompt": "hi"}, False),
        ({"suffix": "return x"}, False),  # fill in the middle
        ({"images": ["aGk="]}, False),
    ],
)
def test_generate_empty_prompt_is_a_load(extra: dict[str, Any], load: bool) -> None:
    call = ollama.generate_request({"model": "m", **extra})
    assert call.load is load


def test_generate_unload() -> None:
    call = ollama.generate_request({"model": "m", "keep_alive": "0s"})
    assert (call.load, call.unload) == (True, True)


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ({"model": "m", "prompt": 1}, "prompt must be a string", "prompt"),
        ({"model": "m", "prompt": ["a"]}, "prompt must be a string", "prompt"),
        ({"model": "m", "suffix": 1}, "suffix must be a string", "suffix"),
        ({"model": "m", "stream": 1}, "stream must be true or false", "stream"),
        ({"model": "m", "raw": "true"}, "raw must be true or false", "raw"),
        ({"prompt": "hi"}, "model is required", "model"),
    ],
)
def test_generate_request_rejects(body: dict[str, Any], message: str, param: str) -> None:
    err = bad(ollama.generate_request, body)
    assert (err.message, err.param) == (message, param)


# --- /api/embed, /api/embeddings ------------------------------------------------------------


def test_embed_request() -> None:
    assert ollama.embed_request({"model": "e", "input": "one"}, legacy=False) == ("e", ["one"])
    assert ollama.embed_request({"model": "e", "input": ["a", "b"]}, legacy=False) == (
        "e",
        ["a", "b"],
    )
    assert ollama.embed_request({"model": "e"}, legacy=False) == ("e", [])  # a load
    assert ollama.embed_request({"model": "e", "input": []}, legacy=False) == ("e", [])
    # The legacy endpoint reads ``prompt`` (and ignores ``input``).
    assert ollama.embed_request({"model": "e", "prompt": "p", "input": "i"}, legacy=True) == (
        "e",
        ["p"],
    )


def test_inputs_of_returns_a_copy() -> None:
    texts = ["a"]
    out = ollama.inputs_of({"input": texts}, "input")
    assert out == texts and out is not texts


@pytest.mark.parametrize("value", [1, ["a", 1], [None], {"a": "b"}, True])
def test_embed_request_rejects(value: object) -> None:
    err = bad(ollama.embed_request, {"model": "e", "input": value}, False)
    assert (err.message, err.param) == ("input must be a string or a list of strings", "input")
    err = bad(ollama.embed_request, {"model": "e", "prompt": value}, True)
    assert (err.message, err.param) == ("prompt must be a string or a list of strings", "prompt")


def test_embed_request_needs_a_model() -> None:
    assert bad(ollama.embed_request, {"input": "x"}, False).message == "model is required"


# --- lines -------------------------------------------------------------------------------------


def test_line_is_one_object_and_one_newline() -> None:
    assert ollama.line({"response": "a\nb", "done": False}) == (
        b'{"response":"a\\nb","done":false}\n'
    )
    assert ollama.line({}) == b"{}\n"  # never blank
    assert ndjson(ollama.line({"x": "\n\n"})) == [{"x": "\n\n"}]


def test_error_line() -> None:
    assert ollama.error_line("model 'x' not found") == b'{"error":"model \'x\' not found"}\n'
    assert ndjson(ollama.error_line("a\nb")) == [{"error": "a\nb"}]


# --- Encoder -----------------------------------------------------------------------------------


def test_chat_chunks() -> None:
    enc = ollama.Encoder("chat", "llama3")
    assert enc.chunk(Delta(content="Hel"), T) == {
        "model": "llama3",
        "created_at": T,
        "message": {"role": "assistant", "content": "Hel"},
        "done": False,
    }
    assert enc.chunk(Delta(thinking="hmm", tool_calls=[CALL]), T) == {
        "model": "llama3",
        "created_at": T,
        "message": {"role": "assistant", "content": "", "thinking": "hmm", "tool_calls": [CALL]},
        "done": False,
    }
    final = Delta(done=True, done_reason="length", prompt_tokens=26, completion_tokens=298)
    assert enc.chunk(final, T) == {
        "model": "llama3",
        "created_at": T,
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "length",
        "prompt_eval_count": 26,
        "eval_count": 298,
    }


def test_final_chunk_without_reason_or_counts() -> None:
    out = ollama.Encoder("chat", "m").chunk(Delta(done=True), T)
    assert out["done"] is True and out["done_reason"] == "stop"
    assert "prompt_eval_count" not in out and "eval_count" not in out
    out = ollama.Encoder("chat", "m").chunk(Delta(done=True, completion_tokens=0), T)
    assert out["eval_count"] == 0 and "prompt_eval_count" not in out


def test_generate_chunks() -> None:
    enc = ollama.Encoder("generate", "m")
    assert enc.chunk(Delta(content="The"), T) == {
        "model": "m",
        "created_at": T,
        "response": "The",
        "done": False,
    }
    assert enc.chunk(Delta(thinking="so"), T) == {
        "model": "m",
        "created_at": T,
        "response": "",
        "thinking": "so",
        "done": False,
    }
    assert enc.chunk(Delta(done=True, done_reason="stop", prompt_tokens=3), T) == {
        "model": "m",
        "created_at": T,
        "response": "",
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 3,
    }


def test_raw_chunk_goes_out_as_the_backend_sent_it() -> None:
    raw = {"model": "m", "created_at": "then", "response": "x", "done": False, "extra": 1}
    assert ollama.Encoder("generate", "other").chunk(Delta(content="y", raw=raw), T) is raw


def test_stream_body_is_ndjson() -> None:
    enc = ollama.Encoder("chat", "m")
    deltas = [Delta(content="a\n"), Delta(content=""), Delta(content="\n\nb"), Delta(done=True)]
    body = b"".join(ollama.line(enc.chunk(d, T)) for d in deltas)
    objs = ndjson(body)
    assert len(objs) == 4
    assert "".join(o["message"]["content"] for o in objs) == "a\n\n\nb"
    assert [o["done"] for o in objs] == [False, False, False, True]


# --- Aggregate ---------------------------------------------------------------------------------


def test_aggregate_chat_joins_the_pieces_and_keeps_the_last_figures() -> None:
    enc = ollama.Encoder("chat", "llama3")
    agg = ollama.Aggregate(enc)
    deltas = [
        Delta(thinking="Let me "),
        Delta(thinking="think."),
        Delta(content="The sky "),
        Delta(content="is blue.", tool_calls=[CALL]),
        Delta(done=True, done_reason="stop", prompt_tokens=10, completion_tokens=5),
    ]
    for d in deltas:
        agg.feed(d)
    assert agg.result(deltas[-1], T) == {
        "model": "llama3",
        "created_at": T,
        "message": {
            "role": "assistant",
            "content": "The sky is blue.",
            "thinking": "Let me think.",
            "tool_calls": [CALL],
        },
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 10,
        "eval_count": 5,
    }


def test_aggregate_generate() -> None:
    agg = ollama.Aggregate(ollama.Encoder("generate", "m"))
    deltas = [
        Delta(thinking="hm"),
        Delta(content="Hello"),
        Delta(content=", world", done=True, done_reason="length", completion_tokens=2),
    ]
    for d in deltas:
        agg.feed(d)
    assert agg.result(deltas[-1], T) == {
        "model": "m",
        "created_at": T,
        "response": "Hello, world",
        "thinking": "hm",
        "done": True,
        "done_reason": "length",
        "eval_count": 2,
    }


def test_aggregate_without_thinking_or_tools_has_neither() -> None:
    agg = ollama.Aggregate(ollama.Encoder("chat", "m"))
    last = Delta(content="ok", done=True)
    agg.feed(last)
    result = agg.result(last, T)
    assert result["message"] == {"role": "assistant", "content": "ok"}
    agg = ollama.Aggregate(ollama.Encoder("generate", "m"))
    agg.feed(last)
    assert "thinking" not in agg.result(last, T)


def test_aggregate_of_an_ollama_backends_chunks() -> None:
    """The backend spoke Ollama: its chunks are the source; the last one's fields stay (its
    durations, its ``created_at``), the text is the joined pieces."""
    chunks: list[dict[str, Any]] = [
        {"model": "m", "created_at": "t1", "message": {"role": "assistant", "content": "Hi"}},
        {
            "model": "m",
            "created_at": "t2",
            "message": {"role": "assistant", "content": " there", "thinking": "greet"},
        },
        {
            "model": "m",
            "created_at": "t3",
            "message": {"role": "assistant", "content": "", "tool_calls": [CALL]},
        },
        {"model": "m", "created_at": "t4", "message": "garbled"},  # no message object: skipped
        {"model": "m", "created_at": "t5", "message": {"content": 7, "thinking": None}},
        {
            "model": "m",
            "created_at": "t6",
            "message": {"role": "assistant", "content": "!"},
            "done": True,
            "done_reason": "stop",
            "total_duration": 123,
            "eval_count": 3,
        },
    ]
    agg = ollama.Aggregate(ollama.Encoder("chat", "m"))
    deltas = [Delta(raw=c) for c in chunks]
    for d in deltas:
        agg.feed(d)
    assert agg.result(deltas[-1], T) == {
        "model": "m",
        "created_at": "t6",
        "message": {
            "role": "assistant",
            "content": "Hi there!",
            "thinking": "greet",
            "tool_calls": [CALL],
        },
        "done": True,
        "done_reason": "stop",
        "total_duration": 123,
        "eval_count": 3,
    }
    assert chunks[-1]["message"] == {"role": "assistant", "content": "!"}  # not mutated


@pytest.mark.parametrize("message", [None, "garbled", ["content", "x"], {}])
def test_aggregate_of_a_last_chunk_without_a_message_object(message: object) -> None:
    agg = ollama.Aggregate(ollama.Encoder("chat", "m"))
    first = Delta(raw={"message": {"content": "a"}})
    last = Delta(raw={"message": message, "done": True})
    agg.feed(first)
    agg.feed(last)
    result = agg.result(last, T)
    assert result == {"message": {"role": "assistant", "content": "a"}, "done": True}


def test_aggregate_of_an_ollama_backends_generate_chunks_keeps_the_context() -> None:
    chunks: list[dict[str, Any]] = [
        {"model": "m", "response": "Hel", "done": False},
        {"model": "m", "response": "lo", "thinking": "t", "done": False},
        {"model": "m", "response": None, "done": False},
        {"model": "m", "response": "", "done": True, "context": [1, 2, 3], "done_reason": "stop"},
    ]
    agg = ollama.Aggregate(ollama.Encoder("generate", "m"))
    for c in chunks:
        agg.feed(Delta(raw=c))
    assert agg.result(Delta(raw=chunks[-1]), T) == {
        "model": "m",
        "response": "Hello",
        "thinking": "t",
        "done": True,
        "context": [1, 2, 3],
        "done_reason": "stop",
    }


# --- properties --------------------------------------------------------------------------------

pieces = st.lists(st.text(max_size=12), max_size=12)


@given(pieces, st.sampled_from(["chat", "generate"]))
def test_any_split_aggregates_to_the_text(parts: list[str], kind: str) -> None:
    agg = ollama.Aggregate(ollama.Encoder(kind, "m"))
    deltas = [Delta(content=p) for p in parts] + [Delta(done=True)]
    for d in deltas:
        agg.feed(d)
    out = agg.result(deltas[-1], T)
    text = out["message"]["content"] if kind == "chat" else out["response"]
    assert text == "".join(parts)
    assert out["done"] is True


@given(pieces, st.sampled_from(["chat", "generate"]))
def test_any_stream_parses_back_to_the_text(parts: list[str], kind: str) -> None:
    enc = ollama.Encoder(kind, "m")
    deltas = [Delta(content=p) for p in parts] + [Delta(done=True, completion_tokens=len(parts))]
    body = b"".join(ollama.line(enc.chunk(d, T)) for d in deltas)
    objs = ndjson(body)
    assert len(objs) == len(deltas)
    texts = [o["message"]["content"] if kind == "chat" else o["response"] for o in objs]
    assert "".join(texts) == "".join(parts)
    assert [o["done"] for o in objs] == [False] * len(parts) + [True]
    assert objs[-1]["eval_count"] == len(parts)
