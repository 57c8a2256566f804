"""The websockets internals chatd relies on, pinned: an upgrade that changes them fails here.

``chatd.worker.http.limit_headers`` sets ``websockets.http11.MAX_NUM_HEADERS`` after the fork;
that works only while the request parser reads the module constant at each parse.
"""

from __future__ import annotations

import pytest
import websockets.http11
from websockets.exceptions import SecurityError
from websockets.streams import StreamReader

from chatd.worker.http import limit_headers


def parse(head: bytes) -> websockets.http11.Request:
    reader = StreamReader()
    reader.feed_data(head)
    parser = websockets.http11.Request.parse(reader.read_line)
    try:
        next(parser)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise AssertionError("the parser wants more data")


def test_the_header_count_is_read_at_each_parse() -> None:
    saved = websockets.http11.MAX_NUM_HEADERS
    head = b"GET /ws HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(20)) + b"\r\n"
    try:
        limit_headers(30)
        assert len(parse(head).headers) == 20
        limit_headers(10)
        with pytest.raises(SecurityError):
            parse(head)
    finally:
        websockets.http11.MAX_NUM_HEADERS = saved
