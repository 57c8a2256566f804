"""OpenAI's HTTP API as chatd serves it: requests checked, replies encoded. Pure.

Requests (:func:`chat_request`, :func:`completion_request`, :func:`embeddings_request`) are
checked for what chatd needs; the rest is translated for the backend
(:mod:`chatd.proto.translate`). Only one choice per request (``n`` 1).

Replies are always built here from :class:`~chatd.proto.httpapi.Delta` values, whatever the
backend spoke, so every client sees the same guarantees (:class:`Encoder`):

* ``stream: true``: SSE events ``data: {json}\\n\\n``; the first chunk's delta carries
  ``role: "assistant"``; then one chunk per piece; then a *finish chunk* (an empty delta and
  ``finish_reason``); then, when the request asked ``stream_options.include_usage``, a usage
  chunk (``choices: []``, ``usage``; the other chunks then carry ``usage: null``); then
  ``data: [DONE]``. An error after the first event is one ``data: {"error": {...}}`` event
  and the end of the body, without ``[DONE]`` (:func:`error_event`): clients raise it.
* ``stream: false``: one ``chat.completion`` (or ``text_completion``) object
  (:meth:`Encoder.whole`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from chatd.proto.httpapi import ApiError, Delta, flag, model_of, openai_error_object

CONTENT_TYPE_SSE = "text/event-stream"
CONTENT_TYPE_JSON = "application/json"
DONE = b"data: [DONE]\n\n"
FINGERPRINT = "fp_chatd"


@dataclass(frozen=True, slots=True)
class Call:
    """A checked ``/v1/chat/completions`` (``kind`` chat) or ``/v1/completions`` (completion)
    request: the model, ``stream``, whether a usage chunk was asked, and the body."""

    kind: str
    model: str
    stream: bool
    include_usage: bool
    body: dict[str, Any]


def _common(obj: dict[str, Any]) -> tuple[str, bool, bool]:
    model = model_of(obj)
    stream = flag(obj, "stream", False)
    options = obj.get("stream_options")
    if options is not None and type(options) is not dict:
        raise ApiError("bad_request", "stream_options must be an object", param="stream_options")
    usage = flag(options or {}, "include_usage", False)
    n = obj.get("n")
    if n is not None and n != 1:
        raise ApiError("bad_request", "only n = 1 is supported", param="n")
    return model, stream, usage


def chat_request(obj: dict[str, Any]) -> Call:
    """Check a ``POST /v1/chat/completions`` body."""
    model, stream, usage = _common(obj)
    messages = obj.get("messages")
    if type(messages) is not list or not messages:
        raise ApiError(
            "bad_request", "messages must be a non-empty list of messages", param="messages"
        )
    for i, m in enumerate(messages):
        if type(m) is not dict or type(m.get("role")) is not str:
            raise ApiError(
                "bad_request", f"messages[{i}] must be an object with a role", param="messages"
            )
    return Call("chat", model, stream, usage, obj)


def completion_request(obj: dict[str, Any]) -> Call:
    """Check a ``POST /v1/completions`` body (one prompt string)."""
    model, stream, usage = _common(obj)
    prompt = obj.get("prompt")
    if type(prompt) is list and len(prompt) == 1 and type(prompt[0]) is str:
        prompt = prompt[0]
    if type(prompt) is not str:
        raise ApiError("bad_request", "prompt must be a string", param="prompt")
    return Call("completion", model, stream, usage, {**obj, "prompt": prompt})


def embeddings_request(obj: dict[str, Any]) -> tuple[str, list[str], str]:
    """Check ``POST /v1/embeddings``: the model, the texts, the encoding (float or base64)."""
    model = model_of(obj)
    value = obj.get("input")
    if type(value) is str:
        texts = [value]
    elif type(value) is list and value and all(type(v) is str for v in value):
        texts = list(value)
    else:
        raise ApiError(
            "bad_request", "input must be a string or a non-empty list of strings", param="input"
        )
    encoding = obj.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ApiError(
            "bad_request", "encoding_format must be float or base64", param="encoding_format"
        )
    return model, texts, encoding


def event(obj: dict[str, Any]) -> bytes:
    """One SSE event carrying ``obj``."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def error_event(err: ApiError) -> bytes:
    """The event that ends a stream that failed after its first event (no ``[DONE]``)."""
    return event({"error": openai_error_object(err)})


def _tool_calls(calls: list[dict[str, Any]], first_index: int, ids: list[str]) -> list[Any]:
    """Ollama-shaped tool calls as OpenAI's (arguments as a JSON string, an id each)."""
    out = []
    for i, call in enumerate(calls):
        fn: dict[str, Any] = call["function"] if type(call.get("function")) is dict else {}
        args = fn.get("arguments", {})
        index = first_index + i
        ids.append(f"call_{index}")
        out.append(
            {
                "index": index,
                "id": call.get("id") or ids[-1],
                "type": "function",
                "function": {
                    "name": fn.get("name", ""),
                    "arguments": args if type(args) is str else orjson.dumps(args).decode(),
                },
            }
        )
    return out


def finish_reason(d: Delta, had_tools: bool) -> str:
    """OpenAI's ``finish_reason`` for the final delta."""
    if had_tools:
        return "tool_calls"
    return "length" if d.done_reason == "length" else "stop"


class Encoder:
    """Builds the events (or the whole object) of one reply; see the module.

    ``rid`` is the response id (``chatcmpl-...`` / ``cmpl-...``), ``created`` the Unix time
    of the request, ``model`` the model the client asked for.
    """

    def __init__(self, kind: str, rid: str, created: int, model: str, include_usage: bool) -> None:
        self.kind = kind
        self._base: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
        }
        self._usage = include_usage
        self._started = False
        self._tools = 0
        self._ids: list[str] = []

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        obj = {**self._base, "choices": [choice]}
        if self._usage:
            obj["usage"] = None
        return event(obj)

    def _choice(self, d: Delta | None, finish: str | None) -> dict[str, Any]:
        if self.kind != "chat":
            return {
                "text": d.content if d else "",
                "index": 0,
                "logprobs": None,
                "finish_reason": finish,
            }
        delta: dict[str, Any] = {}
        if not self._started:
            delta["role"] = "assistant"
            self._started = True
        if d is not None:
            if d.content or (not d.thinking and not d.tool_calls):
                delta["content"] = d.content
            if d.thinking:
                delta["reasoning"] = d.thinking
            if d.tool_calls:
                delta["tool_calls"] = _tool_calls(d.tool_calls, self._tools, self._ids)
                self._tools += len(d.tool_calls)
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def events(self, d: Delta) -> bytes:
        """The events for one delta (several for the last one: its text, the finish chunk,
        the usage chunk, ``[DONE]``); b"" when it carries nothing to send."""
        out = b""
        if d.content or d.thinking or d.tool_calls or (not self._started and self.kind == "chat"):
            out = self._chunk(self._choice(d, None))
        if d.done:
            out += self._chunk(self._choice(None, finish_reason(d, self._tools > 0)))
            if self._usage:
                out += event({**self._base, "choices": [], "usage": usage(d)})
            out += DONE
        return out

    def whole(self, deltas: list[Delta]) -> dict[str, Any]:
        """The ``stream: false`` answer from every delta of the reply (the last one done)."""
        last = deltas[-1]
        text = "".join(d.content for d in deltas)
        tools = [c for d in deltas for c in d.tool_calls]
        finish = finish_reason(last, bool(tools))
        base = dict(self._base)
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            thinking = "".join(d.thinking for d in deltas)
            if thinking:
                message["reasoning"] = thinking
            if tools:
                message["tool_calls"] = [
                    {k: v for k, v in c.items() if k != "index"} for c in _tool_calls(tools, 0, [])
                ]
            base["object"] = "chat.completion"
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice], "usage": usage(last)}


def usage(d: Delta) -> dict[str, int]:
    """OpenAI's ``usage`` from the final delta's counts (0 where the backend gave none)."""
    prompt = d.prompt_tokens or 0
    completion = d.completion_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def model_object(name: str, created: int, owned_by: str = "chatd") -> dict[str, Any]:
    """One entry of ``GET /v1/models`` (and the answer of ``GET /v1/models/{id}``)."""
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by}
