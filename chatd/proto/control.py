"""The control channel's wire format: length-prefixed msgpack maps, without any I/O.

Two kinds of peers speak it, over Unix stream sockets:

* a **worker** and the master, over the socketpair the master creates for each worker;
* **chatctl** and the master, over the control socket (``[control] socket``).

Framing
-------
Each frame is a 4-byte big-endian unsigned length ``n`` followed by ``n`` bytes holding exactly
one msgpack *map* whose keys are strings. The map's ``"t"`` field names the message type (the
constants below). A frame longer than ``max_frame`` (1 MiB unless told otherwise) is refused
*before* its body is buffered, so a peer cannot make the reader hold more than ``max_frame`` plus
one read.

Messages
--------
worker -> master
    ``hello {slot, pid, gen}`` first; ``ready`` once it serves; ``stats {...}`` every second from
    the worker's event loop (it doubles as the heartbeat, so a blocked loop goes silent);
    ``draining`` to acknowledge a drain order; ``resolved {rid, ok, addresses, error}``.
    LLM slots: ``slot_acquire {rid, exclude, key}``,
    ``slot_release {backend, count, key}``, ``slot_cancel {rid}`` (each with an optional
    ``class``, below), ``health {backend, healthy}``; and ``metrics_request {rid}``; live handoff:
    ``watch {rid, session}``, ``unwatch {session}``, ``stored {session, seq}`` (see the
    constants below); ``owner {owner}`` right after ``ready``.
master -> worker
    ``drain {timeout}``: stop accepting, finish the replies in flight, close clients with 1001,
    exit 0. ``stop``: exit now. LLM slots: ``slot_grant {rid, backend, lease}``,
    ``slot_queued {rid, position}``, ``slot_refused {rid, reason}``, ``slot_recall`` (each with
    an optional ``class``); ``metrics {rid, data}``; ``watching {rid, session}``,
    ``stored {session, seq}``; backends from DNS: ``resolve {rid, host, nameservers}``,
    ``backends {sets}``; ``owner_gone {owner}``.
chatctl -> master
    ``{"t": "status"}``; the master answers ``{"t": "status", "ok": true, "data": {...}}`` or
    ``{"t": ..., "ok": false, "error": "one sentence"}``. A request may carry an ``id``, which the
    reply echoes. ``reload`` (answered when the reload has finished: ``{generation, message}``),
    ``scale {workers}``, ``stop`` (answered at once; the connection then stays open until the
    master exits). A peer that may not use the socket gets ``{"ok": false, "error":
    "permission denied: ..."}`` as soon as it connects, and a connection beyond what the master
    serves at once ``{"ok": false, "error": "too many control connections ..."}``; either is
    then closed at once, maybe before the peer's request was read (so a client must read
    that answer even when sending its request failed). A connection without a complete
    request for a few seconds is closed (:mod:`chatd.master.control`). See
    :mod:`chatd.master.commands`.

This module is pure (no asyncio, sockets or os): the master's selector loop, the worker's
asyncio protocol and chatctl's blocking client all feed bytes into a :class:`Decoder` and write
the bytes :func:`encode` returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack

from chatd.errors import ControlError

MAX_FRAME = 1 << 20
"""Default largest frame body, in bytes (1 MiB)."""

HEADER_SIZE = 4
"""Size of the big-endian length prefix."""

T = "t"
"""The field that names a message's type."""

# worker -> master
HELLO = "hello"
READY = "ready"
STATS = "stats"
DRAINING = "draining"
# A drain with a successor is over moving connections: {moved, fell_back, deferred, aborted,
# ms} (chatd.worker.mover.MoveStats); a roll is done only once its old workers said it.
HANDOFF_DONE = "handoff_done"
# The counters of open WebSockets moved between workers (chatd.worker.mover), in ``stats`` as
# ``handoff_<result>_total``: chatctl status (totals.handoff) and /metrics
# (chatd_ws_handoffs_total{result}).
HANDOFF_RESULTS = ("moved", "adopted", "fell_back", "deferred", "aborted", "refused")
HANDOFF_KEYS = tuple(f"handoff_{result}_total" for result in HANDOFF_RESULTS)
# master -> worker
DRAIN = "drain"
STOP = "stop"
# {}: the daemon drains in [server] shutdown_delay seconds; until then answer 503 on /healthz
# and /readyz and go on serving (a load balancer probing the pods takes this one out first).
PREDRAIN = "predrain"
# chatctl -> master (and the replies, which repeat the request's type)
STATUS = "status"
RELOAD = "reload"
SCALE = "scale"
# ``stop`` from chatctl reuses STOP (above): there, a graceful stop of the whole daemon
# LLM slots (chatd.worker.slots.MasterSlots <-> chatd.master.services.Services); backends are
# indices into the worker's own table of backends (its static [[llm.backends]], then what
# ``backends`` below added: chatd.backendtable), ``rid`` is unique per worker and class.
# ``key`` names the client a request is for (a hash of its token, or its address): the master
# serves the keys round robin. Optional: a worker that sends none asks for the key "".
SLOT_ACQUIRE = "slot_acquire"  # worker -> master {rid, exclude: [backend], key}
# With ``key``: the slots were counted against that client (a grant without ``lease``); without
# it, they were kept leased (counted against no client).
SLOT_RELEASE = "slot_release"  # worker -> master {backend, count (default 1), key}
SLOT_CANCEL = "slot_cancel"  # worker -> master {rid}: stop waiting (a grant may still race in)
HEALTH = "health"  # worker -> master {backend, healthy}: a health check result, on change
SLOT_GRANT = "slot_grant"  # master -> worker {rid, backend, lease}: lease = may keep it
SLOT_RECALL = "slot_recall"  # master -> worker: give back the slots kept unused, keep none
SLOT_QUEUED = "slot_queued"  # master -> worker {rid, position}: 1 = next
SLOT_REFUSED = "slot_refused"  # master -> worker {rid, reason: "busy" | "key_busy" | "unavailable"}
KEY_BUSY = "key_busy"  # the reason when the request's key has max_queued_per_key waiting
# Slot classes: each class has its own slots per backend (chat: max_parallel; embed:
# max_parallel_embed) and its own queue, so a burst of one never waits behind the other. Every
# slot_* message above, in both directions, names its class in the field ``class``; absent means
# "chat", and a chat message never carries it (the chat messages are exactly those of a chatd
# without classes). ``health`` has no class: a backend's health holds for every class.
SLOT_CLASS = "class"  # the field
SLOT_CLASS_CHAT = "chat"  # generations (/ws, /api/chat, /v1/chat/completions)
SLOT_CLASS_EMBED = "embed"  # embeddings (/api/embed, /api/embeddings, /v1/embeddings)
SLOT_CLASSES = (SLOT_CLASS_CHAT, SLOT_CLASS_EMBED)
# Backends from DNS (chatd.master.discovery <-> chatd.worker.discovered): the master has a
# worker resolve a dns table's host name for it (A and AAAA records; with ``nameservers``,
# ["ADDRESS[:PORT]"], those servers, else the system's resolver). ``ok`` false: the resolution
# failed (``error`` says why); true with no address: the name has none (NXDOMAIN, no record).
RESOLVE = "resolve"  # master -> worker {rid, host, nameservers}
RESOLVED = "resolved"  # worker -> master {rid, ok, addresses: [IP], error}
# The addresses of each dns table, by the table's URL as configured (chatd.backendtable): sent
# to a new worker first, and to every worker when they change; indices of the backends above
# are then into the worker's table of backends, which this message extends.
BACKENDS = "backends"  # master -> worker {sets: {table URL: [IP]}}
# The fleet's LLM slots (a Redis store: chatd.master.fleet): a worker talks to Redis for the
# master. Asked: per pool [class, backend, max, want, hold, busy]; answered: per pool, in the
# same order, [count, allowed, fleet_held, fleet_busy, hosts, hungry] (chatd.store.redis_slots).
FLEET_SYNC = "fleet_sync"  # master -> worker {rid, host, ttl, pools}
FLEET_SYNCED = "fleet_synced"  # worker -> master {rid, ok, pools, error}
# Daemon-wide metrics for /metrics (chatd.metrics): request and answer, matched by ``rid``.
METRICS_REQUEST = "metrics_request"  # worker -> master {rid}
METRICS = "metrics"  # master -> worker {rid, data}
# Live handoff (chatd.master.services.Services, chatd.worker.generation.Hub): a worker that
# resumed a session whose reply another worker generates watches it, and gets the finals stored
# elsewhere.
WATCH = "watch"  # worker -> master {rid, session}: send me the stored{} of this session
WATCHING = "watching"  # master -> worker {rid, session}: the watch is registered
UNWATCH = "unwatch"  # worker -> master {session}: its last subscriber here left
STORED = "stored"  # worker -> master, master -> watchers {session, seq}: a final was stored
# Fast takeover (chatd.master.takeover, chatd.worker.leases): a worker names the store owner id
# its leases are held under, right after ``ready``; when the master reaps a worker that did
# not exit cleanly, it tells one ready worker (or, with none, the next to be ready) to release
# that owner's leases and claim the messages at once, instead of a lease later.
OWNER = "owner"  # worker -> master {owner}
OWNER_GONE = "owner_gone"  # master -> worker {owner}: that store's process is dead (reaped)


def encode(msg: Mapping[str, Any], *, max_frame: int = MAX_FRAME) -> bytes:
    """Return one frame holding ``msg``, ready to be written to the stream.

    Args:
        msg: a map with string keys; its values must be msgpack-serializable (a value that is
            not raises ``TypeError``: that is a programming error, not a channel failure).
        max_frame: the largest body allowed; the peer refuses larger frames.

    Raises:
        ControlError: the encoded body is larger than ``max_frame``.
    """
    body: bytes = msgpack.packb(dict(msg), use_bin_type=True)
    if len(body) > max_frame:
        raise ControlError(f"message too large: {len(body)} bytes (limit {max_frame})")
    return len(body).to_bytes(HEADER_SIZE, "big") + body


class Decoder:
    """Turns a byte stream into messages: feed it what the socket gave, get the whole maps.

    A frame may arrive in any number of pieces and one piece may hold several frames; the
    decoder keeps the incomplete tail for the next :meth:`feed`.

    After :meth:`feed` raises :class:`ControlError` the stream cannot be resynchronized: the
    caller must close the connection. Every later :meth:`feed` raises again, and the messages
    that came before the bad frame in the same piece are not returned.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._error: ControlError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add ``data`` to the stream and return the messages it completed, in order.

        Raises:
            ControlError: a frame announces more than ``max_frame`` bytes, or its body is not
                exactly one msgpack map with string keys.
        """
        if self._error is not None:
            raise self._error
        self._buffer += data
        messages: list[dict[str, Any]] = []
        start = 0
        try:
            while len(self._buffer) - start >= HEADER_SIZE:
                size = int.from_bytes(self._buffer[start : start + HEADER_SIZE], "big")
                if size > self.max_frame:
                    raise ControlError(f"frame too large: {size} bytes (limit {self.max_frame})")
                end = start + HEADER_SIZE + size
                if len(self._buffer) < end:
                    break
                messages.append(_decode_body(bytes(self._buffer[start + HEADER_SIZE : end])))
                start = end
        except ControlError as exc:
            self._error = exc
            self._buffer.clear()
            raise
        del self._buffer[:start]
        return messages


def _decode_body(body: bytes) -> dict[str, Any]:
    """Decode one frame body; it must be exactly one map with string keys."""
    try:
        value = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises ValueError, TypeError and its own errors
        raise ControlError(f"undecodable frame: {type(exc).__name__}: {exc}") from None
    if not isinstance(value, dict):
        raise ControlError(f"frame is not a map but {type(value).__name__}")
    if not all(isinstance(key, str) for key in value):
        raise ControlError("frame has a map key that is not a string")
    return value


def slot_class(msg: Mapping[str, Any]) -> str | None:
    """The class a ``slot_*`` message is about: its ``class`` field, ``"chat"`` when absent;
    None when the field names no class of :data:`SLOT_CLASSES` (the caller drops the message)."""
    kind = msg.get(SLOT_CLASS, SLOT_CLASS_CHAT)
    return kind if isinstance(kind, str) and kind in SLOT_CLASSES else None


def with_class(msg: dict[str, Any], kind: str) -> dict[str, Any]:
    """``msg`` (a ``slot_*`` message) naming slot class ``kind``: the field is added for any
    class but chat, so a chat message stays byte for byte what it was. Returns ``msg``."""
    if kind != SLOT_CLASS_CHAT:
        msg[SLOT_CLASS] = kind
    return msg


def hello(slot: int, pid: int, generation: int) -> dict[str, Any]:
    """The first message of a worker: which slot, process and generation it is."""
    return {T: HELLO, "slot": slot, "pid": pid, "gen": generation}


def ok_reply(request: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """A successful answer to ``request`` (same type, and its ``id`` when it had one)."""
    return _reply(request, {"ok": True, "data": dict(data)})


def error_reply(request: Mapping[str, Any], error: str) -> dict[str, Any]:
    """A failed answer to ``request``: ``error`` is one sentence for a person."""
    return _reply(request, {"ok": False, "error": error})


def _reply(request: Mapping[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    reply: dict[str, Any] = {T: request.get(T)}
    if "id" in request:
        reply["id"] = request["id"]
    reply.update(fields)
    return reply
