"""Property tests of how chatd.relay.pool reads a response, fed bytes without a socket.

A connection (:class:`chatd.relay.pool.Conn`, the asyncio Protocol) gets a stand-in
transport; the test plays the server's bytes into ``data_received`` in any reads, then the
end of the connection (a clean EOF or a reset). Contracts (pool's module docstring): the same
status and body whatever the reads; a body ends at its Content-Length, its last chunk, or a
clean EOF, and anything short of that is a BrokenResponse; any bytes at all give a response
or a BrokenResponse, and nothing else escapes into the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chatd.relay.conn import BrokenResponse, Conn
from chatd.relay.pool import Pool

SETTINGS = settings(
    max_examples=int(os.environ.get("CHATD_WIRE_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclass
class FakeTransport:
    """What Conn uses of an asyncio transport; ``close`` is recorded (the test then plays
    connection_lost, as the loop would)."""

    closed: bool = False
    written: list[bytes] = field(default_factory=list)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def play(reads: list[bytes], reset: bool) -> tuple[int, bytes] | str:
    """Feed ``reads`` to a fresh connection's response, then end the connection (a reset,
    or a clean EOF); ``(status, body)``, or the BrokenResponse's message."""
    pool = Pool("http://backend.test:1", connect_timeout=1.0)
    conn = Conn(pool)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    resp = conn.start(b"POST / HTTP/1.1\r\n\r\n")
    for data in reads:
        if transport.closed:
            break
        conn.data_received(data)
    conn.connection_lost(ConnectionResetError(104, "reset") if reset else None)
    body = b""
    try:
        async with asyncio.timeout(5):  # a response that never ends is a failure, not a hang
            while data := await resp.readany():
                body += data
    except BrokenResponse as exc:
        return str(exc)
    finally:
        pool.close()
    assert resp.status >= 200
    return resp.status, body


def run(reads: list[bytes], reset: bool = False) -> tuple[int, bytes] | str:
    return asyncio.run(play(reads, reset))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


cuts = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=10)
token = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1)


@dataclass
class Wire:
    data: bytes
    status: int
    body: bytes
    framing: str  # "sized", "chunked" or "close"
    body_at: int  # where the body starts (the end of the final head)


@st.composite
def responses(draw: st.DrawFn) -> Wire:
    out = b""
    for _ in range(draw(st.integers(min_value=0, max_value=2))):  # interim responses
        out += b"HTTP/1.1 %d Info\r\n\r\n" % draw(st.sampled_from([100, 102, 103]))
    status = draw(st.sampled_from([200, 201, 400, 404, 429, 500, 503]))
    headers = b""
    for name in draw(st.lists(token.filter(lambda n: n.lower() not in _FRAMING), max_size=3)):
        headers += b"%s: %s\r\n" % (name.encode(), draw(token).encode())
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["sized", "chunked", "close"]))
    if framing == "sized":
        headers += b"Content-Length: %d\r\n" % len(body)
        payload = body
    elif framing == "chunked":
        headers += b"Transfer-Encoding: chunked\r\n"
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunked(body, draw(cuts)) if c)
        payload += b"0\r\n\r\n"
    else:
        payload = body
    out += b"HTTP/1.1 %d Whatever\r\n%s\r\n" % (status, headers)
    return Wire(out + payload, status, body, framing, len(out))


_FRAMING = {"content-length", "transfer-encoding", "connection", "upgrade"}


@SETTINGS
@given(responses(), cuts, st.booleans())
def test_any_reads_of_a_valid_response_give_its_status_and_body(
    wire: Wire, at: list[int], reset: bool
) -> None:
    """Whole, in any reads: the status and body; a reset after a sized or chunked body is
    whole changes nothing, while one in a close-delimited body is a BrokenResponse."""
    got = run(chunked(wire.data, at), reset)
    if reset and wire.framing == "close":
        assert isinstance(got, str) and "reset in the middle of the response body" in got
    else:
        assert got == (wire.status, wire.body)


@SETTINGS
@given(responses(), st.data())
def test_a_response_cut_short_is_a_broken_response(wire: Wire, data: st.DataObject) -> None:
    """Cut anywhere (then a clean EOF): in the head, a sized body or a chunked one, a
    BrokenResponse; in a close-delimited body, the bytes up to the cut are the body."""
    k = data.draw(st.integers(min_value=0, max_value=len(wire.data) - 1), label="cut at")
    got = run(chunked(wire.data[:k], data.draw(cuts, label="reads")))
    if wire.framing == "close" and k >= wire.body_at:
        assert got == (wire.status, wire.body[: k - wire.body_at])
    else:
        assert isinstance(got, str), got


ATOMS = [b"HTTP/1.1 ", b"HTTP/1.0 ", b"200 OK", b"101 Switching", b"100 Continue", b"\r\n"]
ATOMS += [b"Content-Length: ", b"Transfer-Encoding: chunked", b"Connection: close", b"0", b"5"]
ATOMS += [b"\r\n\r\n", b":", b" ", b"\n", b"\x00", b"\xff", b"Upgrade: h2c"]
http_bytes = st.lists(st.sampled_from(ATOMS) | st.binary(max_size=6), max_size=25).map(b"".join)


@SETTINGS
@given(http_bytes, cuts, st.booleans())
@example(
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n", [], False
)
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 200 OK\r\n\r\n", [], False)
def test_any_bytes_give_a_response_or_a_broken_response_in_any_reads(
    data: bytes, at: list[int], reset: bool
) -> None:
    """No exception but BrokenResponse (data_received would raise into the event loop)."""
    whole = run([data], reset)
    assert isinstance(whole, str) or whole[0] >= 200
    assert type(run(chunked(data, at), reset)) is type(whole)
