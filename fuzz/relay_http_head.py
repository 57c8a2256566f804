"""Fuzz target: the relay pool's response parsing (httptools' llhttp + chatd.relay.pool).

    .venv/bin/python fuzz/relay_http_head.py -max_total_time=60 fuzz/corpus/relay_http_head/

Each input is what a server sends on one connection. It is fed, without a socket, to one
connection's ``data_received`` (whole, then in small reads), then the connection ends with a
clean EOF or a reset. Checked (chatd.relay.pool's module docstring): the response is a
status >= 200 and a body, or a BrokenResponse, never another exception (one escaping
``data_received`` would reach the event loop); the same whatever the reads; a reset never
leaves a close-delimited body looking whole. atheris is not a dependency of chatd.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import atheris

with atheris.instrument_imports():
    from chatd.relay.conn import BrokenResponse, Conn
    from chatd.relay.pool import Pool


class FakeTransport:
    """What Conn uses of an asyncio transport; close() is recorded, and the harness then
    plays connection_lost as the loop would."""

    def __init__(self) -> None:
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def play(reads: list[bytes], reset: bool) -> tuple[Any, ...]:
    pool = Pool("http://backend.test:1", connect_timeout=1.0)
    conn = Conn(pool)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    resp = conn.start(b"POST /api/chat HTTP/1.1\r\n\r\n")
    for data in reads:
        if transport.closed:
            break
        conn.data_received(data)
    whole_before_end = conn.resp is None  # the response completed before the connection ended
    conn.connection_lost(ConnectionResetError(104, "Connection reset by peer") if reset else None)
    body = b""
    try:
        while data := await resp.readany():  # never waits: the connection has ended
            body += data
    except BrokenResponse:
        return ("broken",)
    finally:
        pool.close()
    assert resp.status >= 200, resp.status
    # A reset ends nothing: only a response that was whole before it may come out whole.
    assert whole_before_end or not reset, "a reset was taken for the end of the body"
    return ("ok", resp.status, body)


LOOP = asyncio.new_event_loop()


def outcome(reads: list[bytes], reset: bool) -> tuple[Any, ...]:
    return LOOP.run_until_complete(asyncio.wait_for(play(reads, reset), 5))


def test_one_input(data: bytes) -> None:
    for reset in (False, True):
        whole = outcome([data], reset)
        for size in (1, 7):
            got = outcome([data[i : i + size] for i in range(0, len(data), size)], reset)
            assert got == whole, (size, reset, got, whole)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
