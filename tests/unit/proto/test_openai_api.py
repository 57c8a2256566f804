"""OpenAI's HTTP API core: requests checked, SSE events and whole objects built."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatd.proto import openai
from chatd.proto.httpapi import ApiError, Delta

RID, CREATED = "chatcmpl-abc", 1_700_000_000
CALL = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
BASE = {
    "id": RID,
    "object": "chat.completion.chunk",
    "created": CREATED,
    "model": "gpt-x",
    "system_fingerprint": "fp_chatd",
}


def bad(fn: Callable[..., object], *args: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)
    assert (info.value.kind, info.value.status) == ("bad_request", 400)
    return info.value


def sse(body: bytes) -> list[Any]:
    """The events of an SSE body as OpenAI's clients read them: ``data: `` lines, each event
    ended by a blank line; the JSON objects, and the string ``"[DONE]"`` for the end."""
    assert body.endswith(b"\n\n")
    out: list[Any] = []
    for ev in body[:-2].split(b"\n\n"):
        assert ev.startswith(b"data: ") and b"\n" not in ev, ev
        data = ev[len(b"data: ") :]
        out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def chunk(choice: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {**BASE, "choices": [choice], **more}


def delta(d: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}


def chat_encoder(include_usage: bool = False) -> openai.Encoder:
    return openai.Encoder("chat", RID, CREATED, "gpt-x", include_usage)


def test_constants() -> None:
    assert openai.CONTENT_TYPE_SSE == "text/event-stream"
    assert openai.CONTENT_TYPE_JSON == "application/json"
    assert openai.DONE == b"data: [DONE]\n\n"


# --- requests ----------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "hi"}]


def test_chat_request() -> None:
    body: dict[str, Any] = {"model": "gpt-x", "messages": MESSAGES}
    assert openai.chat_request(body) == openai.Call("chat", "gpt-x", False, False, body)
    body = {
        "model": "gpt-x",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 1,
    }
    assert openai.chat_request(body) == openai.Call("chat", "gpt-x", True, True, body)
    body = {"model": "m", "messages": MESSAGES, "stream": True, "stream_options": None, "n": None}
    assert openai.chat_request(body).include_usage is False
    body = {"model": "m", "messages": MESSAGES, "stream_options": {}}
    assert openai.chat_request(body).include_usage is False


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ({"messages": MESSAGES}, "model is required", "model"),
        (
            {"model": "m", "messages": MESSAGES, "stream": "1"},
            "stream must be true or false",
            "stream",
        ),
        (
            {"model": "m", "messages": MESSAGES, "stream_options": True},
            "stream_options must be an object",
            "stream_options",
        ),
        (
            {"model": "m", "messages": MESSAGES, "stream_options": {"include_usage": 1}},
            "include_usage must be true or false",
            "include_usage",
        ),
        ({"model": "m", "messages": MESSAGES, "n": 2}, "only n = 1 is supported", "n"),
        ({"model": "m", "messages": MESSAGES, "n": 0}, "only n = 1 is supported", "n"),
        ({"model": "m"}, "messages must be a non-empty list of messages", "messages"),
        (
            {"model": "m", "messages": []},
            "messages must be a non-empty list of messages",
            "messages",
        ),
        (
            {"model": "m", "messages": {"role": "user"}},
            "messages must be a non-empty list of messages",
            "messages",
        ),
        (
            {"model": "m", "messages": ["hi"]},
            "messages[0] must be an object with a role",
            "messages",
        ),
        (
            {"model": "m", "messages": [*MESSAGES, {"content": "x"}]},
            "messages[1] must be an object with a role",
            "messages",
        ),
    ],
)
def test_chat_request_rejects(body: dict[str, Any], message: str, param: str) -> None:
    err = bad(openai.chat_request, body)
    assert (err.message, err.param) == (message, param)


def test_completion_request() -> None:
    body = {"model": "m", "prompt": "Say this", "stream": True}
    call = openai.completion_request(body)
    assert call == openai.Call("completion", "m", True, False, body)
    # A list of one prompt is that prompt (the body passed on says so; the client's is intact).
    body = {"model": "m", "prompt": ["Say this"], "max_tokens": 7}
    call = openai.completion_request(body)
    assert call.body == {"model": "m", "prompt": "Say this", "max_tokens": 7}
    assert body["prompt"] == ["Say this"]


@pytest.mark.parametrize("prompt", [None, 1, ["a", "b"], [], [1], {"a": 1}])
def test_completion_request_needs_one_prompt(prompt: object) -> None:
    err = bad(openai.completion_request, {"model": "m", "prompt": prompt})
    assert (err.message, err.param) == ("prompt must be a string", "prompt")


def test_embeddings_request() -> None:
    assert openai.embeddings_request({"model": "e", "input": "x"}) == ("e", ["x"], "float")
    assert openai.embeddings_request(
        {"model": "e", "input": ["x", "y"], "encoding_format": "base64"}
    ) == ("e", ["x", "y"], "base64")
    assert openai.embeddings_request({"model": "e", "input": "x", "encoding_format": None}) == (
        "e",
        ["x"],
        "float",
    )


@pytest.mark.parametrize("value", [None, [], [1, 2], ["a", None], 3, {"a": "b"}])
def test_embeddings_request_rejects_input(value: object) -> None:
    err = bad(openai.embeddings_request, {"model": "e", "input": value})
    assert err.param == "input"
    assert err.message == "input must be a string or a non-empty list of strings"


@pytest.mark.parametrize("encoding", ["hex", "FLOAT", 1, ["float"]])
def test_embeddings_request_rejects_encoding(encoding: object) -> None:
    err = bad(openai.embeddings_request, {"model": "e", "input": "x", "encoding_format": encoding})
    assert (err.message, err.param) == (
        "encoding_format must be float or base64",
        "encoding_format",
    )


# --- events ------------------------------------------------------------------------------------


def test_event_bytes() -> None:
    assert openai.event({"a": "b\nc"}) == b'data: {"a":"b\\nc"}\n\n'


def test_error_event_is_one_event_without_done() -> None:
    out = openai.error_event(ApiError("timeout", "the backend timed out"))
    assert out == (
        b'data: {"error":{"message":"the backend timed out","type":"server_error",'
        b'"param":null,"code":"backend_timeout"}}\n\n'
    )
    assert b"[DONE]" not in out


# --- streamed chat -----------------------------------------------------------------------------


def test_chat_stream_role_first_then_pieces_finish_and_done() -> None:
    enc = chat_encoder()
    body = b"".join(
        enc.events(d)
        for d in [
            Delta(content="Hel"),
            Delta(content="lo"),
            Delta(done=True, done_reason="stop", prompt_tokens=5, completion_tokens=2),
        ]
    )
    assert sse(body) == [
        chunk(delta({"role": "assistant", "content": "Hel"})),
        chunk(delta({"content": "lo"})),
        chunk(delta({}, "stop")),
        "[DONE]",
    ]
    assert body.endswith(b"}\n\ndata: [DONE]\n\n")
    assert body.count(b"[DONE]") == 1


def test_chat_stream_with_usage() -> None:
    enc = chat_encoder(include_usage=True)
    body = enc.events(Delta(content="Hi")) + enc.events(
        Delta(done=True, done_reason="length", prompt_tokens=5, completion_tokens=1)
    )
    assert sse(body) == [
        chunk(delta({"role": "assistant", "content": "Hi"}), usage=None),
        chunk(delta({}, "length"), usage=None),
        {
            **BASE,
            "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        },
        "[DONE]",
    ]


def test_chat_stream_usage_without_counts_is_zero() -> None:
    enc = chat_encoder(include_usage=True)
    events = sse(enc.events(Delta(done=True)))
    assert events[-2]["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_empty_reply_still_has_the_role_chunk() -> None:
    enc = chat_encoder()
    assert sse(enc.events(Delta(done=True))) == [
        chunk(delta({"role": "assistant", "content": ""})),
        chunk(delta({}, "stop")),
        "[DONE]",
    ]


def test_an_empty_piece_first_sends_the_role_then_nothing() -> None:
    enc = chat_encoder()
    assert sse(enc.events(Delta())) == [chunk(delta({"role": "assistant", "content": ""}))]
    assert enc.events(Delta()) == b""
    assert sse(enc.events(Delta(content="x"))) == [chunk(delta({"content": "x"}))]


def test_final_delta_with_text_sends_it_before_the_finish_chunk() -> None:
    enc = chat_encoder()
    enc.events(Delta(content="a"))
    assert sse(enc.events(Delta(content="b", done=True))) == [
        chunk(delta({"content": "b"})),
        chunk(delta({}, "stop")),
        "[DONE]",
    ]


def test_thinking_is_reasoning() -> None:
    enc = chat_encoder()
    body = enc.events(Delta(thinking="hmm")) + enc.events(Delta(thinking=" ok", content="Yes"))
    assert sse(body) == [
        chunk(delta({"role": "assistant", "reasoning": "hmm"})),
        chunk(delta({"content": "Yes", "reasoning": " ok"})),
    ]


def test_tool_calls_stream_with_indices_ids_and_string_arguments() -> None:
    enc = chat_encoder()
    second = {"id": "call_own", "function": {"name": "add", "arguments": '{"a":1}'}}
    third: dict[str, Any] = {"function": {"name": "now"}}  # no arguments: {}
    fourth: dict[str, Any] = {"function": "garbled"}
    body = (
        enc.events(Delta(tool_calls=[CALL]))
        + enc.events(Delta(tool_calls=[second, third, fourth]))
        + enc.events(Delta(done=True, done_reason="stop"))
    )
    events = sse(body)
    assert events[0] == chunk(
        delta(
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_0",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            }
        )
    )
    assert events[1]["choices"][0]["delta"] == {
        "tool_calls": [
            {
                "index": 1,
                "id": "call_own",
                "type": "function",
                "function": {"name": "add", "arguments": '{"a":1}'},
            },
            {
                "index": 2,
                "id": "call_2",
                "type": "function",
                "function": {"name": "now", "arguments": "{}"},
            },
            {
                "index": 3,
                "id": "call_3",
                "type": "function",
                "function": {"name": "", "arguments": "{}"},
            },
        ]
    }
    assert events[2:] == [chunk(delta({}, "tool_calls")), "[DONE]"]
    args = events[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
    assert orjson.loads(args) == {"city": "Paris"}


def test_tool_calls_in_the_final_delta_finish_with_tool_calls() -> None:
    enc = chat_encoder()
    enc.events(Delta(content="Let me check."))
    events = sse(enc.events(Delta(tool_calls=[CALL], done=True, done_reason="stop")))
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, "tool_calls"]
    assert "content" not in events[0]["choices"][0]["delta"]


# --- streamed completion -----------------------------------------------------------------------


def test_completion_stream() -> None:
    enc = openai.Encoder("completion", "cmpl-1", CREATED, "m", True)
    base = {**BASE, "id": "cmpl-1", "object": "text_completion", "model": "m"}
    assert enc.events(Delta()) == b""  # nothing to send, no role in completions
    body = (
        enc.events(Delta(content="Once"))
        + enc.events(Delta(thinking="(hidden)"))
        + enc.events(Delta(content=" upon", done=True, done_reason="length", prompt_tokens=4))
    )

    def text(t: str, finish: str | None = None) -> dict[str, Any]:
        c = {"text": t, "index": 0, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [c], "usage": None}

    assert sse(body) == [
        text("Once"),
        text(""),
        text(" upon"),
        text("", "length"),
        {
            **base,
            "choices": [],
            "usage": {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4},
        },
        "[DONE]",
    ]


# --- whole answers -----------------------------------------------------------------------------


def test_whole_chat() -> None:
    enc = chat_encoder(include_usage=True)
    deltas = [
        Delta(thinking="Think"),
        Delta(thinking="ing", content="The answer"),
        Delta(content=" is 4."),
        Delta(done=True, done_reason="stop", prompt_tokens=9, completion_tokens=4),
    ]
    assert enc.whole(deltas) == {
        **BASE,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "The answer is 4.",
                    "reasoning": "Thinking",
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
    }


def test_whole_chat_with_tool_calls() -> None:
    enc = chat_encoder()
    other = {"id": "x1", "function": {"name": "add", "arguments": "{}"}}
    out = enc.whole([Delta(tool_calls=[CALL]), Delta(tool_calls=[other], done=True)])
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            },
            {"id": "x1", "type": "function", "function": {"name": "add", "arguments": "{}"}},
        ],
    }


def test_whole_chat_length_and_empty() -> None:
    enc = chat_encoder()
    out = enc.whole([Delta(done=True, done_reason="length")])
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": ""}
    assert out["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def test_whole_completion() -> None:
    enc = openai.Encoder("completion", "cmpl-1", CREATED, "m", False)
    out = enc.whole([Delta(content="Hi"), Delta(content="!", done=True, completion_tokens=2)])
    assert out == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": CREATED,
        "model": "m",
        "system_fingerprint": "fp_chatd",
        "choices": [{"text": "Hi!", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 2, "total_tokens": 2},
    }


@pytest.mark.parametrize(
    ("reason", "tools", "finish"),
    [
        ("stop", False, "stop"),
        ("length", False, "length"),
        ("", False, "stop"),
        ("load", False, "stop"),
        ("length", True, "tool_calls"),
        ("stop", True, "tool_calls"),
    ],
)
def test_finish_reason(reason: str, tools: bool, finish: str) -> None:
    assert openai.finish_reason(Delta(done=True, done_reason=reason), tools) == finish


def test_usage_and_model_object() -> None:
    assert openai.usage(Delta(prompt_tokens=3, completion_tokens=4)) == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }
    assert openai.model_object("llama3:latest", 42) == {
        "id": "llama3:latest",
        "object": "model",
        "created": 42,
        "owned_by": "chatd",
    }
    assert openai.model_object("m", 1, owned_by="library")["owned_by"] == "library"


# --- properties --------------------------------------------------------------------------------

pieces = st.lists(st.text(max_size=12), max_size=12)


@given(pieces, st.booleans(), st.sampled_from(["stop", "length"]))
def test_any_chat_stream_parses_back_to_the_text(
    parts: list[str], include_usage: bool, reason: str
) -> None:
    enc = chat_encoder(include_usage)
    deltas = [Delta(content=p) for p in parts]
    deltas.append(Delta(done=True, done_reason=reason, prompt_tokens=1, completion_tokens=2))
    body = b"".join(enc.events(d) for d in deltas)
    assert body.endswith(b"\n\ndata: [DONE]\n\n") and body.count(b"data: [DONE]") == 1
    events = sse(body)
    assert events[-1] == "[DONE]"
    objs = events[:-1]
    if include_usage:
        assert objs[-1]["choices"] == [] and objs[-1]["usage"]["total_tokens"] == 3
        objs = objs[:-1]
        assert all(o["usage"] is None for o in objs)
    else:
        assert all("usage" not in o for o in objs)
    choices = [o["choices"][0] for o in objs]
    assert choices[0]["delta"]["role"] == "assistant"
    assert all("role" not in c["delta"] for c in choices[1:])
    assert choices[-1] == delta({}, reason)
    assert all(c["finish_reason"] is None for c in choices[:-1])
    assert "".join(c["delta"].get("content", "") for c in choices) == "".join(parts)
    assert all(o["id"] == RID and o["object"] == "chat.completion.chunk" for o in objs)


@given(pieces)
def test_any_completion_stream_parses_back_to_the_text(parts: list[str]) -> None:
    enc = openai.Encoder("completion", "cmpl-1", CREATED, "m", False)
    deltas = [Delta(content=p) for p in parts] + [Delta(done=True)]
    events = sse(b"".join(enc.events(d) for d in deltas))
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "".join(parts)
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


@given(pieces)
def test_whole_joins_any_split(parts: list[str]) -> None:
    deltas = [Delta(content=p) for p in parts] + [Delta(done=True)]
    assert chat_encoder().whole(deltas)["choices"][0]["message"]["content"] == "".join(parts)
