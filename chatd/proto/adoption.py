"""The messages that move open WebSocket connections from one worker to another.

During a reload (and an RSS recycle, a scale-down) the old worker hands each idle WebSocket to
a worker of the new generation instead of closing it with 1001: the TCP socket travels by
``SCM_RIGHTS`` over a ``SOCK_SEQPACKET`` Unix socket, and with it the state below, msgpack
encoded. The old worker is the only one who decides; the exchange for a batch of connections
is::

    old -> new   offer  {v, conns: [Moved, ...]}      + one fd per connection, same order
    new -> old   answer {accepted: [id, ...], refused: {id: why}}
    old -> new   commit {ids: [id, ...]}   (those the old worker gave up: no I/O since)
    old -> new   abort  {ids: [id, ...]}   (those it keeps; the new worker closes its copy)

The new worker does no I/O on a socket before its ``commit``; the old worker does none after
sending it. So a worker that dies anywhere in between leaves exactly one owner: before the
commit the old worker still serves the connection, after it the new one does.

What travels is what a reconnect would otherwise rebuild (:class:`Moved`): the session and its
owner (a hash of the token, never the token), what the outbox already sent (its floor and the
seqs sent above it), the rate limiter and the bad-frame count, the peer's address (checked
against the socket's on arrival) and the ``Origin`` the client sent (the new generation's origin
rule applies to it). Not ping state (the new worker starts its own keepalive) nor limits (the new
generation's apply, as they would to a reconnect).

Pure: encoding and validation only. Every decode error is :class:`AdoptionError`, naming what
is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

VERSION = 1
MAX_BATCH = 64  # connections per offer: far below SCM_MAX_FD (253)
# Seqs sent above the floor, per connection: the outbox compacts its record before an offer
# (a contiguous run raises the floor), so this is a gap count in practice; a connection with
# more gives up its oldest ones as the outbox itself does past its MAX_SENT (never resent).
MAX_SENT = 256
# Bytes of one message at most: a full batch is 64 x (~200 bytes + 256 seqs x 5) ~ 100 KB, under
# a SOCK_SEQPACKET socket's default send buffer (212,992 bytes), which bounds one message.
MAX_MESSAGE = 160 * 1024
MAX_TEXT = 256  # session ids, owners, addresses, origins, reasons

OFFER, ANSWER, COMMIT, ABORT = "offer", "answer", "commit", "abort"


class AdoptionError(ValueError):
    """A handoff message that cannot be used; the text names what is wrong."""


@dataclass(frozen=True, slots=True)
class Moved:
    """One connection's state as it travels (see the module docstring).

    Attributes:
        id: the connection's number in this exchange (unique per channel).
        session: the session the connection is open on.
        owner: the session's owner (:func:`chatd.worker.session.owner_of`: a token hash or "").
        floor: every stored event up to this seq was sent to the client.
        sent: the stored events above ``floor`` sent too (ascending).
        tokens: the rate limiter's tokens (messages that may be sent now).
        refill_age: seconds since the tokens were last refilled.
        bad_in_a_row: bad frames received in a row.
        peer: the client's address and port, as the old worker saw them.
        origin: the ``Origin`` header of the upgrade request, or None.
        age: seconds since the connection opened (its duration carries on).
        watched: the old worker watched the session (a reply of it is generated elsewhere):
            the new one claims what lapsed and watches it too; else neither is needed (the
            session was idle there), which spares the store a write per moved connection.
    """

    id: int
    session: str
    owner: str
    floor: int
    sent: tuple[int, ...]
    tokens: float
    refill_age: float
    bad_in_a_row: int
    peer: tuple[str, int]
    origin: str | None
    age: float
    watched: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "session": self.session,
            "owner": self.owner,
            "floor": self.floor,
            "sent": list(self.sent),
            "tokens": self.tokens,
            "refill_age": self.refill_age,
            "bad": self.bad_in_a_row,
            "peer": list(self.peer),
            "origin": self.origin,
            "age": self.age,
            "watched": self.watched,
        }


def _text(raw: Mapping[str, Any], key: str, *, empty: bool = True) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or len(value) > MAX_TEXT or (not empty and not value):
        raise AdoptionError(f"{key!r} must be a string of at most {MAX_TEXT} characters")
    return value


def _count(raw: Mapping[str, Any], key: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise AdoptionError(f"{key!r} must be a non-negative integer, got {value!r}")
    return value


def _seconds(raw: Mapping[str, Any], key: str) -> float:
    value = raw.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1e9:
        raise AdoptionError(f"{key!r} must be a non-negative number, got {value!r}")
    return float(value)


def moved_from_wire(raw: object) -> Moved:
    """Validate one connection of an offer."""
    if not isinstance(raw, dict):
        raise AdoptionError(f"a connection must be a map, got {type(raw).__name__}")
    sent = raw.get("sent")
    floor = _count(raw, "floor")
    if (
        not isinstance(sent, list)
        or len(sent) > MAX_SENT
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > floor for s in sent)
    ):
        raise AdoptionError(f"'sent' must be at most {MAX_SENT} seqs above 'floor'")
    peer = raw.get("peer")
    if (
        not isinstance(peer, list)
        or len(peer) != 2
        or not isinstance(peer[0], str)
        or not isinstance(peer[1], int)
    ):
        raise AdoptionError(f"'peer' must be [address, port], got {peer!r}")
    origin = raw.get("origin")
    if origin is not None:
        origin = _text(raw, "origin")
    watched = raw.get("watched", False)
    if not isinstance(watched, bool):
        raise AdoptionError(f"'watched' must be true or false, got {watched!r}")
    return Moved(
        id=_count(raw, "id"),
        session=_text(raw, "session", empty=False),
        owner=_text(raw, "owner"),
        floor=floor,
        sent=tuple(sorted(set(sent))),
        tokens=_seconds(raw, "tokens"),
        refill_age=_seconds(raw, "refill_age"),
        bad_in_a_row=_count(raw, "bad"),
        peer=(peer[0], peer[1]),
        origin=origin,
        age=_seconds(raw, "age"),
        watched=watched,
    )


def offer(conns: Sequence[Moved]) -> bytes:
    """The offer of a batch (its fds go in the same message, in this order)."""
    if not 0 < len(conns) <= MAX_BATCH:
        raise ValueError(f"an offer carries 1 to {MAX_BATCH} connections, got {len(conns)}")
    return _pack({"t": OFFER, "v": VERSION, "conns": [c.to_wire() for c in conns]})


def answer(accepted: Sequence[int], refused: Mapping[int, str]) -> bytes:
    """The new worker's answer to an offer: the ids it can adopt, and why it refuses others."""
    return _pack({"t": ANSWER, "accepted": list(accepted), "refused": dict(refused)})


def commit(ids: Sequence[int]) -> bytes:
    """The old worker gave these connections up: the new worker owns them now."""
    return _pack({"t": COMMIT, "ids": list(ids)})


def abort(ids: Sequence[int]) -> bytes:
    """The old worker keeps these connections: the new worker closes its copies."""
    return _pack({"t": ABORT, "ids": list(ids)})


def _pack(obj: Mapping[str, Any]) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded handoff message: its kind and its fields (see the module docstring)."""

    kind: str
    conns: tuple[Moved, ...] = ()
    ids: tuple[int, ...] = ()
    refused: Mapping[int, str] | None = None


def decode(data: bytes, fds: int = 0) -> Message:
    """Decode and validate one message; ``fds``: how many descriptors came with it (an offer
    must carry exactly one per connection, any other message none)."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise AdoptionError(f"not a msgpack message: {exc}") from None
    if not isinstance(raw, dict):
        raise AdoptionError(f"a message must be a map, got {type(raw).__name__}")
    kind = raw.get("t")
    if kind == OFFER:
        if raw.get("v") != VERSION:
            raise AdoptionError(f"offer version {raw.get('v')!r}, this worker speaks {VERSION}")
        conns = raw.get("conns")
        if not isinstance(conns, list) or not 0 < len(conns) <= MAX_BATCH:
            raise AdoptionError(f"'conns' must list 1 to {MAX_BATCH} connections")
        if fds != len(conns):
            raise AdoptionError(f"an offer of {len(conns)} connections came with {fds} fds")
        moved = tuple(moved_from_wire(c) for c in conns)
        if len({m.id for m in moved}) != len(moved):
            raise AdoptionError("connection ids must be unique in an offer")
        return Message(OFFER, conns=moved)
    if fds:
        raise AdoptionError(f"a {kind!r} message came with {fds} fds")
    if kind == ANSWER:
        accepted, refused = raw.get("accepted"), raw.get("refused")
        if not isinstance(refused, dict) or not all(
            isinstance(k, int) and isinstance(v, str) for k, v in refused.items()
        ):
            raise AdoptionError("'refused' must map connection ids to reasons")
        return Message(ANSWER, ids=_ids(accepted), refused=refused)
    if kind in (COMMIT, ABORT):
        return Message(kind, ids=_ids(raw.get("ids")))
    raise AdoptionError(f"unknown message type {kind!r}")


def _ids(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_BATCH:
        raise AdoptionError(f"ids must be a list of at most {MAX_BATCH} connection ids")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise AdoptionError("ids must be non-negative integers")
    return tuple(value)


def address(master_pid: int, worker_pid: int) -> str:
    """The abstract Unix socket a worker listens on for handoffs (chatd.worker.adopter)."""
    return f"\0chatd-adopt-{master_pid}-{worker_pid}"
