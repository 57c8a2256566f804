"""Component tests of the Relay against a raw asyncio HTTP server on loopback.

aiohttp.web (test_generate.py's server) always frames a body (chunked or Content-Length) and
cannot reset a connection or show the request headers as sent; this server writes exact
bytes, records every request's head, and can cut a connection with a TCP RST. Used for how a
broken body surfaces from generate(), and for the backends' credentials (api_key), which
must reach every request, for both APIs, and no log line or error text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import orjson
import pytest
import uvloop

from chatd.config import BackendConfig, LLMConfig
from chatd.errors import UpstreamError, UpstreamRejected, UpstreamUnavailable
from chatd.relay.generate import Relay

pytestmark = pytest.mark.timeout(30)

MODEL = "m:1"
MESSAGES = [{"role": "user", "content": "hi"}]
KEY = "sk-test-0123456789"
Writer = asyncio.StreamWriter
# A POST's answer: (writer, path) -> keep the connection open?
Answer = Callable[[Writer, str], Awaitable[bool]]


def both(make: Callable[[], Coroutine[Any, Any, Any]]) -> None:
    """Run the test body on asyncio's loop, then on uvloop (the workers' loop)."""
    asyncio.run(asyncio.wait_for(make(), 20))
    uvloop.run(asyncio.wait_for(make(), 20))


def sized(body: bytes, status: str = "200 OK", ctype: str = "application/json") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status.encode(),
        ctype.encode(),
        len(body),
        body,
    )


def reset(w: Writer) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()


class RawServer:
    """Records each request as (request line, {lower-case header: value}); answers GETs of
    /api/ps (the model loaded), /api/version and /v1/models itself and POSTs with ``post``."""

    def __init__(self, post: Answer) -> None:
        self.post = post
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, *fields = head.decode("latin-1").split("\r\n")[:-2]
                headers = {}
                for field in fields:
                    name, _, value = field.partition(":")
                    headers[name.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((line, headers))
                method, path, _ = line.split(" ")
                if method == "GET":
                    models = [{"name": MODEL, "model": MODEL}]
                    body = {"/api/ps": {"models": models}, "/api/version": {"version": "0.6"}}
                    writer.write(sized(orjson.dumps(body.get(path, {"data": []}))))
                elif not await self.post(writer, path):
                    return
                await writer.drain()
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[RawServer]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            server.close()


def relay_for(url: str, api: str = "ollama", api_key: str = "") -> Relay:
    backend = BackendConfig(url=url, api=api, api_key=api_key)
    return Relay(LLMConfig(model=MODEL, backends=(backend,), connect_timeout=2.0))


async def generate(relay: Relay, on_token: Callable[[str], None]) -> Any:
    try:
        return await relay.generate(0, MODEL, MESSAGES, on_token)
    except UpstreamError as exc:
        return exc


def test_a_reset_in_a_close_delimited_stream_is_unavailable_not_a_protocol_violation() -> None:
    """A stream without Content-Length or chunks, reset in the middle of a line: the backend
    broke the connection (llm_unavailable, retryable), not the NDJSON protocol (llm_error)."""

    async def main() -> None:
        got_token = asyncio.Event()

        async def cut(w: Writer, path: str) -> bool:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n")
            w.write(b'{"message":{"role":"assistant","content":"a"},"done":false}\n{"done":tr')
            await w.drain()
            await got_token.wait()
            reset(w)
            return False

        server = RawServer(cut)
        async with server.serve():
            relay = relay_for(server.url)
            await relay.start()
            try:
                err = await generate(relay, lambda t: got_token.set())
            finally:
                await relay.close()
        assert isinstance(err, UpstreamUnavailable), err
        assert err.code == "llm_unavailable" and err.first_token_sent
        assert "reset in the middle of the response body" in err.message, err.message
        assert "protocol" not in err.message

    both(main)


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_a_stream_ending_in_the_middle_of_a_line_is_unavailable(api: str) -> None:
    """A close-delimited stream whose connection ends (a clean EOF) in the middle of a JSON
    line was cut short: llm_unavailable, as for a stream ending between lines, and not a
    protocol violation (llm_error, which blames the api setting and forbids a retry)."""
    if api == "ollama":
        sent = b'{"message":{"role":"assistant","content":"a"},"done":false}\n{"message":{"con'
    else:
        sent = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"choices":[{"de'

    async def main() -> None:
        async def cut(w: Writer, path: str) -> bool:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + sent)
            return False  # the server closes: the body ends there

        server = RawServer(cut)
        async with server.serve():
            relay = relay_for(server.url, api)
            await relay.start()
            try:
                tokens: list[str] = []
                err = await generate(relay, tokens.append)
            finally:
                await relay.close()
        assert isinstance(err, UpstreamUnavailable), err
        assert tokens == ["a"] and err.first_token_sent
        assert "ended the stream (the stream ended in the middle of a line" in err.message
        assert "protocol" not in err.message

    both(main)


def test_a_head_cut_short_is_unavailable_with_a_clear_sentence() -> None:
    async def main() -> None:
        async def garbage(w: Writer, path: str) -> bool:
            w.write(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n")
            return False

        server = RawServer(garbage)
        async with server.serve():
            relay = relay_for(server.url)
            await relay.start()
            try:
                err = await generate(relay, lambda t: None)
            finally:
                await relay.close()
        assert isinstance(err, UpstreamUnavailable), err
        assert "invalid HTTP response" in err.message and server.url in err.message

    both(main)


# -- credentials ----------------------------------------------------------------------


def ollama_reply(done_reason: str = "stop") -> bytes:
    line = {"message": {"role": "assistant", "content": "hi"}, "done": True}
    return sized(orjson.dumps(line | {"done_reason": done_reason}) + b"\n")


def openai_reply() -> bytes:
    delta = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
    body = b"data: " + orjson.dumps(delta) + b"\n\ndata: [DONE]\n\n"
    return sized(body, ctype="text/event-stream")


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_the_api_key_goes_on_every_request_and_nowhere_else(
    api: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Health check, prewarm (aiohttp), /api/ps and the generation (the pool): each carries
    "Authorization: Bearer KEY"; the key is in no log line, no statistics, no repr."""

    async def main() -> None:
        async def answer(w: Writer, path: str) -> bool:
            w.write(ollama_reply() if api == "ollama" else openai_reply())
            return True

        server = RawServer(answer)
        async with server.serve():
            relay = relay_for(server.url, api, KEY)
            await relay.start()
            try:
                assert await relay.check_health(0)
                await relay.prewarm(0, MODEL)
                relay._backends[0].loaded.clear()  # so that generate asks /api/ps (ollama)
                tokens: list[str] = []
                reply = await relay.generate(0, MODEL, MESSAGES, tokens.append)
                assert reply.text == "hi" and tokens == []  # one write: all in the reply
                assert KEY not in repr(relay._backends[0]) and KEY not in repr(relay.statistics())
            finally:
                await relay.close()
        lines = [line for line, _ in server.requests]
        if api == "ollama":
            assert lines == [
                "GET /api/version HTTP/1.1",
                "POST /api/chat HTTP/1.1",  # the prewarm
                "GET /api/ps HTTP/1.1",
                "POST /api/chat HTTP/1.1",
            ]
        else:
            assert lines == [
                "GET /v1/models HTTP/1.1",  # the health check
                "GET /v1/models HTTP/1.1",  # the prewarm
                "POST /v1/chat/completions HTTP/1.1",
            ]
        assert all(h.get("authorization") == f"Bearer {KEY}" for _, h in server.requests)

    with caplog.at_level(logging.DEBUG):
        both(main)
    assert caplog.records and all(KEY not in r.getMessage() for r in caplog.records)


def test_no_api_key_no_authorization_header() -> None:
    async def main() -> None:
        async def answer(w: Writer, path: str) -> bool:
            w.write(ollama_reply())
            return True

        server = RawServer(answer)
        async with server.serve():
            relay = relay_for(server.url)
            await relay.start()
            try:
                assert await relay.check_health(0)
                assert (await relay.generate(0, MODEL, MESSAGES, lambda t: None)).text == "hi"
            finally:
                await relay.close()
        assert server.requests and all("authorization" not in h for _, h in server.requests)

    both(main)


def test_an_error_body_echoing_the_key_is_redacted(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async def refuse(w: Writer, path: str) -> bool:
            body = orjson.dumps({"error": {"message": f"Incorrect API key provided: {KEY}"}})
            w.write(sized(body, "401 Unauthorized"))
            return True

        server = RawServer(refuse)
        async with server.serve():
            relay = relay_for(server.url, "openai", KEY)
            await relay.start()
            try:
                err = await generate(relay, lambda t: None)
                await relay.prewarm(0, MODEL)  # GET /v1/models: answered 200 by the server
            finally:
                await relay.close()
        assert isinstance(err, UpstreamRejected), err
        assert "401" in err.message and "Incorrect API key provided: [api_key]" in err.message
        assert KEY not in err.message

    with caplog.at_level(logging.DEBUG):
        both(main)
    assert all(KEY not in r.getMessage() for r in caplog.records)
