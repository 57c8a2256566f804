"""Ollama's HTTP API as chatd serves it: requests checked, replies encoded. Pure.

Requests (:func:`chat_request`, :func:`generate_request`, :func:`embed_request`) are checked
for what chatd itself needs (a model, a ``stream`` flag, the right types for the fields it
reads) and otherwise passed on as the client sent them: Ollama validates the rest and its
answer reaches the client as is. A chat with ``messages: []`` or a generate with an empty
prompt is a *load* (or with ``keep_alive: 0`` an *unload*): no generation, no slot.

Replies: ``stream`` true is NDJSON, one object per line and never a blank line (Ollama's Go
client fails on one); :class:`Encoder` writes a line per :class:`~chatd.proto.httpapi.Delta`
(the backend's own chunk when it speaks Ollama, else one built from the delta).
``stream`` false is one object: :class:`Aggregate` merges the deltas as Ollama does (the
text pieces joined, the last chunk's figures). An error after the first line is one line
``{"error": "..."}`` (:func:`error_line`), then the end of the body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from chatd.proto.httpapi import ApiError, Delta, flag, model_of

RUNNING = b"Ollama is running"
"""The exact body of ``GET /`` (tools compare it byte for byte)."""

CONTENT_TYPE_NDJSON = "application/x-ndjson"
CONTENT_TYPE_JSON = "application/json; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Call:
    """A checked request of ``/api/chat`` or ``/api/generate``.

    Attributes:
        kind: ``"chat"`` or ``"generate"``.
        model: the model asked for.
        stream: NDJSON (True, Ollama's default) or one object.
        load: no messages / no prompt: load (or unload) the model, no generation.
        unload: ``keep_alive`` 0: the model is unloaded after the request.
        body: the request as the client sent it (passed on to an Ollama backend).
    """

    kind: str
    model: str
    stream: bool
    load: bool
    unload: bool
    body: dict[str, Any]


def _keep_alive_zero(obj: dict[str, Any]) -> bool:
    value = obj.get("keep_alive")
    if type(value) is int or type(value) is float:
        return value == 0
    if type(value) is str:  # "0", "0s", "0m": a Go duration
        try:
            return float(value.strip().rstrip("smhnuµ")) == 0
        except ValueError:
            return False
    return False


def chat_request(obj: dict[str, Any]) -> Call:
    """Check a ``POST /api/chat`` body (ApiError bad_request naming the field at fault)."""
    model = model_of(obj)
    messages = obj.get("messages")
    if messages is None:
        messages = []
    if type(messages) is not list:
        raise ApiError("bad_request", "messages must be a list", param="messages")
    for i, m in enumerate(messages):
        if type(m) is not dict:
            raise ApiError("bad_request", f"messages[{i}] must be an object", param="messages")
        if type(m.get("role")) is not str:
            raise ApiError("bad_request", f"messages[{i}].role is required", param="messages")
        content = m.get("content")
        if content is not None and type(content) is not str:
            raise ApiError(
                "bad_request", f"messages[{i}].content must be a string", param="messages"
            )
    stream = flag(obj, "stream", True)
    return Call("chat", model, stream, not messages, _keep_alive_zero(obj), obj)


def generate_request(obj: dict[str, Any]) -> Call:
    """Check a ``POST /api/generate`` body."""
    model = model_of(obj)
    prompt = obj.get("prompt")
    if prompt is not None and type(prompt) is not str:
        raise ApiError("bad_request", "prompt must be a string", param="prompt")
    suffix = obj.get("suffix")
    if suffix is not None and type(suffix) is not str:
        raise ApiError("bad_request", "suffix must be a string", param="suffix")
    stream = flag(obj, "stream", True)
    flag(obj, "raw", False)
    load = not prompt and not suffix and not obj.get("images")
    return Call("generate", model, stream, load, _keep_alive_zero(obj), obj)


def inputs_of(obj: dict[str, Any], name: str) -> list[str]:
    """The texts to embed: ``input`` (a string or a list of strings) or legacy ``prompt``."""
    value = obj.get(name)
    if value is None:
        return []
    if type(value) is str:
        return [value]
    if type(value) is list and all(type(v) is str for v in value):
        return list(value)
    raise ApiError("bad_request", f"{name} must be a string or a list of strings", param=name)


def embed_request(obj: dict[str, Any], legacy: bool) -> tuple[str, list[str]]:
    """Check ``POST /api/embed`` (``input``) or the legacy ``/api/embeddings`` (``prompt``):
    the model and the texts."""
    model = model_of(obj)
    texts = inputs_of(obj, "prompt" if legacy else "input")
    return model, texts


def line(obj: dict[str, Any]) -> bytes:
    """One NDJSON line (the object is never empty, so never a blank line)."""
    return orjson.dumps(obj) + b"\n"


def error_line(message: str) -> bytes:
    """The line that ends a stream that failed after its first line."""
    return orjson.dumps({"error": message}) + b"\n"


def _figures(d: Delta) -> dict[str, Any]:
    out: dict[str, Any] = {"done_reason": d.done_reason or "stop"}
    if d.prompt_tokens is not None:
        out["prompt_eval_count"] = d.prompt_tokens
    if d.completion_tokens is not None:
        out["eval_count"] = d.completion_tokens
    return out


class Encoder:
    """Builds the chunks of one reply in Ollama's shape (``kind`` ``chat`` or ``generate``).

    A delta carrying ``raw`` (the backend spoke Ollama) is sent as the backend sent it;
    otherwise :meth:`chunk` builds Ollama's chunk: ``model``, ``created_at`` (the caller's
    RFC 3339 clock reading), ``message`` (chat) or ``response`` (generate), ``done``.
    """

    def __init__(self, kind: str, model: str) -> None:
        self.kind = kind
        self.model = model

    def chunk(self, d: Delta, created_at: str) -> dict[str, Any]:
        if d.raw is not None:
            return d.raw
        out: dict[str, Any] = {"model": self.model, "created_at": created_at}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": d.content}
            if d.thinking:
                message["thinking"] = d.thinking
            if d.tool_calls:
                message["tool_calls"] = d.tool_calls
            out["message"] = message
        else:
            out["response"] = d.content
            if d.thinking:
                out["thinking"] = d.thinking
        out["done"] = d.done
        if d.done:
            out.update(_figures(d))
        return out


class Aggregate:
    """The one object of a ``stream: false`` reply, from the deltas of its stream.

    As Ollama does it: the text (and thinking) pieces joined, the tool calls gathered, and
    the last chunk's other fields (``done``, ``done_reason``, durations and counts, the
    generate ``context``).
    """

    def __init__(self, encoder: Encoder) -> None:
        self._encoder = encoder
        self._content: list[str] = []
        self._thinking: list[str] = []
        self._tools: list[dict[str, Any]] = []

    def feed(self, d: Delta) -> None:
        raw = d.raw
        if raw is None:
            self._content.append(d.content)
            self._thinking.append(d.thinking)
            self._tools += d.tool_calls
            return
        part = raw.get("message") if self._encoder.kind == "chat" else raw
        if type(part) is dict:
            text = part.get("content" if self._encoder.kind == "chat" else "response")
            if type(text) is str:
                self._content.append(text)
            thinking = part.get("thinking")
            if type(thinking) is str:
                self._thinking.append(thinking)
            tools = part.get("tool_calls")
            if type(tools) is list:
                self._tools += tools

    def result(self, last: Delta, created_at: str) -> dict[str, Any]:
        """The whole reply, ``last`` being the stream's final delta (``done``)."""
        out = dict(self._encoder.chunk(last, created_at))
        content, thinking = "".join(self._content), "".join(self._thinking)
        if self._encoder.kind == "chat":
            message = out.get("message")
            message = dict(message) if type(message) is dict else {}
            message["role"] = message.get("role") or "assistant"
            message["content"] = content
            if thinking:
                message["thinking"] = thinking
            if self._tools:
                message["tool_calls"] = self._tools
            out["message"] = message
        else:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
        return out
