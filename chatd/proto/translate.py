"""Between the client's API and the backend's: requests translated, stream chunks decoded. Pure.

A client may speak Ollama's API or OpenAI's to chatd, whatever its backends speak
(``[[llm.backends]] api``). Same API on both sides: the request goes on as sent (the model,
``stream: true`` and chatd's ``keep_alive`` or ``stream_options`` set). Across: the request
is translated here, field by field, much as Ollama's own OpenAI layer maps them (but
without its defaults: a ``temperature`` or ``top_p`` left out stays the model's own)
(``options.num_predict`` <-> ``max_tokens``, ``format`` <-> ``response_format``, images <->
``image_url`` parts, tool calls' arguments object <-> JSON string). Fields with no
counterpart are dropped (docs/compat.md lists them).

The backend's stream comes back as one JSON object per chunk (an NDJSON line, an SSE
``data:`` event); a :class:`Chunks` decoder turns each into :class:`~chatd.proto.httpapi.Delta`
values, and :meth:`Chunks.end` gives the final one.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson

from chatd.proto.httpapi import Delta

# Ollama's options -> OpenAI's request fields (both directions use this table).
_OPTIONS = (
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("seed", "seed"),
    ("stop", "stop"),
    ("num_predict", "max_tokens"),
    ("frequency_penalty", "frequency_penalty"),
    ("presence_penalty", "presence_penalty"),
)


def _int(value: object) -> int | None:
    return value if type(value) is int else None


# -- requests: Ollama client -> OpenAI backend -------------------------------------------------


def _openai_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Ollama chat messages as OpenAI's (images as data-URL parts; tool calls' arguments as
    JSON strings, each call an id). A ``tool`` message without ``tool_call_id`` answers the
    next unanswered call of the assistant message before it, in order (Ollama pairs them so;
    OpenAI-compatible servers require the id)."""
    out = []
    unanswered: list[str] = []
    count = 0
    for m in messages:
        msg: dict[str, Any] = {"role": m.get("role"), "content": m.get("content") or ""}
        images = m.get("images")
        if type(images) is list and images:
            parts: list[dict[str, Any]] = [{"type": "text", "text": msg["content"]}]
            parts += [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}}
                for img in images
                if type(img) is str
            ]
            msg["content"] = parts
        calls = m.get("tool_calls")
        if type(calls) is list and calls:
            msg["tool_calls"] = []
            unanswered = []
            for c in calls:
                if type(c) is not dict:
                    continue
                fn: dict[str, Any] = c["function"] if type(c.get("function")) is dict else {}
                own = c.get("id")  # a client that gave its calls ids pairs its results by them
                unanswered.append(own if type(own) is str and own else f"call_{count}")
                count += 1
                msg["tool_calls"].append(
                    {
                        "id": unanswered[-1],
                        "type": "function",
                        "function": {
                            "name": fn.get("name", ""),
                            "arguments": orjson.dumps(fn.get("arguments") or {}).decode(),
                        },
                    }
                )
        if type(m.get("tool_call_id")) is str:
            msg["tool_call_id"] = m["tool_call_id"]
            if m["tool_call_id"] in unanswered:
                unanswered.remove(m["tool_call_id"])
        elif m.get("role") == "tool" and unanswered:
            msg["tool_call_id"] = unanswered.pop(0)
        out.append(msg)
    return out


def _openai_options(obj: dict[str, Any], out: dict[str, Any]) -> None:
    options = obj.get("options")
    if type(options) is dict:
        for ours, theirs in _OPTIONS:
            if options.get(ours) is not None:
                out[theirs] = options[ours]
        # Ollama's num_predict -1 (no limit) and -2 (fill the context) have no OpenAI form:
        # left out, the server's own limit applies (a negative max_tokens is a 400 there).
        if type(out.get("max_tokens")) is int and out["max_tokens"] <= 0:
            del out["max_tokens"]
    fmt = obj.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif type(fmt) is dict:
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "schema", "schema": fmt},
        }


def ollama_chat_to_openai(obj: dict[str, Any], model: str) -> dict[str, Any]:
    """An ``/api/chat`` request as a streamed ``/v1/chat/completions`` request."""
    out: dict[str, Any] = {
        "model": model,
        "messages": _openai_messages(obj.get("messages") or []),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if type(obj.get("tools")) is list and obj["tools"]:
        out["tools"] = obj["tools"]
    _openai_options(obj, out)
    return out


def ollama_generate_to_openai(obj: dict[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    """An ``/api/generate`` request for an OpenAI backend: ``(path, body)``.

    A raw prompt, or one with a ``suffix`` (fill in the middle), is a text completion
    (``/v1/completions``); any other is a chat of one user turn (and the ``system`` text),
    as Ollama applies the model's template to it.
    """
    prompt = obj.get("prompt") or ""
    if obj.get("raw") is True or obj.get("suffix"):
        out: dict[str, Any] = {
            "model": model,
            "prompt": prompt,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if obj.get("suffix"):
            out["suffix"] = obj["suffix"]
        _openai_options(obj, out)
        return "/v1/completions", out
    messages: list[dict[str, Any]] = []
    if type(obj.get("system")) is str and obj["system"]:
        messages.append({"role": "system", "content": obj["system"]})
    messages.append({"role": "user", "content": prompt, "images": obj.get("images")})
    return "/v1/chat/completions", ollama_chat_to_openai({**obj, "messages": messages}, model)


# -- requests: OpenAI client -> Ollama backend -------------------------------------------------


def _text_and_images(content: Any) -> tuple[str, list[str]]:
    """An OpenAI message content (a string or a list of parts) as text and base64 images."""
    if type(content) is str:
        return content, []
    if type(content) is not list:
        return "", []
    texts, images = [], []
    for part in content:
        if type(part) is not dict:
            continue
        if part.get("type") == "text" and type(part.get("text")) is str:
            texts.append(part["text"])
        elif part.get("type") == "image_url":
            url = part.get("image_url")
            url = url.get("url") if type(url) is dict else url
            if type(url) is str and url.startswith("data:") and "," in url:
                images.append(url.split(",", 1)[1])
    return "\n".join(texts), images


def _ollama_messages(messages: list[Any]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        text, images = _text_and_images(m.get("content"))
        msg: dict[str, Any] = {"role": m.get("role"), "content": text}
        if images:
            msg["images"] = images
        calls = m.get("tool_calls")
        if type(calls) is list and calls:
            msg["tool_calls"] = [_ollama_tool_call(c) for c in calls if type(c) is dict]
        if type(m.get("name")) is str and m.get("role") == "tool":
            msg["tool_name"] = m["name"]
        out.append(msg)
    return out


def _arguments(text: Any) -> Any:
    """A tool call's arguments: OpenAI's JSON string as Ollama's object (kept as the string
    when it is not JSON)."""
    if type(text) is not str:
        return text if text is not None else {}
    try:
        return orjson.loads(text) if text.strip() else {}
    except orjson.JSONDecodeError:
        return text


def _ollama_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    fn: dict[str, Any] = call["function"] if type(call.get("function")) is dict else {}
    return {"function": {"name": fn.get("name", ""), "arguments": _arguments(fn.get("arguments"))}}


def _ollama_options(obj: dict[str, Any], out: dict[str, Any]) -> None:
    options: dict[str, Any] = {}
    for ours, theirs in _OPTIONS:
        if obj.get(theirs) is not None:
            options[ours] = obj[theirs]
    if obj.get("max_completion_tokens") is not None:
        options["num_predict"] = obj["max_completion_tokens"]
    if type(options.get("stop")) is str:  # OpenAI's one string; Ollama takes only a list
        options["stop"] = [options["stop"]]
    if options:
        out["options"] = options
    fmt = obj.get("response_format")
    if type(fmt) is dict:
        if fmt.get("type") == "json_object":
            out["format"] = "json"
        elif fmt.get("type") == "json_schema" and type(fmt.get("json_schema")) is dict:
            schema = fmt["json_schema"].get("schema")
            if type(schema) is dict:
                out["format"] = schema


def openai_chat_to_ollama(obj: dict[str, Any], model: str) -> dict[str, Any]:
    """A ``/v1/chat/completions`` request as a streamed ``/api/chat`` request."""
    out: dict[str, Any] = {
        "model": model,
        "messages": _ollama_messages(obj["messages"]),
        "stream": True,
    }
    if type(obj.get("tools")) is list and obj["tools"]:
        out["tools"] = obj["tools"]
    _ollama_options(obj, out)
    return out


def openai_completion_to_ollama(obj: dict[str, Any], model: str) -> dict[str, Any]:
    """A ``/v1/completions`` request as a streamed ``/api/generate`` request."""
    out: dict[str, Any] = {"model": model, "prompt": obj["prompt"], "stream": True}
    if type(obj.get("suffix")) is str and obj["suffix"]:
        out["suffix"] = obj["suffix"]
    _ollama_options(obj, out)
    return out


# -- stream chunks -> deltas ----------------------------------------------------------------------


class Chunks:
    """Decodes a backend's stream chunks (JSON objects) into deltas.

    ``api`` is the backend's (``ollama``: NDJSON chunks of ``/api/chat`` or ``/api/generate``;
    ``openai``: SSE chunks of ``/v1/chat/completions`` or ``/v1/completions``). ``keep_raw``
    puts the backend's chunk in each delta (the client speaks the backend's API: it gets the
    chunk as sent). :meth:`feed` returns the delta of one chunk, or None when the chunk
    carries nothing for the client (OpenAI's role-only, finish and usage chunks);
    :meth:`end` the final delta once the stream ended (the last Ollama chunk itself, or for
    OpenAI one built from the finish reason, the tool calls gathered and the usage).
    """

    def __init__(self, api: str, keep_raw: bool) -> None:
        self.api = api
        self.keep_raw = keep_raw
        self.final: Delta | None = None
        self._reason = "stop"
        self._prompt: int | None = None
        self._completion: int | None = None
        self._calls: dict[int, dict[str, Any]] = {}  # OpenAI's tool calls, by index

    def feed(self, obj: dict[str, Any]) -> Delta | None:
        return self._ollama(obj) if self.api == "ollama" else self._openai(obj)

    def _ollama(self, obj: dict[str, Any]) -> Delta:
        msg = obj.get("message")
        part = msg if type(msg) is dict else obj
        content = part.get("content") if type(msg) is dict else obj.get("response")
        thinking = part.get("thinking")
        calls = part.get("tool_calls")
        d = Delta(
            content=content if type(content) is str else "",
            thinking=thinking if type(thinking) is str else "",
            tool_calls=[c for c in calls if type(c) is dict] if type(calls) is list else [],
            raw=obj if self.keep_raw else None,
        )
        if obj.get("done") is True:
            d.done = True
            reason = obj.get("done_reason")
            d.done_reason = reason if type(reason) is str and reason else "stop"
            d.prompt_tokens = _int(obj.get("prompt_eval_count"))
            d.completion_tokens = _int(obj.get("eval_count"))
            self.final = d
        return d

    def _openai(self, obj: dict[str, Any]) -> Delta | None:
        usage = obj.get("usage")
        if type(usage) is dict:
            self._prompt = _int(usage.get("prompt_tokens"))
            self._completion = _int(usage.get("completion_tokens"))
        choices = obj.get("choices")
        choice = choices[0] if type(choices) is list and choices else None
        if type(choice) is not dict:
            return None
        reason = choice.get("finish_reason")
        if type(reason) is str and reason:
            self._reason = reason
        delta = choice.get("delta")
        if type(delta) is dict:
            content = delta.get("content")
            thinking = delta.get("reasoning_content") or delta.get("reasoning")
            calls = delta.get("tool_calls")
            for call in calls if type(calls) is list else ():
                self._gather(call)
        else:
            content, thinking = choice.get("text"), None
        d = Delta(
            content=content if type(content) is str else "",
            thinking=thinking if type(thinking) is str else "",
            raw=obj if self.keep_raw else None,
        )
        return d if d.content or d.thinking else None

    def _gather(self, call: Any) -> None:
        """One fragment of a streamed OpenAI tool call (name first, arguments in pieces)."""
        if type(call) is not dict:
            return
        index: int = call["index"] if type(call.get("index")) is int else len(self._calls)
        entry = self._calls.setdefault(index, {"name": "", "arguments": ""})
        fn = call.get("function")
        if type(fn) is dict:
            if type(fn.get("name")) is str:
                entry["name"] += fn["name"]
            if type(fn.get("arguments")) is str:
                entry["arguments"] += fn["arguments"]

    def end(self) -> Delta:
        """The final delta (``done``) of a stream that ended well."""
        if self.final is not None:
            return self.final
        reason = {"stop": "stop", "length": "length", "tool_calls": "stop"}.get(
            self._reason, "stop"
        )
        calls = [
            {"function": {"name": c["name"], "arguments": _arguments(c["arguments"])}}
            for _, c in sorted(self._calls.items())
        ]
        self.final = Delta(
            tool_calls=calls,
            done=True,
            done_reason=reason,
            prompt_tokens=self._prompt,
            completion_tokens=self._completion,
        )
        return self.final


# -- embeddings -----------------------------------------------------------------------------------


def vectors_of(api: str, answer: dict[str, Any]) -> tuple[list[Any], int | None]:
    """The vectors and the prompt token count of a backend's embeddings answer (Ollama's
    ``/api/embed``, ``embeddings``, or legacy ``/api/embeddings``, ``embedding``; OpenAI's
    ``data[].embedding`` in ``index`` order). ValueError when the answer has none."""
    if api == "ollama":
        if type(answer.get("embeddings")) is list:
            return list(answer["embeddings"]), _int(answer.get("prompt_eval_count"))
        if type(answer.get("embedding")) is list:
            return [answer["embedding"]], _int(answer.get("prompt_eval_count"))
        raise ValueError("no embeddings in the answer")
    data = answer.get("data")
    if type(data) is not list or not all(type(e) is dict for e in data):
        raise ValueError("no data in the answer")
    ordered = sorted(data, key=lambda e: e.get("index") if type(e.get("index")) is int else 0)
    usage = answer.get("usage")
    tokens = _int(usage.get("prompt_tokens")) if type(usage) is dict else None
    return [e.get("embedding") for e in ordered], tokens


def ollama_embed_answer(model: str, vectors: list[Any], tokens: int | None) -> dict[str, Any]:
    """Ollama's ``/api/embed`` answer."""
    out: dict[str, Any] = {"model": model, "embeddings": vectors}
    if tokens is not None:
        out["prompt_eval_count"] = tokens
    return out


def openai_embed_answer(
    model: str, vectors: list[Any], tokens: int | None, encoding: str
) -> dict[str, Any]:
    """OpenAI's ``/v1/embeddings`` answer (``encoding`` ``base64``: each vector as the
    base64 of its little-endian float32 values, as OpenAI sends it)."""
    data = []
    for i, vector in enumerate(vectors):
        value: Any = vector
        if encoding == "base64" and type(vector) is list:
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "embedding": value, "index": i})
    count = tokens or 0
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": count, "total_tokens": count},
    }
