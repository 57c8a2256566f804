"""What ``chatd-bench`` sends to and reads from the Ollama- and OpenAI-compatible HTTP APIs.

Pure (no I/O, no clock): the request bodies, and incremental readers of a streamed reply that
say when its **first content token** arrived, collect its text and tell a complete stream
from a cut or failed one. Unit-tested on the bytes the fake Ollama sends
(``tests/unit/bench/test_httpwire.py``).

- :class:`NdjsonReader`: ``POST /api/chat`` with ``stream: true``, Ollama's NDJSON: one JSON
  object per line; content in ``message.content``; the last object has ``"done": true``
  (and carries the last token); ``{"error": ...}`` on a line is a failure mid-stream.
- :class:`SseReader`: ``POST /v1/chat/completions`` with ``stream: true``, OpenAI's server-sent
  events: ``data: {chunk}`` events separated by a blank line, content in
  ``choices[0].delta.content``; the end is ``data: [DONE]``; an event whose object has
  ``error`` is a failure mid-stream. Comment lines (``:``) and other fields are ignored.

A *content token* is a piece of non-empty content: the first chunk of an OpenAI stream
usually carries only ``{"role": "assistant"}`` (no content) and does not count, neither does
an empty ``content`` nor a final chunk with an empty delta.
"""

from __future__ import annotations

import abc
from typing import Any

import orjson

CHAT_PATH = "/api/chat"
OPENAI_PATH = "/v1/chat/completions"
PATHS = {"ollama": CHAT_PATH, "openai": OPENAI_PATH}
JSON_HEADERS = {"Content-Type": "application/json"}


def request_body(api: str, model: str, text: str) -> bytes:
    """The streamed request of one user message ``text`` for ``api`` (``"ollama"``: Ollama's
    ``/api/chat``, ``"openai"``: ``/v1/chat/completions``), as JSON bytes."""
    if api not in PATHS:
        raise ValueError(f"unknown api {api!r}")
    messages = [{"role": "user", "content": text}]
    return orjson.dumps({"model": model, "messages": messages, "stream": True})


def auth_headers(token: str | None) -> dict[str, str]:
    """The request headers: JSON, and ``Authorization: Bearer TOKEN`` when ``token``."""
    if not token:
        return JSON_HEADERS
    return {**JSON_HEADERS, "Authorization": f"Bearer {token}"}


class StreamReader(abc.ABC):
    """Feed it the body's bytes as they arrive (:meth:`feed`), then :meth:`finish` at the end.

    ``pieces``: content tokens seen; ``text``: their concatenation; ``done``: the stream's
    end marker was seen; ``error``: the stream reported an error (its message) or a line was
    not what the API sends (``"malformed: ..."``); the first such problem is kept.
    """

    __slots__ = ("_buf", "_parts", "done", "error", "pieces")

    def __init__(self) -> None:
        self._buf = b""
        self._parts: list[str] = []
        self.pieces = 0
        self.done = False
        self.error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def feed(self, data: bytes) -> bool:
        """Take the next bytes of the body; True when they completed the reply's first
        content token (so the caller timestamps the first token with this chunk)."""
        before = self.pieces
        buf = self._buf + data if self._buf else data
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            self._line(buf[start:nl].rstrip(b"\r"))
            start = nl + 1
        self._buf = buf[start:]
        return before == 0 and self.pieces > 0

    def finish(self) -> bool:
        """The body ended: read what was left without a final newline; same return value as
        :meth:`feed`."""
        before = self.pieces
        rest, self._buf = self._buf.rstrip(b"\r"), b""
        if rest:
            self._line(rest)
        self._end()
        return before == 0 and self.pieces > 0

    @property
    def ok(self) -> bool:
        """The stream ended as it should: its end marker seen and no error."""
        return self.done and self.error is None

    def _content(self, piece: Any) -> None:
        if isinstance(piece, str) and piece:
            self._parts.append(piece)
            self.pieces += 1

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why

    @abc.abstractmethod
    def _line(self, line: bytes) -> None:
        """One whole line of the body (NDJSON: a chunk; SSE: a field line)."""

    def _end(self) -> None:  # noqa: B027 - an optional hook: nothing by default
        """Called once by :meth:`finish` after the last line."""


class NdjsonReader(StreamReader):
    """Ollama's ``/api/chat`` stream (see the module docstring)."""

    __slots__ = ()

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            self._fail("malformed: not JSON")
            return
        if not isinstance(obj, dict):
            self._fail("malformed: not an object")
            return
        if "error" in obj:
            self._fail(str(obj["error"]))
            return
        msg = obj.get("message")
        if isinstance(msg, dict):
            self._content(msg.get("content"))
        if obj.get("done") is True:
            self.done = True


class SseReader(StreamReader):
    """OpenAI's ``/v1/chat/completions`` stream (see the module docstring): the ``data``
    lines of an event are joined with newlines and handled at the blank line ending it."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        super().__init__()
        self._data: list[bytes] = []

    def _line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
        elif line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        # ":" comments, "event:", "id:", "retry:": nothing to do for a chat completion

    def _end(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        if not self._data:
            return
        data = b"\n".join(self._data)
        self._data = []
        if data.strip() == b"[DONE]":
            self.done = True
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._fail("malformed: not JSON")
            return
        if not isinstance(obj, dict):
            self._fail("malformed: not an object")
            return
        if "error" in obj:
            err = obj["error"]
            self._fail(str(err.get("message", err) if isinstance(err, dict) else err))
            return
        choices = obj.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            delta = choices[0].get("delta")
            if isinstance(delta, dict):
                self._content(delta.get("content"))


def reader_for(api: str) -> StreamReader:
    """A new reader for one streamed reply of ``api`` (``"ollama"`` or ``"openai"``)."""
    if api == "ollama":
        return NdjsonReader()
    if api == "openai":
        return SseReader()
    raise ValueError(f"unknown api {api!r}")
