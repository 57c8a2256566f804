"""Property tests of chatd.relay.wire: the line splitter and the NDJSON / SSE decoders.

The contracts (wire's module docstring): however a body is cut into reads, the same pieces
come out; a stream cut short raises WireError("truncated") and nothing else; any bytes at
all give pieces or a WireError, never another exception. ``decode_body`` is the whole
protocol as ``generate`` runs it, read by read.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd.errors import UpstreamRejected, UpstreamUnavailable
from chatd.relay.failures import connection_error
from chatd.relay.wire import (
    LineSplitter,
    OllamaDecoder,
    OpenAIDecoder,
    WireError,
    decode_body,
)

SETTINGS = settings(
    max_examples=int(os.environ.get("CHATD_WIRE_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Bytes rich in what matters to the parsers: line ends, JSON punctuation, SSE prefixes,
# invalid UTF-8 and whitespace.
ATOMS = [b"\n", b"\r\n", b"\r", b"{", b"}", b'"', b":", b"data:", b" ", b"\xff", b"[DONE]"]
ATOMS += [b'{"done":true}', b'{"error":"x"}', b'{"choices":[{"delta":{"content":"t"}}]}']
wire_bytes = st.lists(st.sampled_from(ATOMS) | st.binary(max_size=8), max_size=30).map(b"".join)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the offsets ``cuts`` (any, repeated, out of order): empty reads too."""
    points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


cuts = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12)


def decoder_for(api: str) -> OllamaDecoder | OpenAIDecoder:
    return OllamaDecoder() if api == "ollama" else OpenAIDecoder()


def outcome(api: str, chunks: list[bytes]) -> tuple[Any, ...]:
    """What a body gives: the pieces and the decoder's verdict, or the WireError's kind."""
    decoder = decoder_for(api)
    try:
        pieces = decode_body(chunks, decoder)
    except WireError as exc:
        assert exc.kind in ("error", "malformed", "too_long", "truncated")
        return ("error", exc.kind)
    assert decoder.complete
    return ("ok", pieces, decoder.done_reason, decoder.eval_count)


# -- the line splitter ------------------------------------------------------------------


@SETTINGS
@given(wire_bytes, cuts)
def test_any_chunking_gives_the_same_lines(data: bytes, at: list[int]) -> None:
    split = LineSplitter()
    lines = [line for chunk in chunked(data, at) for line in split.feed(chunk)]
    lines += split.end()
    *whole, last = data.split(b"\n")
    assert lines == whole + ([last] if last else [])
    assert split.end() == []  # end() leaves nothing behind


def test_a_line_over_the_limit_raises_too_long_in_any_chunking() -> None:
    for size in (1, 3, 10):
        split = LineSplitter(max_line=8)
        with pytest.raises(WireError) as info:
            for _ in range(0, 20, size):
                split.feed(b"x" * size)
        assert info.value.kind == "too_long"


# -- valid streams ----------------------------------------------------------------------


@dataclass
class Stream:
    """A valid body, its expected pieces and verdict, and where it becomes complete."""

    data: bytes
    pieces: list[str]
    done_reason: str
    eval_count: int | None
    complete_at: int  # the end of the line that completes the reply (its JSON, not its \n)


texts = st.text(max_size=12)


@st.composite
def ollama_streams(draw: st.DrawFn) -> Stream:
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    out, pieces = b"", []
    for text in draw(st.lists(texts, max_size=8)):
        if draw(st.booleans()):  # a thinking chunk: no reply text
            thinking = {"role": "assistant", "content": "", "thinking": text}
            out += orjson.dumps({"message": thinking, "done": False}) + eol
        msg = {"role": "assistant", "content": text}
        out += orjson.dumps({"model": "m", "message": msg, "done": False}) + eol
        out += draw(st.sampled_from([b"", eol, b"  " + eol]))  # blank lines are skipped
        pieces += [text] if text else []
    last = draw(texts)
    reason = draw(st.sampled_from(["stop", "length", "load"]))
    count = draw(st.none() | st.integers(min_value=0, max_value=1 << 40))
    done: dict[str, Any] = {"message": {"role": "assistant", "content": last}, "done": True}
    done |= {"done_reason": reason} | ({} if count is None else {"eval_count": count})
    line = orjson.dumps(done)
    complete_at = len(out) + len(line)
    out += line + eol
    verdict = "length" if reason == "length" else "stop"  # "load" and others count as stop
    return Stream(out, pieces + ([last] if last else []), verdict, count, complete_at)


@st.composite
def openai_streams(draw: st.DrawFn) -> Stream:
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))

    def event(obj: Any) -> bytes:
        payload = obj if isinstance(obj, bytes) else orjson.dumps(obj)
        return b"data: " + payload + eol + eol

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {"id": "c1", "object": "chat.completion.chunk", "choices": [choice]}

    out, pieces = event(chunk({"role": "assistant"})), []
    for text in draw(st.lists(texts, max_size=8)):
        out += draw(st.sampled_from([b"", b": keep-alive" + eol + eol, b"event: x" + eol]))
        out += event(chunk({"content": text}))
        pieces += [text] if text else []
    finish = draw(st.sampled_from(["stop", "length", "tool_calls"]))
    line = b"data: " + orjson.dumps(chunk({}, finish))
    complete_at = len(out) + len(line)
    out += line + eol + eol
    count = draw(st.none() | st.integers(min_value=0, max_value=1 << 40))
    if count is not None:
        out += event({"id": "c1", "choices": [], "usage": {"completion_tokens": count}})
    out += event(b"[DONE]")
    reason = "length" if finish == "length" else "stop"
    return Stream(out, pieces, reason, count, complete_at)


streams = st.sampled_from(["ollama", "openai"]).flatmap(
    lambda api: st.tuples(st.just(api), ollama_streams() if api == "ollama" else openai_streams())
)


@SETTINGS
@given(streams, cuts)
def test_any_chunking_of_a_valid_stream_gives_the_same_pieces(
    api_stream: tuple[str, Stream], at: list[int]
) -> None:
    api, s = api_stream
    expected = ("ok", s.pieces, s.done_reason, s.eval_count)
    assert outcome(api, [s.data]) == expected
    assert outcome(api, chunked(s.data, at)) == expected


@SETTINGS
@given(streams, st.data())
def test_a_stream_cut_short_raises_truncated_and_nothing_else(
    api_stream: tuple[str, Stream], data: st.DataObject
) -> None:
    """Cut anywhere before the reply is complete: WireError("truncated"), whether the cut
    falls between lines or inside one (a JSON line, a UTF-8 sequence, a "\\r\\n"); cut after:
    the whole reply (a missing last newline, a missing usage chunk or [DONE] are fine)."""
    api, s = api_stream
    k = data.draw(st.integers(min_value=0, max_value=len(s.data) - 1), label="cut at")
    got = outcome(api, chunked(s.data[:k], data.draw(cuts, label="reads")))
    if k < s.complete_at:
        assert got == ("error", "truncated")
    else:
        assert got[:2] == ("ok", s.pieces)


# -- arbitrary bytes --------------------------------------------------------------------


@SETTINGS
@given(st.sampled_from(["ollama", "openai"]), wire_bytes, cuts)
def test_any_bytes_give_pieces_or_a_wire_error_the_same_in_any_chunking(
    api: str, data: bytes, at: list[int]
) -> None:
    assert outcome(api, chunked(data, at)) == outcome(api, [data])


def test_a_cut_line_is_truncated_but_a_foreign_one_is_malformed() -> None:
    """Which last lines are the stream cut short, and which a protocol violation."""
    for api, body, kind in [
        ("ollama", b'{"message":{"content":"a"},"do', "truncated"),
        ("ollama", b"<html>Bad Gateway</html>", "malformed"),
        ("ollama", b"<html>\n", "malformed"),
        ("ollama", b'{"message":{"content":"a"},"done":false}\n', "truncated"),
        ("openai", b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"cho', "truncated"),
        ("openai", b"data: [DO", "truncated"),
        ("openai", b"data: <html>", "malformed"),
        ("openai", b'data: {"error":{"message":"boom"}}', "error"),
    ]:
        assert outcome(api, [body]) == ("error", kind), body


def test_truncated_maps_to_unavailable_and_malformed_to_rejected() -> None:
    class Where:
        url, api = "http://127.0.0.1:1", "ollama"

    cut = connection_error(Where(), WireError("truncated", "in the middle of a line"))
    assert isinstance(cut, UpstreamUnavailable) and cut.code == "llm_unavailable"
    assert "ended the stream (in the middle of a line) before the reply" in cut.message
    bad = connection_error(Where(), WireError("malformed", "'<html>'"))
    assert isinstance(bad, UpstreamRejected) and "protocol" in bad.message
