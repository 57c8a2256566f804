"""Pure parsing of LLM backend streams: line splitting, NDJSON and SSE chunks, error bodies.

No I/O and no asyncio here (aiohttp is imported for its exception types only), so every
wire edge case is unit-testable with plain bytes. :mod:`chatd.relay.generate` feeds the raw body
bytes as they arrive (``resp.content.readany()``, what ``iter_any()`` yields) through a
:class:`LineSplitter`, never aiohttp's line reader with its line-length limit, and each
line through a decoder:

* :class:`OllamaDecoder`: Ollama's ``/api/chat`` NDJSON, one object per line, the last one
  ``done: true`` (and it may carry content).
* :class:`OpenAIDecoder`: ``/v1/chat/completions`` SSE, ``data: {json}`` lines, then
  ``data: [DONE]``.

Both decoders return, per line, ``None`` when the line is not a chunk (blank, SSE comment or
field other than ``data``), ``""`` for a chunk without reply text (a thinking piece, the
role-only first SSE delta, a finish or usage chunk), or the text piece. They raise
:class:`WireError` for an ``error`` object inside the stream or a line that is not valid JSON.

A body is read thus (:func:`decode_body` does it whole; ``generate`` does it as the bytes
arrive): every read through :meth:`LineSplitter.feed`, each line through the decoder's
``feed``, until the decoder is ``done`` or the body ends; at the end, the line left without
its ``\\n`` (:meth:`LineSplitter.end`) through ``feed_last``, which takes a cut JSON line for
what it is, the stream cut short (``WireError("truncated")``), not a protocol violation.
Then a decoder that is not ``complete`` means the stream was cut short too. For any bytes,
that yields pieces or a WireError, never another exception (tests/unit/relay, fuzz/).

This is the per-token hot path: a line costs one ``orjson.loads`` and a few dict lookups.

:mod:`chatd.relay.failures` turns each kind of backend failure into the UpstreamError the
client will see.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import orjson

MAX_LINE = 32 * 1024 * 1024
"""Longest line accepted (bytes). Far above any real chunk (a 1 MB token is fine), but it
bounds the memory a broken or hostile backend can make a worker buffer."""


class WireError(Exception):
    """The backend broke the streaming protocol, or reported an error inside the stream.

    Attributes:
        kind: ``"error"`` (an ``{"error": ...}`` object in the stream), ``"malformed"`` (not
            JSON, or not an object), ``"too_long"`` (a line over :data:`MAX_LINE`) or
            ``"truncated"`` (the stream ended in the middle of a line, or before the reply
            was complete: a broken connection rather than a broken protocol).
        detail: the backend's error text, or a short excerpt of the bad line.
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class LineSplitter:
    """Splits a byte stream into lines on ``\\n``, whatever the read boundaries are.

    Lines are returned without the ``\\n`` but possibly with a trailing ``\\r`` and possibly
    empty: the decoders skip both (JSON allows the ``\\r`` as whitespace). A partial line is
    kept until its end arrives; only the new bytes are searched, so a line that arrives in
    many pieces costs linear time. :meth:`tail` is what is left at EOF.
    """

    __slots__ = ("_max", "_tail")

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._tail = bytearray()
        self._max = max_line

    def feed(self, data: bytes) -> list[bytes]:
        """Return the lines completed by ``data`` (raises WireError for a line over the max)."""
        tail = self._tail
        if tail:
            cut = data.find(b"\n")
            if cut < 0:
                tail += data
                self._check(len(tail))
                return []
            tail += data[:cut]
            lines = [bytes(tail)]
            tail.clear()
            lines += data[cut + 1 :].split(b"\n")
        else:
            # The common case: a read holds whole lines, so this is one split() call.
            lines = data.split(b"\n")
        last = lines.pop()
        if last:
            self._check(len(last))
            tail += last
        return lines

    def tail(self) -> bytes:
        """The bytes after the last ``\\n`` (a line that never ended)."""
        return bytes(self._tail)

    def end(self) -> list[bytes]:
        """At the end of the stream: the line left without its ``\\n``, if any (servers may
        omit the last newline); for the decoder's ``feed_last``."""
        tail = bytes(self._tail)
        self._tail.clear()
        return [tail] if tail else []

    def _check(self, size: int) -> None:
        if size > self._max:
            raise WireError("too_long", f"a line longer than {self._max} bytes")


def _loads(line: bytes) -> dict[str, object] | None:
    """Parse one JSON object; None for a blank line; WireError when it is not an object."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        if line.isspace() or not line:
            return None
        raise WireError("malformed", _excerpt(line)) from None
    if type(obj) is not dict:
        raise WireError("malformed", _excerpt(line))
    return obj


def _cut_short(line: bytes, exc: WireError) -> WireError:
    """For the last line of a stream: a malformed line that starts like JSON (``{``, or
    ``[`` of ``[DONE]``) was cut by the end of the stream; anything else stays malformed
    (an HTML error page is a protocol violation, not a truncation)."""
    if exc.kind == "malformed" and line.lstrip()[:1] in (b"{", b"["):
        return WireError("truncated", f"the stream ended in the middle of a line {exc.detail}")
    return exc


def _excerpt(line: bytes, limit: int = 80) -> str:
    text = line[:limit].decode("utf-8", "replace")
    return repr(text + ("..." if len(line) > limit else ""))


def _error_text(err: object) -> str:
    """The message of an ``error`` value: Ollama's string or OpenAI's ``{"message": ...}``."""
    if isinstance(err, dict):
        err = err.get("message") or err.get("error") or err
    return _clip(str(err))


def _clip(text: str, limit: int = 300) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


class OllamaDecoder:
    """Decodes Ollama ``/api/chat`` NDJSON lines.

    After the ``done: true`` line, :attr:`done` is True, :attr:`done_reason` is ``"stop"`` or
    ``"length"`` (anything else, such as ``"load"``, counts as ``"stop"``) and
    :attr:`eval_count` is the backend's token count when it sent one.
    """

    __slots__ = ("done", "done_reason", "eval_count")

    def __init__(self) -> None:
        self.done = False
        self.done_reason = "stop"
        self.eval_count: int | None = None

    @property
    def complete(self) -> bool:
        """Whether the stream said the reply is whole (EOF before this is a truncation)."""
        return self.done

    def feed(self, line: bytes) -> str | None:
        """The reply text of one line ("" for none), None for a blank line; see the module."""
        obj = _loads(line)
        if obj is None:
            return None
        if obj.get("error"):
            raise WireError("error", _error_text(obj["error"]))
        msg = obj.get("message")
        text = msg.get("content") if type(msg) is dict else None
        if type(text) is not str and obj.get("done") is not True:
            # Every chunk of Ollama's /api/chat carries message.content ("" for a thinking
            # or tool-call piece): one without is not Ollama's protocol. Taken as "", the
            # token it stood for would vanish from a reply stored as whole.
            raise WireError("malformed", _excerpt(line))
        if obj.get("done") is True:
            self.done = True
            if obj.get("done_reason") == "length":
                self.done_reason = "length"
            count = obj.get("eval_count")
            if type(count) is int:
                self.eval_count = count
        return text if type(text) is str else ""

    def feed_last(self, line: bytes) -> str | None:
        """:meth:`feed` for the line the stream ended in (without ``\\n``): a cut JSON line
        raises WireError("truncated")."""
        try:
            return self.feed(line)
        except WireError as exc:
            raise _cut_short(line, exc) from None


class OpenAIDecoder:
    """Decodes ``/v1/chat/completions`` SSE lines.

    Each ``data:`` line is taken as one whole event, which is what every OpenAI-compatible
    server sends (Ollama, llama.cpp, vLLM, LM Studio); other SSE fields and comments are
    ignored. :attr:`done` is set by ``data: [DONE]``; a stream that ends after a
    ``finish_reason`` but without ``[DONE]`` still counts as :attr:`complete`, since the
    reply itself was finished. ``usage.completion_tokens`` becomes :attr:`eval_count`.
    """

    __slots__ = ("done", "done_reason", "eval_count", "finished")

    def __init__(self) -> None:
        self.done = False
        self.finished = False
        self.done_reason = "stop"
        self.eval_count: int | None = None

    @property
    def complete(self) -> bool:
        """Whether the stream said the reply is whole (EOF before this is a truncation)."""
        return self.done or self.finished

    def feed(self, line: bytes) -> str | None:
        """The reply text of one line ("" for none), None for a non-data line; see the class."""
        if not line.startswith(b"data:"):
            return None  # blank separator, ": comment", "event:", "id:", "retry:"
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return ""
        obj = _loads(payload)
        if obj is None:
            return None
        if obj.get("error"):
            raise WireError("error", _error_text(obj["error"]))
        text: object = None
        choices = obj.get("choices")
        if type(choices) is list and choices:
            choice = choices[0]
            if type(choice) is dict:
                delta = choice.get("delta")
                if type(delta) is dict:
                    text = delta.get("content")
                reason = choice.get("finish_reason")
                if reason:
                    self.finished = True
                    self.done_reason = "length" if reason == "length" else "stop"
        usage = obj.get("usage")
        if type(usage) is dict:
            count = usage.get("completion_tokens")
            if type(count) is int:
                self.eval_count = count
        return text if type(text) is str else ""

    def feed_last(self, line: bytes) -> str | None:
        """:meth:`feed` for the line the stream ended in (without ``\\n``): a cut
        ``data:`` line raises WireError("truncated"), unless the reply had finished (a
        usage chunk cut after the finish chunk: the reply is whole, like without [DONE])."""
        try:
            return self.feed(line)
        except WireError as exc:
            cut = _cut_short(line[5:], exc)
            if cut.kind == "truncated" and self.finished:
                return None
            raise cut from None


class ObjectDecoder:
    """Decodes a stream into its chunks, whole: the Ollama/OpenAI APIs' pass-through.

    ``sse`` False: Ollama's NDJSON (``/api/chat``, ``/api/generate``), done at the
    ``done: true`` chunk (returned too). ``sse`` True: OpenAI's SSE (``/v1/chat/completions``,
    ``/v1/completions``), done at ``data: [DONE]``; a ``finish_reason`` makes the stream
    :attr:`complete` (as :class:`OpenAIDecoder`). :meth:`feed` returns the chunk's object, or
    None for a line that is none (blank, comment, ``[DONE]``); an ``error`` object in the
    stream raises WireError("error").
    """

    __slots__ = ("done", "finished", "sse")

    def __init__(self, sse: bool) -> None:
        self.sse = sse
        self.done = False
        self.finished = False

    @property
    def complete(self) -> bool:
        return self.done or self.finished

    def feed(self, line: bytes) -> dict[str, object] | None:
        if self.sse:
            if not line.startswith(b"data:"):
                return None
            line = line[5:].strip()
            if line == b"[DONE]":
                self.done = True
                return None
        obj = _loads(line)
        if obj is None:
            return None
        if obj.get("error"):
            raise WireError("error", _error_text(obj["error"]))
        if not self.sse:
            self.done = obj.get("done") is True
        else:
            choices = obj.get("choices")
            if type(choices) is list and choices and type(choices[0]) is dict:
                self.finished = self.finished or bool(choices[0].get("finish_reason"))
        return obj

    def feed_last(self, line: bytes) -> dict[str, object] | None:
        """:meth:`feed` for the line the stream ended in (a cut line: "truncated")."""
        try:
            return self.feed(line)
        except WireError as exc:
            cut = _cut_short(line[5:] if self.sse else line, exc)
            if cut.kind == "truncated" and self.finished:
                return None
            raise cut from None


def decode_body(chunks: Iterable[bytes], decoder: OllamaDecoder | OpenAIDecoder) -> list[str]:
    """The reply pieces of a whole body received as ``chunks``, as ``generate`` reads them
    (see the module): the non-empty pieces up to the decoder's ``done``.

    Raises:
        WireError: an error object in the stream, a protocol violation, a line too long, or
            ``"truncated"``: the body ended in the middle of a line or before the decoder
            was ``complete``.
    """
    split = LineSplitter()
    pieces: list[str] = []
    lines: Iterable[bytes]
    for data in (*chunks, None):
        last = data is None
        lines = split.end() if data is None else split.feed(data)
        for line in lines:
            piece = decoder.feed_last(line) if last else decoder.feed(line)
            if piece:
                pieces.append(piece)
            if decoder.done:
                return pieces
    if not decoder.complete:
        raise WireError("truncated", "the stream ended before the reply was complete")
    return pieces


def error_detail(body: bytes) -> str:
    """The backend's message from an error response body, clipped to one short sentence.

    Understands Ollama's ``{"error": "..."}``, OpenAI's ``{"error": {"message": ...}}`` and
    FastAPI's ``{"detail": ...}``; anything else is shown as (clipped) text.
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        if obj.get("error"):
            return _error_text(obj["error"])
        if obj.get("detail"):
            return _clip(str(obj["detail"]))
    text = body.decode("utf-8", "replace")
    return _clip(" ".join(text.split())) or "no error text"


_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_keep_alive(value: str) -> float | None:
    """Seconds an Ollama ``keep_alive`` keeps a model loaded; None means forever.

    Accepts what Ollama accepts: a number of seconds (``"300"``) or a Go duration
    (``"5m"``, ``"1h30m"``); a negative value means forever. Unparsable: 0 (never assume a
    model stays loaded).
    """
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    try:
        seconds = float(body)
    except ValueError:
        parts = _GO_PART.findall(body)
        if not parts or "".join(n + u for n, u in parts) != body:
            return 0.0
        seconds = sum(float(n) * _GO_UNITS[u] for n, u in parts)
    return None if sign < 0 and seconds > 0 else seconds


def keep_alive_value(value: str) -> str | int | float:
    """The JSON value to send as Ollama's ``keep_alive`` for the configured string.

    Ollama parses a JSON string with Go's ``time.ParseDuration``, which rejects a number
    without a unit (``"-1"`` gets HTTP 400), while a JSON number means seconds (negative:
    forever). So a bare number is sent as a number and anything else as the string.
    """
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() else number


# -- what failures mean, in one sentence each ---------------------------------------------
