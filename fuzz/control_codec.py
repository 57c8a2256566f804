"""Fuzz target for chatd's control codec (:mod:`chatd.proto.control`), with atheris.

::

    pip install atheris        # not a dependency of chatd: a developer's tool
    python fuzz/control_codec.py -max_total_time=60 fuzz/corpus/control_codec/

Each input is split into a few settings and a byte stream:

* byte 0 picks ``max_frame`` (small ones reach the size checks quickly) and byte 1 how the
  stream is cut into pieces (seeded from it);
* the rest is the stream, fed to a :class:`~chatd.proto.control.Decoder` piece by piece.

What must hold, else the target raises and atheris reports a crash:

1. ``feed`` returns maps with string keys or raises :class:`~chatd.errors.ControlError`,
   never anything else; after an error every later ``feed`` raises again;
2. the outcome does not depend on the cutting: fed whole, the stream gives the same messages,
   or fails too (cut, the frames before the bad one may have come out first);
3. every message decoded re-encodes (with the same ``max_frame``) and decodes to itself
   (compared encoded: NaN is not equal to itself): what a peer can send, the master can
   relay.

The seed corpus (``fuzz/corpus/control_codec/``) holds one frame of each message kind and a
few broken ones; :func:`write_seeds` writes it again (``python fuzz/control_codec.py --seeds``).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports():
    from chatd.errors import ControlError
    from chatd.proto import control as proto

MAX_FRAMES = (proto.MAX_FRAME, 0, 1, 8, 32, 256, 4096)


def _feed_all(data: bytes, max_frame: int, cuts: list[int]) -> tuple[list[Any], bool]:
    """The messages, and whether the decoder failed, feeding ``data`` cut at ``cuts``."""
    decoder = proto.Decoder(max_frame)
    out: list[Any] = []
    start = 0
    for end in [*cuts, len(data)]:
        try:
            out += decoder.feed(data[start:end])
        except ControlError:
            try:
                decoder.feed(b"")
            except ControlError:
                return out, True
            raise AssertionError("a decoder that failed accepted more input") from None
        start = end
    return out, False


def _encoded(messages: list[Any]) -> list[bytes]:
    """Messages compared by their encoding: a NaN in one is not equal to itself."""
    return [proto.encode(m) for m in messages]


def test_one_input(raw: bytes) -> None:
    if len(raw) < 2:
        return
    max_frame = MAX_FRAMES[raw[0] % len(MAX_FRAMES)]
    data = raw[2:]
    rng = random.Random(raw[1])
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(6))) if data else []
    cut_out, cut_failed = _feed_all(data, max_frame, cuts)
    whole_out, whole_failed = _feed_all(data, max_frame, [])
    for msg in cut_out:
        if not isinstance(msg, dict) or not all(isinstance(k, str) for k in msg):
            raise AssertionError(f"not a map with string keys: {msg!r}")
    if whole_failed != cut_failed:
        raise AssertionError("the cutting changed whether the stream is valid")
    if not cut_failed and _encoded(whole_out) != _encoded(cut_out):
        raise AssertionError("the cutting changed the messages")
    for msg in cut_out:
        frame = proto.encode(msg, max_frame=max_frame)
        again = proto.Decoder(max_frame).feed(frame)
        # Compared encoded: a NaN in a message is not equal to itself, but encodes the same.
        if len(again) != 1 or proto.encode(again[0], max_frame=max_frame) != frame:
            raise AssertionError(f"does not round-trip: {msg!r} -> {again!r}")


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(proto.HEADER_SIZE, "big") + body


def write_seeds(directory: Path) -> None:
    """A frame of each kind of message, a stream of several, and broken frames."""
    import msgpack

    settings = b"\x00\x00"  # max_frame 1 MiB, not cut
    messages = [
        proto.hello(1, 4242, 1),
        {proto.T: proto.STATS, "connections": 3, "latency_buckets": [[12, 4], [40, 1]]},
        {proto.T: proto.STATUS, "id": 7},
        proto.ok_reply({proto.T: proto.STATUS, "id": 7}, {"master": {"pid": 1, "up": 0.5}}),
        proto.error_reply({proto.T: proto.RELOAD}, "reload refused"),
        {"ok": False, "error": "permission denied: uid 1000 is neither root, ..."},
        {proto.T: proto.SLOT_GRANT, "rid": 9, "backend": 0, "lease": True},
        {proto.T: proto.STORED, "session": "s-1", "seq": 2**40, "raw": b"\x00\xff"},
    ]
    seeds = {f"message-{i}": settings + proto.encode(m) for i, m in enumerate(messages)}
    seeds["stream-cut"] = b"\x00\x07" + b"".join(proto.encode(m) for m in messages)
    seeds["too-large"] = b"\x03\x00" + _frame(msgpack.packb({"t": "x" * 40}))
    seeds["not-a-map"] = settings + _frame(msgpack.packb([1, 2]))
    seeds["int-key"] = settings + _frame(msgpack.packb({1: 2}))
    seeds["reserved-byte"] = settings + _frame(b"\xc1")
    seeds["truncated"] = settings + proto.encode(messages[1])[:-3]
    seeds["huge-header"] = settings + b"\xff\xff\xff\xff"
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (directory / name).write_bytes(data)


def main() -> None:
    if sys.argv[1:] == ["--seeds"]:
        write_seeds(Path(__file__).parent / "corpus" / "control_codec")
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
