"""Component tests of chatd.relay.generate (and the pure parsing in chatd.relay.wire).

Most tests run the Relay against tiny aiohttp.web servers built here, one per wire edge
case (each scripted as a list of byte writes and pauses), so every case is exact and
independent of the fake Ollama. A few run against chatd.dev.fake_ollama.main.FakeOllama.
Everything listens on 127.0.0.1 only. Tests are plain functions that call asyncio.run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import orjson
import pytest
import uvloop
from aiohttp import web

from chatd.config import BackendConfig, LLMConfig
from chatd.errors import UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from chatd.relay import generate as generate_mod
from chatd.relay.backend import Reply
from chatd.relay.failures import connection_error
from chatd.relay.generate import Relay
from chatd.relay.wire import (
    LineSplitter,
    OllamaDecoder,
    OpenAIDecoder,
    WireError,
    error_detail,
    keep_alive_value,
    parse_keep_alive,
)

pytestmark = pytest.mark.timeout(30)

MODEL = "qwen2.5-coder:7b"
MESSAGES = [{"role": "user", "content": "hi"}]
CLOSE = object()  # in a script: drop the connection without ending the body
Script = list[Any]  # bytes to write, float seconds to sleep, or CLOSE


def run(coro: Coroutine[Any, Any, Any], *, uv: bool = False) -> Any:
    """Run one test body in a fresh loop (uvloop if asked), bounded to 20 s."""
    main = asyncio.wait_for(coro, 20)
    return uvloop.run(main) if uv else asyncio.run(main)


def chunk(text: str, done: bool = False, **extra: Any) -> bytes:
    """One Ollama /api/chat NDJSON line."""
    obj = {
        "model": MODEL,
        "created_at": "2026-01-01T00:00:00.000000001Z",
        "message": {"role": "assistant", "content": text},
        "done": done,
        **extra,
    }
    return orjson.dumps(obj) + b"\n"


def done(text: str = "", reason: str = "stop", **extra: Any) -> bytes:
    return chunk(text, True, done_reason=reason, **extra)


def sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n"


def delta(text: str | None = None, finish: str | None = None, role: bool = False) -> bytes:
    d: dict[str, str] = {"role": "assistant"} if role else {}
    if text is not None:
        d["content"] = text
    choice = {"index": 0, "delta": d, "finish_reason": finish}
    return sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [choice]})


class Server:
    """A purpose-built HTTP server; routes map "METHOD /path" to a Script or a handler.

    Counts requests per route, tracks chat requests in flight (a handler's finally runs
    when the client goes away: handler_cancellation is on), and records request bodies.
    """

    def __init__(self, routes: dict[str, Script | Callable[..., Awaitable[Any]]]):
        self.routes = routes
        self.hits: Counter[str] = Counter()
        self.in_flight = 0
        self.peers: set[tuple[str, int]] = set()
        self.bodies: list[dict[str, Any]] = []
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        key = f"{request.method} {request.path}"
        self.hits[key] += 1
        self.peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        if request.can_read_body:
            self.bodies.append(orjson.loads(await request.read()))
        action = self.routes.get(key)
        if action is None:
            return web.json_response({"error": "no route"}, status=418)
        self.in_flight += 1
        try:
            if callable(action):
                return await action(request)  # type: ignore[no-any-return]
            return await play(request, action)
        finally:
            self.in_flight -= 1

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[Server]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            yield self
        finally:
            await runner.cleanup()


async def play(request: web.Request, script: Script, status: int = 200) -> web.StreamResponse:
    """Send headers, then the script: bytes are written (flushed), floats slept."""
    resp = web.StreamResponse(status=status, headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    for item in script:
        if item is CLOSE:
            assert request.transport is not None
            request.transport.close()
            return resp
        if isinstance(item, float):
            await asyncio.sleep(item)
        else:
            await resp.write(item)
    await resp.write_eof()
    return resp


def status(code: int, body: bytes) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=code, body=body, content_type="application/json")

    return handler


def llm_config(url: str, api: str = "ollama", **timeouts: Any) -> LLMConfig:
    """Short deadlines so that every timeout test takes well under a second."""
    cfg = LLMConfig(
        model=MODEL,
        backends=(BackendConfig(url=url, api=api),),
        connect_timeout=0.5,
        first_token_timeout=0.4,
        load_timeout=1.5,
        idle_timeout=0.4,
        total_timeout=3.0,
    )
    return dataclasses.replace(cfg, **timeouts)


class Collector:
    def __init__(self, wake_at: int = 0) -> None:
        self.tokens: list[str] = []
        self.notices: list[tuple[str, str]] = []
        self.wake_at = wake_at
        self.woken = asyncio.Event()  # set once wake_at tokens have arrived

    def on_token(self, text: str) -> None:
        self.tokens.append(text)
        if len(self.tokens) == self.wake_at:
            self.woken.set()

    def on_notice(self, code: str, message: str) -> None:
        self.notices.append((code, message))


PS_LOADED = status(200, orjson.dumps({"models": [{"name": MODEL, "model": MODEL}]}))
PS_EMPTY = status(200, b'{"models":[]}')


async def generate(
    routes: dict[str, Any], api: str = "ollama", **timeouts: float
) -> tuple[Reply | UpstreamError, Collector, Server, Relay]:
    """One generate() against a server with ``routes``; returns the Reply or the error."""
    routes.setdefault("GET /api/ps", PS_LOADED)
    server = Server(routes)
    async with server.serve():
        relay = Relay(llm_config(server.url, api, **timeouts))
        await relay.start()
        got = Collector()
        try:
            result: Reply | UpstreamError = await relay.generate(
                0, MODEL, MESSAGES, got.on_token, got.on_notice
            )
        except UpstreamError as exc:
            result = exc
        finally:
            await relay.close()
    return result, got, server, relay


async def eventually(check: Callable[[], bool], seconds: float = 1.0) -> bool:
    """Poll ``check`` every 10 ms for up to ``seconds``; its last result."""
    for _ in range(int(seconds / 0.01)):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


def expect_error(result: Any, kind: type[UpstreamError], *words: str) -> UpstreamError:
    assert isinstance(result, kind), result
    assert result.backend.startswith("http://127.0.0.1:")
    assert result.backend in result.message
    for word in words:
        assert word in result.message, result.message
    assert "aiohttp" not in result.message
    return result


# -- relay_wire: pure parsing ---------------------------------------------------------


def test_line_splitter_reassembles_lines_across_any_read_boundaries() -> None:
    stream = b'{"a":1}\r\n\n{"b":2}\n' + b"x" * 5000 + b"\n{partial"
    for size in (1, 2, 3, 7, 64, 4096, len(stream)):
        split = LineSplitter()
        lines: list[bytes] = []
        for i in range(0, len(stream), size):
            lines += split.feed(stream[i : i + size])
        assert lines == [b'{"a":1}\r', b"", b'{"b":2}', b"x" * 5000]
        assert split.tail() == b"{partial"


def test_line_splitter_bounds_a_line_that_never_ends() -> None:
    split = LineSplitter(max_line=100)
    split.feed(b"x" * 60)
    with pytest.raises(WireError) as info:
        split.feed(b"x" * 60)
    assert info.value.kind == "too_long"


def test_ollama_decoder_chunks_done_with_content_and_errors() -> None:
    dec = OllamaDecoder()
    assert dec.feed(chunk("Hel")) == "Hel"
    assert dec.feed(b"") is None and dec.feed(b"\r") is None and dec.feed(b"  ") is None
    assert dec.feed(b'{"message":{"role":"assistant","content":"","thinking":"hm"}}') == ""
    assert not dec.complete
    assert dec.feed(done("lo!", "length", eval_count=3).rstrip(b"\n") + b"\r") == "lo!"
    assert dec.complete and dec.done_reason == "length" and dec.eval_count == 3
    with pytest.raises(WireError) as info:
        OllamaDecoder().feed(b'{"error":"model runner has unexpectedly stopped"}')
    assert (info.value.kind, info.value.detail) == (
        "error",
        "model runner has unexpectedly stopped",
    )
    for bad in (b"{not json", b"[1,2]", b'"text"'):
        with pytest.raises(WireError) as info:
            OllamaDecoder().feed(bad)
        assert info.value.kind == "malformed"


def test_openai_decoder_deltas_finish_usage_done_and_errors() -> None:
    dec = OpenAIDecoder()
    assert dec.feed(b": keep-alive comment") is None
    assert dec.feed(b"event: message") is None
    assert dec.feed(b"") is None
    assert dec.feed(delta("", role=True).split(b"\n")[0]) == ""
    assert dec.feed(delta("Hi").split(b"\n")[0] + b"\r") == "Hi"
    assert dec.feed(b'data:{"choices":[{"delta":{"content":" there"}}]}') == " there"
    assert dec.feed(delta(finish="length").split(b"\n")[0]) == ""
    assert dec.complete and not dec.done and dec.done_reason == "length"
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}
    assert dec.feed(sse(usage).split(b"\n")[0]) == ""
    assert dec.eval_count == 7
    assert dec.feed(b"data: [DONE]") == "" and dec.done
    with pytest.raises(WireError) as info:
        OpenAIDecoder().feed(b'data: {"error":{"message":"context too long","type":"x"}}')
    assert info.value.detail == "context too long"
    with pytest.raises(WireError):
        OpenAIDecoder().feed(b"data: {oops")


def test_error_detail_reads_ollama_openai_fastapi_and_text_bodies() -> None:
    busy = b'{"error":"server busy, please try again.  maximum pending requests exceeded"}'
    assert error_detail(busy) == "server busy, please try again.  maximum pending requests exceeded"
    assert error_detail(b'{"error":{"message":"no such model","type":"x"}}') == "no such model"
    assert error_detail(b'{"detail":"Not Found"}') == "Not Found"
    assert error_detail(b"<html>\n  Bad   Gateway </html>") == "<html> Bad Gateway </html>"
    assert error_detail(b"") == "no error text"
    assert len(error_detail(b"y" * 10_000)) == 300


def test_keep_alive_parsing_and_the_value_sent_to_ollama() -> None:
    assert parse_keep_alive("5m") == 300
    assert parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive("300") == 300
    assert parse_keep_alive("1.5s") == 1.5
    assert parse_keep_alive("-1") is None and parse_keep_alive("-5m") is None
    assert parse_keep_alive("0") == 0 and parse_keep_alive("soon") == 0
    # Ollama rejects the JSON string "-1" (Go's ParseDuration wants a unit): send a number.
    assert keep_alive_value("-1") == -1 and keep_alive_value("300") == 300
    assert keep_alive_value("5m") == "5m"


def test_connection_errors_map_to_upstream_errors_and_others_pass() -> None:
    class Where:
        url, api = "http://127.0.0.1:1", "ollama"

    for exc in (aiohttp.ServerDisconnectedError(), aiohttp.ClientPayloadError("x"), OSError(5)):
        err = connection_error(Where(), exc)
        assert isinstance(err, UpstreamUnavailable) and "http://127.0.0.1:1" in err.message
    err = connection_error(Where(), WireError("malformed", "'<html>'"))
    assert isinstance(err, UpstreamRejected) and "ollama streaming protocol" in err.message
    assert connection_error(Where(), KeyError("bug")) is None
    assert connection_error(Where(), asyncio.CancelledError()) is None


# -- generate: Ollama NDJSON ----------------------------------------------------------


def test_ollama_stream_includes_the_done_chunk_text_and_sends_the_documented_body() -> None:
    script = [chunk("Hel"), 0.01, chunk("lo"), 0.01, done(", world", eval_count=42)]
    reply, got, server, _ = run(generate({"POST /api/chat": script}))
    assert isinstance(reply, Reply)
    # The done chunk's text is the reply's only: its final frame carries it.
    assert got.tokens == ["Hel", "lo"]
    assert (reply.text, reply.done_reason, reply.tokens) == ("Hello, world", "stop", 42)
    assert 0 < reply.ttft_ms <= reply.total_ms
    assert server.bodies == [
        {"model": MODEL, "messages": MESSAGES, "stream": True, "keep_alive": "5m"}
    ]
    assert got.notices == []


def test_ollama_wire_variants_blank_lines_crlf_split_and_merged_writes() -> None:
    a, b, c = chunk("A"), chunk("B"), done("C", "length")
    script = [b"\n", a[:5], 0.01, a[5:-1] + b"\r\n\r\n", 0.01, b + c[:3], 0.01, c[3:]]
    reply, got, *_ = run(generate({"POST /api/chat": script}))
    assert isinstance(reply, Reply)
    assert (reply.text, reply.done_reason, reply.tokens) == ("ABC", "length", 3)
    assert got.tokens == ["A", "B"]  # "C" came in the read that ended the reply


def test_the_pieces_of_the_read_that_ends_the_reply_are_left_to_the_reply() -> None:
    """A backend faster than the loop: pieces that arrive in one read with the done chunk
    are not forwarded (the reply's frame carries them; one frame less), those of earlier
    reads are; the first-token time still counts from the first piece's arrival."""
    script = [chunk("A"), 0.05, chunk("B") + chunk("C") + done("D", eval_count=4)]
    reply, got, *_ = run(generate({"POST /api/chat": script}))
    assert isinstance(reply, Reply) and reply.text == "ABCD"
    assert got.tokens == ["A"]
    assert reply.total_ms - reply.ttft_ms >= 40  # from "A", 50 ms before the rest
    whole = [chunk("A") + chunk("B") + done("C")]  # the whole reply in one read
    reply, got, *_ = run(generate({"POST /api/chat": whole}))
    assert isinstance(reply, Reply) and reply.text == "ABC" and got.tokens == []


def test_a_body_left_open_after_done_is_cut_and_the_reply_kept() -> None:
    t = time.monotonic()
    reply, *_ = run(generate({"POST /api/chat": [done("whole"), 5.0]}))
    assert isinstance(reply, Reply) and reply.text == "whole"
    assert time.monotonic() - t < 1.0


def test_when_api_ps_fails_the_normal_first_token_deadline_applies() -> None:
    routes = {"GET /api/ps": status(500, b"{}"), "POST /api/chat": [done("ok")]}
    reply, got, server, _ = run(generate(routes))
    assert isinstance(reply, Reply) and reply.text == "ok" and got.notices == []
    assert server.hits["GET /api/ps"] == 1


def test_a_last_line_without_newline_still_counts() -> None:
    reply, *_ = run(generate({"POST /api/chat": [chunk("x"), done("y").rstrip(b"\n")]}))
    assert isinstance(reply, Reply) and reply.text == "xy"


def test_a_one_megabyte_token_passes_aiohttps_line_limit() -> None:
    big = "€" * (1 << 20)
    reply, got, *_ = run(generate({"POST /api/chat": [chunk(big), 0.05, done()]}))
    assert isinstance(reply, Reply)
    assert reply.text == big and got.tokens == [big]


def test_an_error_line_inside_the_stream_is_rejected_after_the_first_token() -> None:
    script = [chunk("partial"), b'{"error":"an error was encountered while running the model"}\n']
    err, got, *_ = run(generate({"POST /api/chat": script}))
    expect_error(err, UpstreamRejected, "while running the model", "during the reply")
    assert err.first_token_sent and got.tokens == ["partial"]
    assert err.code == "llm_error" and not err.retryable


def test_a_stream_that_ends_without_done_is_unavailable() -> None:
    err, *_ = run(generate({"POST /api/chat": [chunk("a"), chunk("b")]}))
    expect_error(err, UpstreamUnavailable, "ended the stream before the reply was complete")
    assert err.first_token_sent


def test_a_dropped_connection_is_unavailable() -> None:
    err, *_ = run(generate({"POST /api/chat": [chunk("a"), 0.02, CLOSE]}))
    expect_error(err, UpstreamUnavailable, "before the reply was complete")
    assert err.first_token_sent


def test_a_malformed_line_is_a_protocol_violation() -> None:
    err, *_ = run(generate({"POST /api/chat": [b"<html>oops</html>\n"]}))
    expect_error(err, UpstreamRejected, "protocol", "<html>")
    assert not err.first_token_sent


@pytest.mark.parametrize(
    ("code", "body", "kind", "words"),
    [
        (404, b'{"error":"model \'qwen2.5-coder:7b\' not found"}', UpstreamRejected, ["404"]),
        (400, b'{"error":"invalid message format"}', UpstreamRejected, ["400"]),
        (500, b'{"error":"llama runner process has terminated"}', UpstreamUnavailable, ["500"]),
        (
            503,
            b'{"error":"server busy, please try again.  maximum pending requests exceeded"}',
            UpstreamUnavailable,
            ["503", "maximum pending requests exceeded"],
        ),
        (502, b"<html>Bad Gateway</html>", UpstreamUnavailable, ["Bad Gateway"]),
        (429, b'{"error":"rate limited"}', UpstreamUnavailable, ["429"]),
    ],
)
def test_http_errors_quote_the_backend(
    code: int, body: bytes, kind: type[UpstreamError], words: list[str]
) -> None:
    err, *_ = run(generate({"POST /api/chat": status(code, body)}))
    detail = error_detail(body)
    expect_error(err, kind, detail, *words)
    assert not err.first_token_sent


def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: the connect is refused

        async def main() -> UpstreamError:
            relay = Relay(llm_config(f"http://127.0.0.1:{port}"))
            await relay.start()
            try:
                with pytest.raises(UpstreamUnavailable) as info:
                    await relay.generate(0, MODEL, MESSAGES, lambda t: None)
                assert not await relay.check_health(0)
                return info.value
            finally:
                await relay.close()

        err = run(main())
    expect_error(err, UpstreamUnavailable, "unreachable", "connecting failed")
    assert not err.first_token_sent


def test_connect_timeout_when_the_backend_never_accepts() -> None:
    # A listener with a full accept queue: the kernel drops further SYNs, so connect hangs.
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        fillers = [socket.socket() for _ in range(4)]
        for s in fillers:
            s.setblocking(False)
            s.connect_ex(lsock.getsockname())
        url = f"http://127.0.0.1:{lsock.getsockname()[1]}"

        async def main() -> tuple[UpstreamError, float]:
            relay = Relay(llm_config(url, connect_timeout=0.3, first_token_timeout=5.0))
            await relay.start()
            t = time.monotonic()
            try:
                with pytest.raises(UpstreamUnavailable) as info:
                    await relay.generate(0, MODEL, MESSAGES, lambda t: None)
                return info.value, time.monotonic() - t
            finally:
                await relay.close()

        try:
            err, took = run(main())
        finally:
            for s in fillers:
                s.close()
    expect_error(err, UpstreamUnavailable, "did not accept the connection in time")
    assert 0.25 < took < 2.0  # /api/ps (bounded by connect_timeout) and the POST


async def slow_headers(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(5)
    return await play(request, [done("late")])


@pytest.mark.parametrize(
    "route", [slow_headers, [5.0, done("late")]], ids=["headers-delayed", "hang-after-headers"]
)
def test_first_token_deadline(route: Any) -> None:
    t = time.monotonic()
    err, _, server, relay = run(generate({"POST /api/chat": route}))
    took = time.monotonic() - t
    expect_error(err, UpstreamTimeout, "no first token", "0.4 s")
    assert not err.first_token_sent and err.code == "llm_timeout" and err.retryable
    assert 0.35 < took < 1.5
    assert server.in_flight == 0
    # A first-token timeout forgets that the model was loaded: /api/ps is asked again.
    assert relay.statistics().backends[0].loaded_models == ()


def test_idle_deadline_after_some_tokens() -> None:
    script = [chunk("a"), 0.2, chunk("b"), 0.2, chunk("c"), 5.0, done()]
    t = time.monotonic()
    err, got, *_ = run(generate({"POST /api/chat": script}))
    took = time.monotonic() - t
    expect_error(err, UpstreamTimeout, "stopped sending tokens for 0.4 s")
    assert err.first_token_sent and got.tokens == ["a", "b", "c"]
    assert 0.75 < took < 1.8  # 0.4 s of tokens, then 0.4 s idle


def test_total_deadline_with_steady_tokens() -> None:
    script = [x for i in range(100) for x in (chunk(str(i)), 0.05)]
    err, got, *_ = run(generate({"POST /api/chat": script}, total_timeout=0.6))
    expect_error(err, UpstreamTimeout, "did not finish the reply within 0.6 s")
    assert err.first_token_sent and 5 <= len(got.tokens) <= 14


def test_cold_model_gets_a_notice_and_the_load_timeout() -> None:
    routes: dict[str, Any] = {
        "GET /api/ps": PS_EMPTY,
        "POST /api/chat": [0.8, chunk("warm"), done()],
    }

    async def main() -> tuple[Reply, Reply, Collector, Server]:
        server = Server(routes)
        async with server.serve():
            relay = Relay(llm_config(server.url))
            await relay.start()
            got = Collector()
            try:
                first = await relay.generate(0, MODEL, MESSAGES, got.on_token, got.on_notice)
                assert relay.statistics().backends[0].loaded_models == (MODEL,)
                server.routes["POST /api/chat"] = [chunk("warm"), done()]
                second = await relay.generate(0, MODEL, MESSAGES, got.on_token, got.on_notice)
            finally:
                await relay.close()
        return first, second, got, server

    first, second, got, server = run(main())
    assert first.text == second.text == "warm"
    assert first.ttft_ms > 700  # longer than first_token_timeout (0.4 s): load_timeout applied
    assert len(got.notices) == 1 and got.notices[0][0] == "model_loading"
    assert MODEL in got.notices[0][1] and "1.5 s" in got.notices[0][1]
    assert server.hits["GET /api/ps"] == 1  # the finished reply showed the model loaded


def test_keep_alive_zero_never_assumes_the_model_stays_loaded() -> None:
    async def main() -> Server:
        server = Server({"GET /api/ps": PS_LOADED, "POST /api/chat": [done("ok")]})
        async with server.serve():
            cfg = LLMConfig(backends=(BackendConfig(url=server.url),), keep_alive="0")
            relay = Relay(cfg)
            await relay.start()
            try:
                for _ in range(2):
                    await relay.generate(0, MODEL, MESSAGES, lambda t: None)
            finally:
                await relay.close()
        return server

    server = run(main())
    assert server.hits["GET /api/ps"] == 2
    assert [b["keep_alive"] for b in server.bodies] == [0, 0]


def test_cancelling_generate_closes_the_upstream_request_promptly() -> None:
    script = [x for i in range(200) for x in (chunk(f"t{i} "), 0.05)]

    async def main() -> None:
        server = Server({"GET /api/ps": PS_LOADED, "POST /api/chat": script})
        async with server.serve():
            relay = Relay(llm_config(server.url, idle_timeout=5, total_timeout=30))
            await relay.start()
            got = Collector(wake_at=3)
            task = asyncio.create_task(relay.generate(0, MODEL, MESSAGES, got.on_token))
            await got.woken.wait()
            assert server.in_flight == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await eventually(lambda: server.in_flight == 0), "backend still streaming"
            stats = relay.statistics().backends[0]
            assert (stats.in_flight, stats.cancelled, stats.errors) == (0, 1, {})
            await relay.close()

    run(main())
    run(main(), uv=True)


def test_a_cancel_after_the_last_read_still_hands_over_its_pieces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pieces of the read that ended the reply are left to the Reply; cancelled while the
    rest of the body drains (the Reply never returned), generate hands them to on_token
    first, so the caller's cancelled reply holds the whole text it was given."""
    script = [chunk("A"), 0.05, chunk("B") + done("C"), 5.0]  # the body stays open after
    draining = asyncio.Event()
    real_drain = generate_mod.drain

    async def drain(*args: Any) -> None:
        draining.set()  # the reply's last read is in
        await real_drain(*args)

    monkeypatch.setattr(generate_mod, "drain", drain)

    async def main() -> list[str]:
        server = Server({"GET /api/ps": PS_LOADED, "POST /api/chat": script})
        async with server.serve():
            relay = Relay(llm_config(server.url, idle_timeout=10, total_timeout=30))
            await relay.start()
            got = Collector()
            task = asyncio.create_task(relay.generate(0, MODEL, MESSAGES, got.on_token))
            await draining.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await relay.close()
        return got.tokens

    assert run(main()) == ["A", "B", "C"]


def test_a_deadline_racing_an_outside_cancel_leaks_no_cancellation() -> None:
    async def main() -> None:
        server = Server({"GET /api/ps": PS_LOADED, "POST /api/chat": [5.0, done()]})
        async with server.serve():
            relay = Relay(llm_config(server.url, first_token_timeout=0.2))
            await relay.start()
            task = asyncio.create_task(relay.generate(0, MODEL, MESSAGES, lambda t: None))
            await asyncio.sleep(0.2)  # lands on the deadline: both cancels can be pending
            task.cancel()
            with pytest.raises((asyncio.CancelledError, UpstreamTimeout)):
                await task
            await relay.close()
        # The test task itself must not inherit a stray cancellation.
        await asyncio.sleep(0.01)

    for _ in range(5):
        run(main())


def test_on_token_errors_propagate_unchanged_and_abort_the_request() -> None:
    def boom(text: str) -> None:
        raise KeyError(text)

    async def main() -> Server:
        script = [x for i in range(100) for x in (chunk("x"), 0.02)]
        server = Server({"GET /api/ps": PS_LOADED, "POST /api/chat": script})
        async with server.serve():
            relay = Relay(llm_config(server.url))
            await relay.start()
            with pytest.raises(KeyError):
                await relay.generate(0, MODEL, MESSAGES, boom)
            await asyncio.sleep(0.1)
            assert server.in_flight == 0
            await relay.close()
        return server

    run(main())


def test_connections_are_kept_alive_between_generations() -> None:
    async def main() -> Server:
        server = Server({"GET /api/ps": PS_LOADED, "POST /api/chat": [chunk("a"), done("b")]})
        async with server.serve():
            relay = Relay(llm_config(server.url))
            await relay.start()
            try:
                for _ in range(5):
                    reply = await relay.generate(0, MODEL, MESSAGES, lambda t: None)
                    assert reply.text == "ab"
            finally:
                await relay.close()
        return server

    server = run(main(), uv=True)
    assert server.hits["POST /api/chat"] == 5 and len(server.peers) == 1


def test_prewarm_health_and_statistics(caplog: pytest.LogCaptureFixture) -> None:
    load = orjson.dumps({"model": MODEL, "done": True, "done_reason": "load"})

    async def main() -> tuple[Server, Any]:
        server = Server(
            {
                "GET /api/ps": PS_EMPTY,
                "GET /api/version": status(200, b'{"version":"0.33.0"}'),
                "POST /api/chat": [done("hi", eval_count=1)],
            }
        )
        async with server.serve():
            relay = Relay(llm_config(server.url))
            await relay.start()
            try:
                assert await relay.check_health(0)
                # prewarm's body has "messages": []; answer it with the load object.
                server.routes["POST /api/chat"] = status(200, load)
                await relay.prewarm(0, MODEL)
                assert server.bodies[-1] == {"model": MODEL, "messages": [], "keep_alive": "5m"}
                server.routes["POST /api/chat"] = [done("hi", eval_count=1)]
                reply = await relay.generate(0, MODEL, MESSAGES, lambda t: None)
                assert reply.tokens == 1
                server.routes["POST /api/chat"] = status(404, b'{"error":"model not found"}')
                with pytest.raises(UpstreamRejected):
                    await relay.generate(0, MODEL, MESSAGES, lambda t: None)
                await relay.prewarm(0, "missing")  # logs, never raises
                stats = relay.statistics()
            finally:
                await relay.close()
        return server, stats

    with caplog.at_level(logging.DEBUG, logger="chatd.relay"):
        server, stats = run(main())
    assert server.hits["GET /api/ps"] == 0  # prewarm marked the model loaded
    (b,) = stats.backends
    assert (b.requests, b.tokens, b.in_flight, b.cancelled) == (2, 1, 0, 0)
    assert b.errors == {"llm_error": 1} and b.loaded_models == (MODEL,)
    relays = [r for r in caplog.records if r.getMessage().startswith("relay ")]
    lines = [r.getMessage() for r in relays]
    assert len(lines) == 2 and "outcome=stop tokens=1" in lines[0]
    assert "outcome=llm_error" in lines[1] and "model not found" in lines[1]
    # A success is a DEBUG line (one per message would flood the journal), a failure a WARNING.
    assert [r.levelno for r in relays] == [logging.DEBUG, logging.WARNING]
    assert any("prewarm of missing" in r.getMessage() for r in caplog.records)


# -- generate: OpenAI-compatible SSE --------------------------------------------------


def test_openai_sse_stream_with_usage() -> None:
    usage = sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}})
    script = [
        b": ping\n\n",
        delta("", role=True),
        delta("Hel"),
        0.01,
        delta("lo") + delta(finish="length") + usage + sse(b"[DONE]"),  # one write
    ]
    reply, got, server, _ = run(generate({"POST /v1/chat/completions": script}, "openai"))
    assert isinstance(reply, Reply)
    assert (reply.text, reply.done_reason, reply.tokens) == ("Hello", "length", 9)
    assert got.tokens == ["Hel"] and got.notices == []  # "lo" came with [DONE]: the reply's
    assert server.bodies == [
        {
            "model": MODEL,
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ]
    assert server.hits["GET /api/ps"] == 0


def test_openai_errors_in_stream_and_truncation() -> None:
    err_event = sse({"error": {"message": "the model crashed", "type": "server_error"}})
    err, *_ = run(generate({"POST /v1/chat/completions": [delta("a"), err_event]}, "openai"))
    expect_error(err, UpstreamRejected, "the model crashed")
    assert err.first_token_sent
    err, *_ = run(generate({"POST /v1/chat/completions": [delta("a")]}, "openai"))
    expect_error(err, UpstreamUnavailable, "ended the stream")
    # A finish_reason ends the reply even when the server never sends [DONE].
    reply, *_ = run(
        generate({"POST /v1/chat/completions": [delta("a"), delta(finish="stop")]}, "openai")
    )
    assert isinstance(reply, Reply) and reply.text == "a"
    body = b'{"error":{"message":"model \\"x\\" not found","type":"not_found_error"}}'
    err, *_ = run(generate({"POST /v1/chat/completions": status(404, body)}, "openai"))
    expect_error(err, UpstreamRejected, 'model "x" not found')


def test_openai_health_falls_back_to_slash_health() -> None:
    async def main() -> bool:
        server = Server({"GET /health": status(200, b'{"status":"ok"}')})
        async with server.serve():
            relay = Relay(llm_config(server.url, "openai"))
            await relay.start()
            try:
                return await relay.check_health(0)
            finally:
                await relay.close()

    assert run(main())


# -- throughput -----------------------------------------------------------------------


def test_throughput_of_the_hot_path() -> None:
    """20k tokens written in large batches: the relay must not be the bottleneck."""
    n = 20_000
    body = b"".join(chunk(f"w{i} ") for i in range(n)) + done(eval_count=n)
    script = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    reply, *_ = run(generate({"POST /api/chat": script}, total_timeout=10, idle_timeout=5))
    assert isinstance(reply, Reply) and reply.tokens == n
    rate = n / (reply.total_ms / 1000)
    assert rate > 20_000, f"{rate:.0f} tokens/s"


# -- against chatd.dev.fake_ollama.main --------------------------------------------------------


@contextlib.asynccontextmanager
async def fake_ollama(**knobs: Any) -> AsyncIterator[tuple[str, Any]]:
    fake_mod = pytest.importorskip("chatd.dev.fake_ollama.main")
    fake = fake_mod.FakeOllama()
    port = await fake.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        if knobs:
            async with http.post(url + "/_fake/config", json=knobs) as resp:
                assert resp.status == 200, await resp.text()

        async def stats() -> dict[str, Any]:
            async with http.get(url + "/_fake/stats") as resp:
                return await resp.json()  # type: ignore[no-any-return]

        try:
            yield url, stats
        finally:
            await fake.stop()


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_fake_ollama_reply_matches_expected_reply(api: str) -> None:
    fake_mod = pytest.importorskip("chatd.dev.fake_ollama.main")

    async def main() -> tuple[Reply, list[str]]:
        async with fake_ollama(tokens=12, token_ms=1, first_token_ms=1) as (url, _):
            relay = Relay(llm_config(url, api, load_timeout=3))
            await relay.start()
            got = Collector()
            try:
                reply = await relay.generate(0, MODEL, MESSAGES, got.on_token, got.on_notice)
            finally:
                await relay.close()
        return reply, got.tokens

    reply, tokens = run(main())
    assert reply.text == fake_mod.expected_reply("hi", 12)
    assert tokens and reply.text.startswith("".join(tokens))
    assert reply.done_reason == "stop"


def test_fake_ollama_cancel_drops_in_flight_to_zero() -> None:
    async def main() -> None:
        async with fake_ollama(tokens=1000, token_ms=50, first_token_ms=1) as (url, stats):
            relay = Relay(llm_config(url, load_timeout=3, idle_timeout=5, total_timeout=60))
            await relay.start()
            got = Collector(wake_at=3)
            task = asyncio.create_task(relay.generate(0, MODEL, MESSAGES, got.on_token))
            await got.woken.wait()
            assert (await stats())["in_flight"] == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(50):  # up to 1 s
                if (await stats())["in_flight"] == 0:
                    break
                await asyncio.sleep(0.02)
            assert (await stats())["in_flight"] == 0
            await relay.close()

    run(main())


def test_fake_ollama_status_and_hang_knobs() -> None:
    async def main() -> tuple[Any, Any]:
        async with fake_ollama(status=503) as (url, _):
            relay = Relay(llm_config(url, load_timeout=1))
            await relay.start()
            with pytest.raises(UpstreamUnavailable) as busy:
                await relay.generate(0, MODEL, MESSAGES, lambda t: None)
            await relay.close()
        async with fake_ollama(hang=True) as (url, _):
            relay = Relay(llm_config(url, first_token_timeout=0.3, load_timeout=0.3))
            await relay.start()
            with pytest.raises(UpstreamTimeout) as hung:
                await relay.generate(0, MODEL, MESSAGES, lambda t: None)
            await relay.close()
        return busy.value, hung.value

    busy, hung = run(main())
    assert "503" in busy.message and not busy.first_token_sent
    assert not hung.first_token_sent
