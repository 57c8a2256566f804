"""The host writer's frames: the requests of the workers' stores and their answers, as msgpack.

A pure core (no I/O): :mod:`chatd.store.sqlite_remote` (a worker's side) and
:mod:`chatd.store.sqlite_host` (the writer's) only move the bytes. One unix stream connection
per worker store carries a msgpack stream of arrays:

- a request ``[rid, op, args]``: ``rid`` an int the client picks (unique among its requests in
  flight), ``op`` one of :data:`OPS`, ``args`` the array of the op's arguments, as
  :meth:`chatd.store.sqlite_write.LoopWrites.submit` takes them;
- an answer ``[rid, status, value]``: status :data:`OK` with the result in its wire form
  (:func:`encode_result`), :data:`FAILED` with a StoreError's message, or :data:`GONE` with a
  SessionGone's (the session is unknown or expired: the store answered, it did not fail).

Answers come in the order the writer's batches committed the requests, which for a session's
requests is the order they were sent: a session's writes commit in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from chatd.errors import SessionGone, StoreError
from chatd.store.base import Appended, Event

OK, FAILED, GONE = 0, 1, 2

# Each op and the number of its arguments (chatd.store.sqlite.SqliteStore's calls).
OPS: dict[str, int] = {
    "create": 1,  # owner (of the session)
    "append": 8,  # lease owner, ttl, session, msg_id, kind, text, meta (JSON), lease_s
    "expire": 1,  # ttl
    "release": 1,  # lease owner
    "claim": 4,  # lease owner, session or None, lease_s, limit
    "renew": 4,  # lease owner, session, msg_ids, lease_s
    "probe": 0,
}

MAX_FRAME = 64 << 20  # bytes: a request larger than this is refused (a message is far smaller)


def packer() -> msgpack.Packer:
    """A packer for frames (binary strings stay bytes; texts are str)."""
    return msgpack.Packer(use_bin_type=True)


def unpacker() -> msgpack.Unpacker:
    """A streaming unpacker for frames (arrays as lists; bounded buffer)."""
    return msgpack.Unpacker(raw=False, max_buffer_size=MAX_FRAME, strict_map_key=True)


def check_request(frame: Any) -> tuple[int, str, list[Any]]:
    """``frame`` as (rid, op, args). Raises ValueError naming what is wrong."""
    if not isinstance(frame, list) or len(frame) != 3:
        raise ValueError(f"a request is [rid, op, args], not {type(frame).__name__}")
    rid, op, args = frame
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise ValueError("a request's rid must be an int")
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    if not isinstance(args, list) or len(args) != OPS[op]:
        raise ValueError(f"op {op!r} takes {OPS[op]} arguments")
    return rid, op, args


def encode_result(op: str, result: Any) -> Any:
    """A request's result as msgpack can carry it."""
    if op == "append":
        return [result.seq, result.duplicate]
    if op == "claim":
        return [[e.seq, e.kind, e.msg_id, e.text, dict(e.meta), e.ts, e.session] for e in result]
    if op == "renew":
        return sorted(result)
    return result


def decode_result(op: str, value: Any) -> Any:
    """The result :func:`encode_result` encoded, as the store's callers expect it."""
    if op == "append":
        return Appended(int(value[0]), bool(value[1]))
    if op == "claim":
        return [Event(*e) for e in value]
    if op == "renew":
        return set(value)
    return value


def answer(rid: int, op: str, result: Any) -> list[Any]:
    """The answer to request ``rid``: its result, or the StoreError it failed with."""
    if isinstance(result, SessionGone):
        return [rid, GONE, str(result)]
    if isinstance(result, BaseException):
        return [rid, FAILED, str(result)]
    return [rid, OK, encode_result(op, result)]


def outcome(op: str, frame: Sequence[Any]) -> Any:
    """An answer's result, or the StoreError to raise (returned, not raised)."""
    _, status, value = frame
    if status == OK:
        return decode_result(op, value)
    if status == GONE:
        return SessionGone(str(value))
    return StoreError(str(value))
