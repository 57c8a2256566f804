"""The messages that move open WebSockets between workers (chatd.proto.adoption): bytes only."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgpack
import pytest

from chatd.proto import adoption
from chatd.proto.adoption import AdoptionError, Moved

MOVED = Moved(
    id=7,
    session="s" * 22,
    owner="a" * 32,
    floor=10,
    sent=(12, 15),
    tokens=29.5,
    refill_age=0.25,
    bad_in_a_row=1,
    peer=("127.0.0.1", 50123),
    origin="https://chat.example",
    age=12.0,
    watched=True,
)


def wire(**changes: Any) -> dict[str, Any]:
    raw = MOVED.to_wire()
    raw.update(changes)
    return raw


def packed(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def test_an_offer_round_trips_with_its_fd_count() -> None:
    other = replace(MOVED, id=8, origin=None, sent=(), watched=False)
    msg = adoption.decode(adoption.offer([MOVED, other]), fds=2)
    assert msg.kind == adoption.OFFER
    assert msg.conns == (MOVED, other)


def test_answer_commit_and_abort_round_trip() -> None:
    msg = adoption.decode(adoption.answer([1, 3], {2: "at its connection limit"}))
    assert (msg.kind, msg.ids, msg.refused) == (
        adoption.ANSWER,
        (1, 3),
        {2: "at its connection limit"},
    )
    assert adoption.decode(adoption.commit([1, 3])).ids == (1, 3)
    msg = adoption.decode(adoption.abort([2]))
    assert (msg.kind, msg.ids) == (adoption.ABORT, (2,))


def test_sent_seqs_are_deduplicated_and_sorted() -> None:
    raw = packed({"t": "offer", "v": 1, "conns": [wire(sent=[15, 12, 15])]})
    assert adoption.decode(raw, fds=1).conns[0].sent == (12, 15)


def test_the_address_is_abstract_and_names_both_pids() -> None:
    assert adoption.address(10, 20) == "\0chatd-adopt-10-20"


@pytest.mark.parametrize("count", [0, adoption.MAX_BATCH + 1])
def test_an_offer_of_no_or_too_many_connections_cannot_be_built(count: int) -> None:
    with pytest.raises(ValueError, match="1 to 64"):
        adoption.offer([replace(MOVED, id=i) for i in range(count)])


@pytest.mark.parametrize(
    ("data", "fds", "named"),
    [
        (b"\xc1", 0, "not a msgpack message"),
        (packed([1, 2]), 0, "must be a map"),
        (packed({"t": "offer", "v": 2, "conns": [wire()]}), 1, "offer version 2"),
        (packed({"t": "offer", "v": 1, "conns": []}), 0, "'conns' must list"),
        (packed({"t": "offer", "v": 1, "conns": "x"}), 0, "'conns' must list"),
        (packed({"t": "offer", "v": 1, "conns": [wire()]}), 2, "came with 2 fds"),
        (packed({"t": "offer", "v": 1, "conns": [wire(), wire()]}), 2, "unique"),
        (packed({"t": "offer", "v": 1, "conns": [5]}), 1, "must be a map"),
        (packed({"t": "commit", "ids": [1]}), 1, "came with 1 fds"),
        (packed({"t": "answer", "accepted": [1], "refused": []}), 0, "'refused' must map"),
        (packed({"t": "answer", "accepted": [1], "refused": {1: 2}}), 0, "'refused' must map"),
        (packed({"t": "answer", "accepted": "1", "refused": {}}), 0, "ids must be a list"),
        (packed({"t": "commit", "ids": list(range(65))}), 0, "ids must be a list"),
        (packed({"t": "commit", "ids": [-1]}), 0, "non-negative integers"),
        (packed({"t": "commit", "ids": [True]}), 0, "non-negative integers"),
        (packed({"t": "hello"}), 0, "unknown message type 'hello'"),
    ],
)
def test_bad_messages_name_what_is_wrong(data: bytes, fds: int, named: str) -> None:
    with pytest.raises(AdoptionError, match=named):
        adoption.decode(data, fds)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"session": ""}, "'session' must be a string"),
        ({"session": "s" * 300}, "'session' must be a string"),
        ({"owner": 5}, "'owner' must be a string"),
        ({"floor": -1}, "'floor' must be a non-negative integer"),
        ({"floor": True}, "'floor' must be a non-negative integer"),
        ({"sent": [10]}, "'sent' must be at most"),
        ({"sent": "12"}, "'sent' must be at most"),
        ({"sent": [True]}, "'sent' must be at most"),
        ({"sent": list(range(11, 11 + adoption.MAX_SENT + 1))}, "'sent' must be at most"),
        ({"peer": ["127.0.0.1"]}, "'peer' must be"),
        ({"peer": "127.0.0.1:5"}, "'peer' must be"),
        ({"peer": [1, 5]}, "'peer' must be"),
        ({"peer": ["127.0.0.1", "5"]}, "'peer' must be"),
        ({"origin": 5}, "'origin' must be a string"),
        ({"tokens": -1}, "'tokens' must be a non-negative number"),
        ({"tokens": False}, "'tokens' must be a non-negative number"),
        ({"refill_age": "0"}, "'refill_age' must be a non-negative number"),
        ({"bad": 1.5}, "'bad' must be a non-negative integer"),
        ({"age": 1e10}, "'age' must be a non-negative number"),
        ({"id": None}, "'id' must be a non-negative integer"),
        ({"watched": 1}, "'watched' must be true or false"),
    ],
)
def test_a_bad_connection_names_its_field(changes: dict[str, Any], named: str) -> None:
    with pytest.raises(AdoptionError, match=named):
        adoption.decode(packed({"t": "offer", "v": 1, "conns": [wire(**changes)]}), 1)


def test_a_full_batch_fits_one_message() -> None:
    """64 connections with full sent sets stay under MAX_MESSAGE (a seqpacket send buffer)."""
    big = [
        replace(
            MOVED, id=i, floor=2**40, sent=tuple(range(2**40 + 1, 2**40 + 1 + adoption.MAX_SENT))
        )
        for i in range(adoption.MAX_BATCH)
    ]
    assert len(adoption.offer(big)) <= adoption.MAX_MESSAGE
