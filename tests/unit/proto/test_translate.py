"""Translation between Ollama's API and OpenAI's: requests, stream chunks, embeddings."""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatd.proto import ollama, openai, translate
from chatd.proto.httpapi import Delta

SCHEMA = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
OLLAMA_CALL = {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
OPENAI_CALL = {
    "id": "call_abc",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
}


# --- Ollama client -> OpenAI backend -----------------------------------------------------------


def test_ollama_chat_to_openai() -> None:
    obj = {
        "model": "llama3",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "What is this?", "images": ["iVBORw0K", 7]},
            {"role": "assistant", "content": None, "tool_calls": [OLLAMA_CALL, "junk"]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_0"},
            {"role": "assistant"},
        ],
        "tools": TOOLS,
        "options": {
            "temperature": 0.2,
            "top_p": 0.9,
            "seed": 42,
            "stop": ["\n\n"],
            "num_predict": 128,
            "frequency_penalty": 0.5,
            "presence_penalty": 0.1,
            "top_k": 40,  # no counterpart: dropped
            "num_ctx": None,
        },
        "format": "json",
        "keep_alive": "5m",
        "think": True,
    }
    assert translate.ollama_chat_to_openai(obj, "llama3:8b") == {
        "model": "llama3:8b",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                ],
            },
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_0",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"city":"Paris","days":2}',
                        },
                    }
                ],
            },
            {"role": "tool", "content": "sunny", "tool_call_id": "call_0"},
            {"role": "assistant", "content": ""},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": TOOLS,
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 42,
        "stop": ["\n\n"],
        "max_tokens": 128,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.1,
        "response_format": {"type": "json_object"},
    }


def test_ollama_chat_to_openai_minimal() -> None:
    assert translate.ollama_chat_to_openai({"model": "m", "tools": []}, "m") == {
        "model": "m",
        "messages": [],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_ollama_messages_odd_parts() -> None:
    obj = {
        "messages": [
            {"role": "user", "content": "x", "images": []},  # no images: a plain string
            {"role": "user", "content": "y", "images": "notalist"},
            {"role": "assistant", "content": "", "tool_calls": []},
            {"role": "assistant", "tool_calls": [{"function": None}, {}]},
            {"role": "tool", "content": "r", "tool_call_id": 5},
        ],
        "options": "notadict",
    }
    out = translate.ollama_chat_to_openai(obj, "m")
    assert out["messages"] == [
        {"role": "user", "content": "x"},
        {"role": "user", "content": "y"},
        {"role": "assistant", "content": ""},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "", "arguments": "{}"}},
                {"id": "call_1", "type": "function", "function": {"name": "", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "content": "r", "tool_call_id": "call_0"},  # 5 is no id: paired
    ]
    assert "max_tokens" not in out and "response_format" not in out


def test_tool_results_are_paired_with_the_calls_they_answer() -> None:
    """Ollama's tool messages carry no id; OpenAI servers need one: the k-th tool message after
    an assistant's calls answers its k-th call, and ids stay unique across the conversation."""
    call = {"function": {"name": "f", "arguments": {"x": 1}}}
    obj = {
        "messages": [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "r0"},
            {"role": "assistant", "content": "", "tool_calls": [call, "junk", call]},
            {"role": "tool", "content": "r1"},
            {"role": "tool", "content": "r2"},
            {"role": "tool", "content": "r3"},  # more results than calls: no id to give
        ]
    }
    out = translate.ollama_chat_to_openai(obj, "m")["messages"]
    assert [c["id"] for c in out[0]["tool_calls"]] == ["call_0"]
    assert [c["id"] for c in out[2]["tool_calls"]] == ["call_1", "call_2"]
    assert out[2]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x":1}'}
    assert [m.get("tool_call_id") for m in out if m["role"] == "tool"] == [
        "call_0",
        "call_1",
        "call_2",
        None,
    ]


def test_ollama_schema_format_is_a_json_schema() -> None:
    out = translate.ollama_chat_to_openai({"messages": [], "format": SCHEMA}, "m")
    assert out["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "schema", "schema": SCHEMA},
    }
    for fmt in ("", "xml", None, ["json"]):
        out = translate.ollama_chat_to_openai({"messages": [], "format": fmt}, "m")
        assert "response_format" not in out


def test_ollama_generate_to_openai_is_a_chat() -> None:
    obj = {
        "model": "m",
        "prompt": "Describe it",
        "system": "You are terse.",
        "images": ["AAAA"],
        "options": {"num_predict": 10},
        "format": SCHEMA,
        "context": [1, 2],
    }
    path, body = translate.ollama_generate_to_openai(obj, "m")
    assert path == "/v1/chat/completions"
    assert body == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe it"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 10,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "schema", "schema": SCHEMA},
        },
    }


def test_ollama_generate_without_system() -> None:
    for system in (None, "", 5):
        path, body = translate.ollama_generate_to_openai({"prompt": "hi", "system": system}, "m")
        assert path == "/v1/chat/completions"
        assert body["messages"] == [{"role": "user", "content": "hi"}]


def test_ollama_raw_generate_is_a_completion() -> None:
    obj = {"prompt": "[INST] hi [/INST]", "raw": True, "system": "ignored", "format": "json"}
    path, body = translate.ollama_generate_to_openai(obj, "m")
    assert path == "/v1/completions"
    assert body == {
        "model": "m",
        "prompt": "[INST] hi [/INST]",
        "stream": True,
        "stream_options": {"include_usage": True},
        "response_format": {"type": "json_object"},
    }


def test_ollama_fill_in_the_middle_is_a_completion_with_suffix() -> None:
    obj = {"prompt": "def f(", "suffix": "    return x", "options": {"temperature": 0}}
    path, body = translate.ollama_generate_to_openai(obj, "m")
    assert path == "/v1/completions"
    assert body == {
        "model": "m",
        "prompt": "def f(",
        "stream": True,
        "stream_options": {"include_usage": True},
        "suffix": "    return x",
        "temperature": 0,
    }
    path, body = translate.ollama_generate_to_openai({"suffix": "x"}, "m")
    assert (path, body["prompt"]) == ("/v1/completions", "")


# --- OpenAI client -> Ollama backend -----------------------------------------------------------


def test_openai_chat_to_ollama() -> None:
    obj = {
        "model": "gpt-x",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
                    {"type": "text", "text": "this?"},
                    {"type": "image_url", "image_url": "data:image/png;base64,iVBOR"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    {"type": "image_url", "image_url": {"url": "data:nocomma"}},
                    {"type": "image_url", "image_url": 5},
                    {"type": "text", "text": 5},
                    {"type": "input_audio"},
                    "junk",
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": [OPENAI_CALL, "junk"]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_abc", "name": "get_weather"},
            {"role": "user", "content": "thanks", "name": "bob"},  # a name, but no tool
            {"role": "assistant", "content": 5, "tool_calls": []},
        ],
        "tools": TOOLS,
        "temperature": 0.7,
        "top_p": 1,
        "seed": 1,
        "stop": ["END"],
        "max_tokens": 50,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.2,
        "response_format": {"type": "json_object"},
        "user": "u1",  # no counterpart: dropped
        "stream": False,
    }
    assert translate.openai_chat_to_ollama(obj, "llama3") == {
        "model": "llama3",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "What is\nthis?", "images": ["/9j/4AAQ", "iVBOR"]},
            {"role": "assistant", "content": "", "tool_calls": [OLLAMA_CALL]},
            {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
            {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": ""},
        ],
        "stream": True,
        "tools": TOOLS,
        "options": {
            "temperature": 0.7,
            "top_p": 1,
            "seed": 1,
            "stop": ["END"],
            "num_predict": 50,
            "frequency_penalty": 0.1,
            "presence_penalty": 0.2,
        },
        "format": "json",
    }


def test_openai_chat_to_ollama_minimal() -> None:
    obj = {"messages": [{"role": "user", "content": "hi"}], "tools": [], "max_tokens": None}
    assert translate.openai_chat_to_ollama(obj, "m") == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }


def test_openai_one_stop_string_is_a_list_for_ollama() -> None:
    """Ollama rejects a string ``stop`` ("option "stop" must be of type array")."""
    out = translate.openai_chat_to_ollama({"messages": [], "stop": "\n"}, "m")
    assert out["options"] == {"stop": ["\n"]}
    out = translate.openai_completion_to_ollama({"prompt": "p", "stop": ["a", "b"]}, "m")
    assert out["options"] == {"stop": ["a", "b"]}


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    obj = {"messages": [], "max_tokens": 10, "max_completion_tokens": 20}
    assert translate.openai_chat_to_ollama(obj, "m")["options"] == {"num_predict": 20}
    obj = {"messages": [], "max_completion_tokens": 30}
    assert translate.openai_chat_to_ollama(obj, "m")["options"] == {"num_predict": 30}


@pytest.mark.parametrize(
    ("response_format", "format_"),
    [
        ({"type": "json_object"}, "json"),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}, SCHEMA),
        ({"type": "json_schema", "json_schema": {"name": "p"}}, None),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": "x"}}, None),
        ({"type": "json_schema", "json_schema": "x"}, None),
        ({"type": "text"}, None),
        ("json_object", None),
        (None, None),
    ],
)
def test_response_format_to_ollama_format(response_format: Any, format_: Any) -> None:
    out = translate.openai_chat_to_ollama({"messages": [], "response_format": response_format}, "m")
    assert out.get("format") == format_


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ("", {}),
        ("   ", {}),
        (None, {}),
        ({"already": "an object"}, {"already": "an object"}),
        ('{"a": ', '{"a": '),  # not JSON: kept as the string
        ("[1, 2]", [1, 2]),
    ],
)
def test_tool_call_arguments_to_ollama(arguments: Any, expected: Any) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    out = translate.openai_chat_to_ollama(
        {"messages": [{"role": "assistant", "tool_calls": [call]}]}, "m"
    )
    assert out["messages"][0]["tool_calls"] == [{"function": {"name": "f", "arguments": expected}}]


def test_tool_call_without_function_to_ollama() -> None:
    out = translate.openai_chat_to_ollama(
        {"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}, {"function": "x"}]}]}, "m"
    )
    assert out["messages"][0]["tool_calls"] == [
        {"function": {"name": "", "arguments": {}}},
        {"function": {"name": "", "arguments": {}}},
    ]


def test_openai_completion_to_ollama() -> None:
    obj = {"prompt": "def f(", "suffix": "return 1", "max_tokens": 16, "temperature": 0}
    assert translate.openai_completion_to_ollama(obj, "coder") == {
        "model": "coder",
        "prompt": "def f(",
        "stream": True,
        "suffix": "return 1",
        "options": {"temperature": 0, "num_predict": 16},
    }
    for suffix in ("", None, 3):
        out = translate.openai_completion_to_ollama({"prompt": "p", "suffix": suffix}, "m")
        assert out == {"model": "m", "prompt": "p", "stream": True}


# --- both ways ---------------------------------------------------------------------------------


def test_a_conversation_survives_the_round_trip() -> None:
    """Ollama -> OpenAI -> Ollama: texts, images, tool calls, options and format intact."""
    obj = {
        "messages": [
            {"role": "user", "content": "What is this?", "images": ["iVBORw0K", "R0lGOD"]},
            {"role": "assistant", "content": "", "tool_calls": [OLLAMA_CALL]},
            {"role": "assistant", "content": "A cat."},
        ],
        "options": {"temperature": 0.3, "num_predict": 64, "stop": ["x"], "seed": 7},
        "format": SCHEMA,
        "tools": TOOLS,
    }
    back = translate.openai_chat_to_ollama(translate.ollama_chat_to_openai(obj, "m"), "m")
    assert back == {"model": "m", "stream": True, **obj}


@given(
    st.dictionaries(
        st.text(max_size=6),
        st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
        max_size=4,
    )
)
def test_tool_arguments_object_to_string_and_back(arguments: dict[str, Any]) -> None:
    call = {"function": {"name": "f", "arguments": arguments}}
    msg = {"role": "assistant", "content": "", "tool_calls": [call]}
    out = translate.ollama_chat_to_openai({"messages": [msg]}, "m")
    text = out["messages"][0]["tool_calls"][0]["function"]["arguments"]
    assert type(text) is str and orjson.loads(text) == arguments
    back = translate.openai_chat_to_ollama(out, "m")
    assert back["messages"][0]["tool_calls"] == [call]


# --- Chunks: an Ollama backend -----------------------------------------------------------------


def test_ollama_chat_chunks() -> None:
    chunks = translate.Chunks("ollama", keep_raw=False)
    first = {"model": "m", "message": {"role": "assistant", "content": "Hi", "thinking": "t"}}
    d = chunks.feed(first)
    assert d == Delta(content="Hi", thinking="t")
    calls = {"message": {"role": "assistant", "content": "", "tool_calls": [OLLAMA_CALL, 1]}}
    assert chunks.feed(calls) == Delta(tool_calls=[OLLAMA_CALL])
    assert chunks.final is None
    done = {
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "length",
        "prompt_eval_count": 12,
        "eval_count": 34,
    }
    final = chunks.feed(done)
    assert final == Delta(done=True, done_reason="length", prompt_tokens=12, completion_tokens=34)
    assert chunks.final is final and chunks.end() is final


def test_ollama_generate_chunks_keep_raw() -> None:
    chunks = translate.Chunks("ollama", keep_raw=True)
    obj = {"response": "Hel", "thinking": "t", "done": False}
    assert chunks.feed(obj) == Delta(content="Hel", thinking="t", raw=obj)
    done = {"response": "", "done": True, "done_reason": "", "eval_count": "7", "context": [1]}
    final = chunks.feed(done)
    assert final is not None
    assert (final.done, final.done_reason, final.raw) == (True, "stop", done)
    assert (final.prompt_tokens, final.completion_tokens) == (None, None)


@pytest.mark.parametrize(
    "obj",
    [
        {"message": {"content": 5, "thinking": 3, "tool_calls": "x"}, "done": "true"},
        {"message": "garbled", "response": 1},
        {},
    ],
)
def test_ollama_odd_chunks_are_empty_pieces(obj: dict[str, Any]) -> None:
    chunks = translate.Chunks("ollama", keep_raw=False)
    assert chunks.feed(obj) == Delta()
    assert chunks.final is None


def test_ollama_done_without_reason_is_stop() -> None:
    chunks = translate.Chunks("ollama", keep_raw=False)
    d = chunks.feed({"message": {"role": "assistant", "content": ""}, "done": True})
    assert d is not None and d.done_reason == "stop"


# --- Chunks: an OpenAI backend -----------------------------------------------------------------


def oa(d: dict[str, Any] | None = None, finish: str | None = None, **more: Any) -> dict[str, Any]:
    """An OpenAI chat chunk."""
    choice = {"index": 0, "delta": d or {}, "finish_reason": finish}
    return {"id": "x", "object": "chat.completion.chunk", "choices": [choice], **more}


def test_openai_chat_chunks() -> None:
    chunks = translate.Chunks("openai", keep_raw=False)
    assert chunks.feed(oa({"role": "assistant", "content": ""})) is None  # role only
    assert chunks.feed(oa({"reasoning_content": "Let me"})) == Delta(thinking="Let me")
    assert chunks.feed(oa({"reasoning": " think"})) == Delta(thinking=" think")
    assert chunks.feed(oa({"content": "Hello"})) == Delta(content="Hello")
    assert chunks.feed(oa({"content": None})) is None
    assert chunks.feed(oa({}, "length")) is None  # the finish chunk
    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    assert chunks.feed({"id": "x", "choices": [], "usage": usage}) is None
    assert chunks.final is None
    final = chunks.end()
    assert final == Delta(done=True, done_reason="length", prompt_tokens=9, completion_tokens=3)
    assert chunks.end() is final


def test_openai_chunk_keep_raw() -> None:
    chunks = translate.Chunks("openai", keep_raw=True)
    obj = oa({"content": "x"})
    assert chunks.feed(obj) == Delta(content="x", raw=obj)


def test_openai_text_and_finish_in_one_chunk_with_usage() -> None:
    chunks = translate.Chunks("openai", keep_raw=False)
    usage = {"prompt_tokens": 2, "completion_tokens": "1"}
    assert chunks.feed(oa({"content": "Hi"}, "stop", usage=usage)) == Delta(content="Hi")
    assert chunks.end() == Delta(done=True, done_reason="stop", prompt_tokens=2)


def test_openai_completion_chunks() -> None:
    chunks = translate.Chunks("openai", keep_raw=False)
    text = {"object": "text_completion", "choices": [{"text": "Once", "finish_reason": None}]}
    assert chunks.feed(text) == Delta(content="Once")
    nothing = {"choices": [{"text": None, "index": 0}]}
    assert chunks.feed(nothing) is None
    finish = {"choices": [{"text": "", "finish_reason": "length"}]}
    assert chunks.feed(finish) is None
    assert chunks.end().done_reason == "length"


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"choices": None},
        {"choices": []},
        {"choices": ["x"]},
        {"choices": {"0": {}}},
        {"usage": None, "choices": [None]},
        oa({"content": 5, "reasoning": 3}, ""),
    ],
)
def test_openai_odd_chunks_carry_nothing(obj: dict[str, Any]) -> None:
    chunks = translate.Chunks("openai", keep_raw=False)
    assert chunks.feed(obj) is None
    assert chunks.end() == Delta(done=True, done_reason="stop")


@pytest.mark.parametrize(
    ("reason", "ours"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("tool_calls", "stop"),  # Ollama says "stop" with its tool calls
        ("content_filter", "stop"),
        ("function_call", "stop"),
    ],
)
def test_openai_finish_reasons(reason: str, ours: str) -> None:
    chunks = translate.Chunks("openai", keep_raw=False)
    chunks.feed(oa({}, reason))
    assert chunks.end().done_reason == ours


def test_openai_tool_calls_are_gathered_from_their_fragments() -> None:
    chunks = translate.Chunks("openai", keep_raw=False)
    fragments = [
        {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_", "arguments": ""},
        },
        {"index": 0, "function": {"name": "weather", "arguments": '{"city": '}},
        {"index": 1, "id": "call_2", "function": {"name": "now"}},
        {"index": 0, "function": {"arguments": '"Paris"}'}},
        {"index": 1, "function": {"arguments": 7}},
        {"index": 1},
        "junk",
        {"index": 2, "function": "junk"},
    ]
    for f in fragments:
        assert chunks.feed(oa({"tool_calls": [f]})) is None
    assert chunks.feed(oa({"tool_calls": None})) is None
    assert chunks.feed(oa({"tool_calls": 5})) is None  # not a list: ignored
    assert chunks.feed(oa({}, "tool_calls")) is None
    final = chunks.end()
    assert final == Delta(
        tool_calls=[
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "now", "arguments": {}}},
            {"function": {"name": "", "arguments": {}}},
        ],
        done=True,
        done_reason="stop",
    )


def test_openai_tool_calls_without_index_are_one_each() -> None:
    chunks = translate.Chunks("openai", keep_raw=False)
    calls = [
        {"function": {"name": "a", "arguments": "{}"}},
        {"function": {"name": "b", "arguments": "not json"}},
    ]
    chunks.feed(oa({"tool_calls": calls}))
    assert chunks.end().tool_calls == [
        {"function": {"name": "a", "arguments": {}}},
        {"function": {"name": "b", "arguments": "not json"}},
    ]


def test_openai_tool_calls_reach_an_openai_client_as_openai_tool_calls() -> None:
    """OpenAI backend -> deltas -> OpenAI client: the call and its arguments come through."""
    chunks = translate.Chunks("openai", keep_raw=False)
    chunks.feed(oa({"role": "assistant", "tool_calls": [{"index": 0, **OPENAI_CALL}]}))
    chunks.feed(oa({}, "tool_calls"))
    enc = openai.Encoder("chat", "chatcmpl-1", 1, "m", False)
    out = enc.whole([chunks.end()])
    (call,) = out["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 2}
    assert out["choices"][0]["finish_reason"] == "tool_calls"


def test_an_openai_stream_reaches_an_ollama_client() -> None:
    """OpenAI backend -> deltas -> Ollama stream: false answer."""
    chunks = translate.Chunks("openai", keep_raw=False)
    deltas = [
        d
        for obj in (
            oa({"role": "assistant", "content": ""}),
            oa({"content": "Hello"}),
            oa({"content": ", world"}),
            oa({}, "stop"),
            {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
        )
        if (d := chunks.feed(obj)) is not None
    ]
    deltas.append(chunks.end())
    agg = ollama.Aggregate(ollama.Encoder("chat", "m"))
    for d in deltas:
        agg.feed(d)
    assert agg.result(deltas[-1], "T") == {
        "model": "m",
        "created_at": "T",
        "message": {"role": "assistant", "content": "Hello, world"},
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 3,
        "eval_count": 2,
    }


def test_ollama_stream_cut_before_done_ends_with_a_stop() -> None:
    chunks = translate.Chunks("ollama", keep_raw=False)
    chunks.feed({"message": {"role": "assistant", "content": "x"}})
    assert chunks.end() == Delta(done=True, done_reason="stop")


# --- embeddings --------------------------------------------------------------------------------


def test_vectors_of_ollama() -> None:
    answer = {"model": "e", "embeddings": [[0.1, 0.2], [0.3, 0.4]], "prompt_eval_count": 8}
    assert translate.vectors_of("ollama", answer) == ([[0.1, 0.2], [0.3, 0.4]], 8)
    assert translate.vectors_of("ollama", {"embedding": [0.5]}) == ([[0.5]], None)
    assert translate.vectors_of("ollama", {"embeddings": [], "prompt_eval_count": "x"}) == (
        [],
        None,
    )
    with pytest.raises(ValueError, match="no embeddings"):
        translate.vectors_of("ollama", {"embeddings": "x", "embedding": None})


def test_vectors_of_openai_in_index_order() -> None:
    answer = {
        "object": "list",
        "data": [
            {"object": "embedding", "embedding": [2.0], "index": 2},
            {"object": "embedding", "embedding": [0.0], "index": 0},
            {"object": "embedding", "embedding": [1.0], "index": 1},
        ],
        "usage": {"prompt_tokens": 6, "total_tokens": 6},
    }
    assert translate.vectors_of("openai", answer) == ([[0.0], [1.0], [2.0]], 6)
    no_index = {"data": [{"embedding": [1.0], "index": "1"}, {"embedding": [0.0]}]}
    assert translate.vectors_of("openai", no_index) == ([[1.0], [0.0]], None)
    assert translate.vectors_of("openai", {"data": [], "usage": "x"}) == ([], None)


@pytest.mark.parametrize("answer", [{}, {"data": "x"}, {"data": [[0.1]]}, {"data": [{}, 1]}])
def test_vectors_of_openai_without_data(answer: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="no data"):
        translate.vectors_of("openai", answer)


def test_ollama_embed_answer() -> None:
    assert translate.ollama_embed_answer("e", [[0.1]], 3) == {
        "model": "e",
        "embeddings": [[0.1]],
        "prompt_eval_count": 3,
    }
    assert translate.ollama_embed_answer("e", [], None) == {"model": "e", "embeddings": []}


def test_openai_embed_answer_float() -> None:
    assert translate.openai_embed_answer("e", [[0.1, 0.2], [0.3]], 5, "float") == {
        "object": "list",
        "data": [
            {"object": "embedding", "embedding": [0.1, 0.2], "index": 0},
            {"object": "embedding", "embedding": [0.3], "index": 1},
        ],
        "model": "e",
        "usage": {"prompt_tokens": 5, "total_tokens": 5},
    }
    out = translate.openai_embed_answer("e", [], None, "float")
    assert out["data"] == [] and out["usage"] == {"prompt_tokens": 0, "total_tokens": 0}


def test_openai_embed_answer_base64() -> None:
    out = translate.openai_embed_answer("e", [[1.0, -0.5, 0.25], "already"], 2, "base64")
    first, second = out["data"]
    assert first["embedding"] == base64.b64encode(struct.pack("<3f", 1.0, -0.5, 0.25)).decode()
    assert first["embedding"] == "AACAPwAAAL8AAIA+"
    assert second["embedding"] == "already"  # not a list of numbers: left as it came


@given(
    st.lists(
        st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), max_size=64),
        max_size=4,
    )
)
def test_base64_embeddings_decode_back_to_the_float32_values(vectors: list[list[float]]) -> None:
    out = translate.openai_embed_answer("e", vectors, None, "base64")
    assert [e["index"] for e in out["data"]] == list(range(len(vectors)))
    for entry, vector in zip(out["data"], vectors, strict=True):
        raw = base64.b64decode(entry["embedding"])
        assert len(raw) == 4 * len(vector)
        assert list(struct.unpack(f"<{len(vector)}f", raw)) == vector


def test_ollamas_unlimited_num_predict_is_left_out_for_openai() -> None:
    for value in (-1, -2, 0):
        out = translate.ollama_chat_to_openai(
            {"messages": [], "options": {"num_predict": value}}, "m"
        )
        assert "max_tokens" not in out
    out = translate.ollama_chat_to_openai({"messages": [], "options": {"num_predict": 7}}, "m")
    assert out["max_tokens"] == 7


def test_a_clients_own_tool_call_ids_are_kept() -> None:
    obj = {
        "messages": [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "abc", "function": {"name": "f", "arguments": {}}},
                    {"function": "not an object"},
                ],
            },
            {"role": "tool", "content": "r", "tool_call_id": "abc"},
            {"role": "tool", "content": "r2"},
            {"role": "tool", "content": "r3", "tool_call_id": "zzz"},  # its own: kept
        ]
    }
    out = translate.ollama_chat_to_openai(obj, "m")["messages"]
    assert [c["id"] for c in out[0]["tool_calls"]] == ["abc", "call_1"]
    assert out[0]["tool_calls"][1]["function"] == {"name": "", "arguments": "{}"}
    assert out[1]["tool_call_id"] == "abc"
    assert out[2]["tool_call_id"] == "call_1"  # the first call not yet answered, in order
    assert out[3]["tool_call_id"] == "zzz"
