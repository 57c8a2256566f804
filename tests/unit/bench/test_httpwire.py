"""chatd-bench's readers of the HTTP APIs' streams, on the bytes the fake Ollama sends and on
hand-made edge cases: when the first content token is complete, the text, the end marker,
errors mid-stream, and any split of the bytes into chunks."""

from __future__ import annotations

import orjson
import pytest

from chatd.bench import httpwire
from chatd.bench.httpwire import NdjsonReader, SseReader, reader_for, request_body
from chatd.dev.fake_ollama import frames
from chatd.dev.fake_ollama.wire import expected_reply, parse_job, reply_tokens

TEXT = "hello world from chatd bench"
TIMING = (0, 1, 0, 0)  # perf_counter ns: arrival, load wait, prefill start, first token


def _stream(api: str, tokens: int = 8) -> list[bytes]:
    """The lines (or SSE events) the fake writes for one streamed reply of ``api``."""
    body = orjson.loads(request_body("ollama" if api == "chat" else "openai", "m", TEXT))
    job = parse_job(api, body, "m", "chatcmpl-1")
    assert not isinstance(job, str)
    toks = reply_tokens(TEXT, tokens)
    if api == "chat":  # the last token rides on the done line
        lines = [frames.chunk(job, t, "ts") for t in toks[:-1]]
        return [*lines, frames.done_line(job, toks, "stop", TIMING)]
    return [*(frames.chunk(job, t, "ts") for t in toks), frames.openai_tail(job, "stop", tokens)]


@pytest.mark.parametrize(("api", "reader"), [("chat", NdjsonReader), ("openai", SseReader)])
def test_the_fakes_stream_read_whole(api: str, reader: type[httpwire.StreamReader]) -> None:
    r = reader()
    assert r.feed(b"".join(_stream(api))) is True
    assert r.finish() is False
    assert r.text == expected_reply(TEXT, 8)
    assert r.pieces == 8 and r.done and r.error is None and r.ok


@pytest.mark.parametrize(("api", "reader"), [("chat", NdjsonReader), ("openai", SseReader)])
def test_first_token_is_the_chunk_completing_the_first_line(
    api: str, reader: type[httpwire.StreamReader]
) -> None:
    """Fed one byte at a time, exactly one feed says "first": the one completing the first
    content line (NDJSON: its newline; SSE: the blank line ending its event)."""
    data = b"".join(_stream(api))
    first_line = _stream(api)[0]
    r = reader()
    hits = [i for i in range(len(data)) if r.feed(data[i : i + 1])]
    assert hits == [len(first_line) - 1]
    assert r.ok and r.text == expected_reply(TEXT, 8)


@pytest.mark.parametrize(("api", "reader"), [("chat", NdjsonReader), ("openai", SseReader)])
def test_any_split_gives_the_same_reply(api: str, reader: type[httpwire.StreamReader]) -> None:
    data = b"".join(_stream(api, 5))
    for cut in range(len(data) + 1):
        r = reader()
        firsts = [r.feed(data[:cut]), r.feed(data[cut:]), r.finish()]
        assert firsts.count(True) == 1, cut
        assert r.ok and r.text == expected_reply(TEXT, 5), cut


def test_ndjson_empty_content_is_no_token_and_done_carries_the_last() -> None:
    r = NdjsonReader()
    assert not r.feed(b'{"message":{"role":"assistant","content":""},"done":false}\n')
    assert not r.feed(b'{"message":{"role":"assistant"},"done":false}\n')
    assert r.pieces == 0
    assert r.feed(b'{"message":{"role":"assistant","content":"hi"},"done":true}\r\n')
    assert r.ok and r.text == "hi"


def test_ndjson_last_line_without_newline_is_read_at_finish() -> None:
    r = NdjsonReader()
    assert not r.feed(b'{"message":{"content":"a"},"done":true}')
    assert not r.done
    assert r.finish() is True  # the first token completed only now
    assert r.ok and r.text == "a"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b'{"message":{"content":"a"},"done":false}\n{"error":"model crashed"}\n', "model crashed"),
        (b"not json\n", "malformed: not JSON"),
        (b'["an", "array"]\n', "malformed: not an object"),
    ],
)
def test_ndjson_errors(data: bytes, error: str) -> None:
    r = NdjsonReader()
    r.feed(data)
    r.finish()
    assert r.error == error and not r.ok


def test_ndjson_cut_short_is_not_ok() -> None:
    r = NdjsonReader()
    r.feed(b"".join(_stream("chat")[:-1]))
    r.finish()
    assert r.error is None and not r.done and not r.ok


def test_sse_role_only_first_chunk_is_no_token() -> None:
    r = SseReader()
    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}'
    assert not r.feed(role + b"\n\n")
    assert not r.feed(b'data: {"choices":[{"delta":{"content":""}}]}\n\n')
    assert not r.feed(b'data:{"choices":[{"delta":{"content":"x"}}]}\n')  # event not ended yet
    assert r.feed(b"\n")
    assert not r.feed(b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n')
    assert not r.feed(b'data: {"choices":[],"usage":{"completion_tokens":1}}\n\n')
    assert not r.done
    r.feed(b"data: [DONE]\n\n")
    assert r.ok and r.text == "x" and r.pieces == 1


def test_sse_comments_fields_crlf_and_an_unterminated_last_event() -> None:
    r = SseReader()
    r.feed(b": keep-alive\r\nevent: message\r\nid: 1\r\n")
    r.feed(b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\n')
    r.feed(b"data: [DONE]")  # no blank line before the end of the body
    assert not r.done
    r.finish()
    assert r.ok and r.text == "a"


def test_sse_error_event() -> None:
    r = SseReader()
    r.feed(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
    r.feed(b'data: {"error":{"message":"upstream failed","type":"api_error"}}\n\n')
    r.finish()
    assert r.error == "upstream failed" and not r.ok
    r2 = SseReader()
    r2.feed(b"data: {oops\n\n")
    assert r2.error == "malformed: not JSON"


def test_request_bodies_and_headers() -> None:
    for api in ("ollama", "openai"):
        body = orjson.loads(request_body(api, "m", "hi"))
        assert body == {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        }
        assert isinstance(reader_for(api), NdjsonReader if api == "ollama" else SseReader)
    with pytest.raises(ValueError):
        request_body("generate", "m", "hi")
    with pytest.raises(ValueError):
        reader_for("generate")
    assert httpwire.auth_headers(None) == {"Content-Type": "application/json"}
    assert httpwire.auth_headers("T")["Authorization"] == "Bearer T"
    assert httpwire.PATHS == {"ollama": "/api/chat", "openai": "/v1/chat/completions"}
