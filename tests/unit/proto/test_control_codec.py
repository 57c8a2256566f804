"""The control channel codec (chatd.proto.control), fed bytes only: no sockets, no loop."""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatd.errors import ControlError
from chatd.proto import control as proto
from chatd.proto.control import Decoder, encode

STATUS_REPLY = {
    "t": "status",
    "ok": True,
    "data": {
        "master": {"pid": 1, "uptime_s": 0.5, "config": None, "state": "running"},
        "workers": [{"id": 1, "pid": 2, "state": "ready", "latency_ms": {"p50": 1.5}}],
        "raw": b"\x00\xff",
        "text": "héllo ✓",
        "big": 2**63 - 1,
        "neg": -5,
    },
}


def frame(body: bytes) -> bytes:
    """A frame built by hand from the spec: 4-byte big-endian length, then the body."""
    return len(body).to_bytes(4, "big") + body


def test_round_trip() -> None:
    """A message comes out of the decoder equal to what went into encode."""
    assert Decoder().feed(encode(STATUS_REPLY)) == [STATUS_REPLY]


def test_frame_layout_follows_the_spec() -> None:
    """encode writes a big-endian length prefix and one msgpack map."""
    data = encode({"t": "ready"})
    assert data[:4] == (len(data) - 4).to_bytes(4, "big")
    assert msgpack.unpackb(data[4:]) == {"t": "ready"}


def test_byte_by_byte() -> None:
    """A frame split into single bytes is returned once, when its last byte arrives."""
    decoder = Decoder()
    data = encode(STATUS_REPLY)
    for byte in data[:-1]:
        assert decoder.feed(bytes([byte])) == []
    assert decoder.buffered == len(data) - 1
    assert decoder.feed(data[-1:]) == [STATUS_REPLY]
    assert decoder.buffered == 0


def test_every_split_point_of_two_frames() -> None:
    """Two frames cut anywhere, in two pieces, give both messages in order."""
    one, two = {"t": "hello", "slot": 1, "pid": 2, "gen": 1}, {"t": "stats", "connections": 3}
    data = encode(one) + encode(two)
    for cut in range(len(data) + 1):
        decoder = Decoder()
        assert decoder.feed(data[:cut]) + decoder.feed(data[cut:]) == [one, two]


def test_several_frames_in_one_feed() -> None:
    """One piece holding many frames and the start of the next returns the whole ones."""
    messages = [{"t": "stats", "n": i} for i in range(50)]
    tail = encode({"t": "draining"})
    decoder = Decoder()
    assert decoder.feed(b"".join(map(encode, messages)) + tail[:3]) == messages
    assert decoder.feed(tail[3:]) == [{"t": "draining"}]


def test_empty_feed() -> None:
    """Feeding nothing returns nothing."""
    assert Decoder().feed(b"") == []


def test_frame_of_exactly_max_frame_is_accepted() -> None:
    """The limit is inclusive."""
    body = msgpack.packb({"t": "x", "pad": "a" * 100})
    decoder = Decoder(max_frame=len(body))
    assert decoder.feed(frame(body)) == [{"t": "x", "pad": "a" * 100}]


def test_oversized_length_is_refused_before_the_body_arrives() -> None:
    """A header announcing more than max_frame raises at once, nothing buffered."""
    decoder = Decoder(max_frame=1024)
    with pytest.raises(ControlError, match="frame too large: 1025 bytes"):
        decoder.feed((1025).to_bytes(4, "big"))
    assert decoder.buffered == 0


def test_default_limit_is_one_mebibyte() -> None:
    """MAX_FRAME is 1 MiB; a 4 GiB header is refused."""
    assert proto.MAX_FRAME == 1 << 20
    with pytest.raises(ControlError, match="too large"):
        Decoder().feed(b"\xff\xff\xff\xff")


def test_encode_refuses_an_oversized_message() -> None:
    """encode never builds a frame the peer would refuse."""
    with pytest.raises(ControlError, match="message too large"):
        encode({"t": "stats", "pad": "x" * 200}, max_frame=100)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (msgpack.packb([1, 2, 3]), "not a map but list"),
        (msgpack.packb(7), "not a map but int"),
        (msgpack.packb("t"), "not a map but str"),
        (b"\xc1", "undecodable"),  # 0xc1 is never used in msgpack
        (b"\x92\x01", "undecodable"),  # an array of 2 with one element: truncated
        (msgpack.packb({"t": 1}) + msgpack.packb({"t": 2}), "undecodable"),  # two in one frame
        (b"", "undecodable"),
        (msgpack.packb({1: "x"}), "map key"),
        (msgpack.packb({b"t": "x"}, use_bin_type=True), "map key that is not a string"),
    ],
    ids=[
        "list",
        "int",
        "str",
        "reserved-byte",
        "truncated",
        "two-objects",
        "empty",
        "int-key",
        "bin-key",
    ],
)
def test_garbage_frames(body: bytes, match: str) -> None:
    """A frame that is not exactly one map with string keys raises ControlError."""
    with pytest.raises(ControlError, match=match):
        Decoder().feed(frame(body))


def test_error_is_final() -> None:
    """After an error the stream cannot be trusted: every later feed raises the same error."""
    decoder = Decoder()
    with pytest.raises(ControlError) as first:
        decoder.feed(encode({"t": "ok"}) + frame(b"\xc1"))
    with pytest.raises(ControlError) as again:
        decoder.feed(encode({"t": "fine"}))
    assert again.value is first.value
    assert decoder.buffered == 0


def test_hello() -> None:
    """hello carries slot, pid and generation."""
    assert proto.hello(2, 1234, 3) == {"t": "hello", "slot": 2, "pid": 1234, "gen": 3}


def test_replies_repeat_type_and_id() -> None:
    """Replies name the request's type and echo its id when it had one."""
    assert proto.ok_reply({"t": "status"}, {"a": 1}) == {
        "t": "status",
        "ok": True,
        "data": {"a": 1},
    }
    assert proto.error_reply({"t": "scale", "id": 7}, "no.") == {
        "t": "scale",
        "id": 7,
        "ok": False,
        "error": "no.",
    }
    assert proto.error_reply({}, "what?") == {"t": None, "ok": False, "error": "what?"}


def test_message_names() -> None:
    """The wire names are fixed: workers, the master and chatctl of other versions use them."""
    names = {
        proto.HELLO: "hello",
        proto.READY: "ready",
        proto.STATS: "stats",
        proto.DRAINING: "draining",
        proto.DRAIN: "drain",
        proto.STOP: "stop",
        proto.STATUS: "status",
        proto.RELOAD: "reload",
        proto.SCALE: "scale",
        proto.SLOT_ACQUIRE: "slot_acquire",
        proto.SLOT_RELEASE: "slot_release",
    }
    assert all(k == v for k, v in names.items())
    assert proto.T == "t"


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    messages=st.lists(st.dictionaries(st.text(max_size=8), values, max_size=5), max_size=5),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
def test_any_messages_any_chunking(messages: list[dict[str, Any]], cuts: list[int]) -> None:
    """Any maps, cut into any pieces, come out whole and in order."""
    data = b"".join(encode(m) for m in messages)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    decoder = Decoder()
    out: list[dict[str, Any]] = []
    for start, end in itertools.pairwise(points):
        out += decoder.feed(data[start:end])
    assert out == messages
    assert decoder.buffered == 0


@given(
    data=st.binary(max_size=300)
    | st.lists(
        st.sampled_from([b"\x00\x00\x00", b"\x00\x00\x00\x05", b"\x81\xa1t", b"\xa1x", b"\xc1"])
        | st.binary(max_size=12),
        max_size=12,
    ).map(b"".join),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
    max_frame=st.integers(min_value=0, max_value=64) | st.just(proto.MAX_FRAME),
)
def test_any_bytes_any_chunking_give_messages_or_control_error(
    data: bytes, cuts: list[int], max_frame: int
) -> None:
    """Whatever a peer sends, however the stream is cut, feed returns maps with string keys or
    raises the codec's ControlError (and then keeps raising it): never another exception. The
    messages are those of the frames before the first bad one, whatever the chunking."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    decoder = Decoder(max_frame)
    out: list[dict[str, Any]] = []
    error: ControlError | None = None
    for start, end in itertools.pairwise(points):
        try:
            out += decoder.feed(data[start:end])
        except ControlError as exc:
            error = exc
            break
    for message in out:
        assert isinstance(message, dict) and all(isinstance(k, str) for k in message)
    if error is not None:
        with pytest.raises(ControlError):
            decoder.feed(b"")
        assert decoder.buffered == 0
    else:
        # No error: what is left is the start of a frame, which one more feed may complete.
        assert decoder.buffered < HEADER + min(max_frame, len(data))
    whole = Decoder(max_frame)
    try:
        in_one = whole.feed(data)
    except ControlError:
        # In one piece the error comes first; cut, the frames before it came out already.
        assert error is not None
    else:
        assert error is None and in_one == out


HEADER = proto.HEADER_SIZE

keys = st.text(max_size=8)
messages = st.dictionaries(keys, values, max_size=5)


@given(message=messages, kind=st.sampled_from([proto.STATUS, proto.STATS, proto.SLOT_GRANT]))
def test_encode_then_decode_round_trips(message: dict[str, Any], kind: str) -> None:
    """Any valid message (a map with string keys, msgpack values) comes back equal; encode
    refuses what the decoder would refuse (too large), never producing a frame that breaks
    the stream."""
    msg = {**message, proto.T: kind}
    assert Decoder().feed(encode(msg)) == [msg]
    size = len(encode(msg)) - HEADER
    with pytest.raises(ControlError, match="message too large"):
        encode(msg, max_frame=size - 1)
    assert Decoder(size).feed(encode(msg, max_frame=size)) == [msg]
