"""LLM slots: how many requests may be in flight to each backend, and who waits for one.

A slot is the right to send one generation request to one backend. Requests in flight to a
backend never exceed its ``max_parallel``; waiters are served each by the least-loaded healthy
backend it accepts; at most ``max_queue`` wait (then ``busy``). Each request names its client
(its *key*): the master serves keys round robin, each bounded (:class:`KeyBusy`).

Two implementations of the :class:`Slots` protocol the generation code uses:

* :class:`MasterSlots`, what a worker under the master uses (always, in production): the
  master grants the slots of every worker (:mod:`chatd.master.slotgrant`: the daemon-wide cap,
  the round robin across keys, the queue); this class asks it over the worker's link;
* :class:`LocalSlots`, the same rules within one process (but first in, first out, whatever
  the key), for in-process use and tests.

*Slot classes.* Slots come in classes (``chatd.proto.control.SLOT_CLASSES``), each with its
own slots per backend and its own queue at the master: ``chat`` for generations
(``max_parallel``), ``embed`` for embeddings (``max_parallel_embed``), so that a burst of
embedding requests never delays a chat generation, nor chat the embeddings beyond their own
cap. A worker has one instance per class (``kind``), which names its class on every message
it sends; :func:`dispatch` hands each message of the master to the instance of its class.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from chatd.config import BackendConfig
from chatd.errors import UpstreamUnavailable
from chatd.proto import control as proto

log = logging.getLogger("chatd.slots")

POSITION_NOTICE_INTERVAL = 1.0  # seconds: queued{position} at most once a second per waiter
LEASE_IDLE = 1.0  # seconds: a leased slot unused for a whole period goes back to the master


class QueueFull(Exception):
    """The queue of waiters is full: the client gets ``busy``."""


class KeyBusy(QueueFull):
    """The request's key (its client) has ``max_queued_per_key`` requests waiting: the client
    gets ``busy`` too, saying so (a :class:`QueueFull`, for callers that need not tell)."""


class Slots(Protocol):
    """What a generation needs: a slot on some backend, and to give it back."""

    async def acquire(
        self,
        on_position: Callable[[int], None],
        exclude: frozenset[int] = frozenset(),
        key: str = "",
    ) -> int:
        """Wait for a slot for a request of client ``key``; return the backend index.
        Raises QueueFull (KeyBusy: ``key``'s own bound) or UpstreamUnavailable."""

    def release(self, backend: int, key: str = "") -> None:
        """Give back a slot taken by ``acquire`` (with the same ``key``)."""

    def set_healthy(self, backend: int, healthy: bool) -> None:
        """Record a health check; an unhealthy backend gets no slots until it recovers."""


@dataclass(slots=True, eq=False)
class _Waiter:
    future: asyncio.Future[int]
    on_position: Callable[[int], None]
    exclude: frozenset[int]
    last_position: int = 0
    last_sent: float = field(default=0.0)


class LocalSlots:
    """Slots granted within one worker process (FIFO, least-loaded healthy backend)."""

    def __init__(
        self, backends: Sequence[BackendConfig], max_queue: int, kind: str = proto.SLOT_CLASS_CHAT
    ) -> None:
        """``kind``: the slot class, which says each backend's slots (``max_parallel`` or
        ``max_parallel_embed``); one instance per class, each with its own queue."""
        self.backends = tuple(backends)
        self.max_queue = max_queue
        self.capacity = [b.capacity(kind) for b in self.backends]
        self.in_flight = [0] * len(self.backends)
        self.healthy = [True] * len(self.backends)
        self._waiters: deque[_Waiter] = deque()

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    def _pick(self, exclude: frozenset[int]) -> int | None:
        """The least-loaded healthy backend with a free slot, not in ``exclude``."""
        best: int | None = None
        best_load = 2.0
        for i, cap in enumerate(self.capacity):
            if i in exclude or not self.healthy[i] or self.in_flight[i] >= cap:
                continue
            load = self.in_flight[i] / cap
            if load < best_load:
                best, best_load = i, load
        return best

    def _any_usable(self, exclude: frozenset[int]) -> bool:
        return any(self.healthy[i] for i in range(len(self.backends)) if i not in exclude)

    async def acquire(
        self,
        on_position: Callable[[int], None],
        exclude: frozenset[int] = frozenset(),
        key: str = "",
    ) -> int:
        if not self._any_usable(exclude):
            raise UpstreamUnavailable(
                "No healthy LLM backend is available right now: retry in a few seconds."
            )
        if not self._waiters:
            picked = self._pick(exclude)
            if picked is not None:
                self.in_flight[picked] += 1
                return picked
        if len(self._waiters) >= self.max_queue:
            raise QueueFull
        waiter = _Waiter(asyncio.get_running_loop().create_future(), on_position, exclude)
        self._waiters.append(waiter)
        waiter.last_position = len(self._waiters)
        waiter.last_sent = time.monotonic()
        on_position(waiter.last_position)
        try:
            return await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                # Granted but the waiter went away (cancelled): give the slot back.
                self.release(waiter.future.result())
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self, backend: int, key: str = "") -> None:
        self.in_flight[backend] -= 1
        self._grant()

    def set_healthy(self, backend: int, healthy: bool) -> None:
        self.healthy[backend] = healthy
        if healthy:
            self._grant()
            return
        # Waiters that can use no healthy backend at all fail now rather than time out.
        for w in list(self._waiters):
            if not self._any_usable(w.exclude) and not w.future.done():
                self._waiters.remove(w)
                w.future.set_exception(
                    UpstreamUnavailable(
                        "Every LLM backend this message could use went down while it "
                        "waited: retry in a few seconds."
                    )
                )

    def _grant(self) -> None:
        """Hand free slots to waiters in FIFO order, then tell the others their position."""
        granted = False
        for w in list(self._waiters):
            if w.future.done():
                self._waiters.remove(w)
                continue
            picked = self._pick(w.exclude)
            if picked is None:
                if self._pick(frozenset()) is None:
                    break  # nothing free at all: keep FIFO order
                continue
            self._waiters.remove(w)
            self.in_flight[picked] += 1
            w.future.set_result(picked)
            granted = True
        if granted:
            self._tell_positions()

    def _tell_positions(self) -> None:
        now = time.monotonic()
        for pos, w in enumerate(self._waiters, 1):
            if pos != w.last_position and now - w.last_sent >= POSITION_NOTICE_INTERVAL:
                w.last_position, w.last_sent = pos, now
                w.on_position(pos)


@dataclass(slots=True, eq=False)
class _Request:
    future: asyncio.Future[int]
    on_position: Callable[[int], None]
    key: str


class MasterSlots:
    """Slots granted by the master, daemon-wide, over this worker's link.

    ``send`` queues a message for the master (``MasterLink.send``: False when the link is
    down); the worker routes the master's ``slot_*`` messages to :meth:`on_message`. The
    wire messages are in :mod:`chatd.proto.control`; the granting rules, leases included,
    in :mod:`chatd.master.slotgrant`.

    A request is ``slot_acquire {rid, exclude, key}``; the master answers ``slot_grant {rid,
    backend, lease}``, or ``slot_refused`` (``busy``: :class:`QueueFull`; ``key_busy``:
    :class:`KeyBusy`; ``unavailable``: :class:`UpstreamUnavailable`), or ``slot_queued
    {position}`` first, as often as the position changes (at most once a second). A waiter
    that goes away (its task is cancelled) sends ``slot_cancel``; a grant that raced it (or
    any grant nobody waits for) is given back at once with ``slot_release``.

    *Leases.* While the last grant said ``lease`` (and no request of ours waits for the
    master's answer), a slot this worker is done with is kept instead of released, and the
    next request takes a kept slot (the least busy allowed backend) without asking the
    master: no round trip. ``slot_recall`` ends that: the kept slots go back at once
    (``slot_release {backend, count}``) and every later release is sent, until a grant leases
    again. Slots kept unused for a whole ``LEASE_IDLE`` period go back too (low-water mark
    per period), so an idle worker holds none.

    *Keys.* A slot granted without ``lease`` counts against its request's key at the master
    until given back, so it is never kept and its ``slot_release`` names the key.

    When the link ends, every waiter fails with :class:`UpstreamUnavailable`; the slots held
    are the master's to take back when this process exits.

    *Class.* ``kind`` is the slot class of every slot this instance takes (module docstring):
    a class other than chat is named in each message sent (``class``), and
    :meth:`on_message` takes only messages of its class (route them with :func:`dispatch`).
    Each class has its own rids, leases and requests: two instances never interfere. Only
    the chat instance sends ``health``, which the master applies to every class (the
    backend is one server); another class's :meth:`set_healthy` just records the view.

    ``in_flight`` counts the slots in use here, ``held`` those the master granted us (in use
    or kept); ``healthy`` is this worker's own view from its checks (for ``/readyz``).

    *Discovered backends.* The list of backends grows as the master discovers addresses
    (:mod:`chatd.backendtable`): :meth:`add` appends one, :meth:`retire` marks one gone
    (``live`` False: the slots kept unused on it go back at once, and every slot released on
    it later, so the master can forget it once drained), :meth:`revive` brings it back.
    """

    MESSAGES = frozenset(
        (proto.SLOT_GRANT, proto.SLOT_QUEUED, proto.SLOT_REFUSED, proto.SLOT_RECALL)
    )
    """The message types from the master that :meth:`on_message` handles."""

    def __init__(
        self,
        backends: Sequence[BackendConfig],
        send: Callable[[Mapping[str, Any]], bool],
        kind: str = proto.SLOT_CLASS_CHAT,
    ) -> None:
        if kind not in proto.SLOT_CLASSES:
            raise ValueError(f"unknown slot class {kind!r} (known: {proto.SLOT_CLASSES})")
        self.kind = kind
        self.backends = list(backends)
        self.capacity = [b.capacity(kind) for b in self.backends]  # slots of our class
        self.in_flight = [0] * len(self.backends)
        self.held = [0] * len(self.backends)
        self.healthy = [True] * len(self.backends)
        self.live = [True] * len(self.backends)  # False: retired (an address gone)
        self.leasing = False
        self._reported: list[bool | None] = [None] * len(self.backends)
        self._send = send
        self._requests: dict[int, _Request] = {}
        self._next_rid = 0
        self._low = [0] * len(self.backends)  # fewest slots kept unused since the last trim
        self._keyed: list[dict[str, int]] = [{} for _ in self.backends]  # (Keys) by backend
        self._trim: asyncio.TimerHandle | None = None

    @property
    def queue_depth(self) -> int:
        """Requests of this worker waiting for the master's answer."""
        return len(self._requests)

    def any_healthy(self) -> bool:
        """Whether some live backend passed its last check (``/readyz``)."""
        return any(h and up for h, up in zip(self.healthy, self.live, strict=True))

    def add(self, config: BackendConfig) -> None:
        """A backend appended to the worker's table (a discovered address), healthy until
        its first check says otherwise."""
        self.backends.append(config)
        self.capacity.append(config.capacity(self.kind))
        self.in_flight.append(0)
        self.held.append(0)
        self._low.append(0)
        self.healthy.append(True)
        self.live.append(True)
        self._reported.append(None)
        self._keyed.append({})

    def retire(self, backend: int) -> None:
        """The backend's address is gone: no request goes to it from now on; its slots kept
        unused go back now, those in use when their requests end."""
        self.live[backend] = False
        self._give_back(backend, self._kept(backend))

    def revive(self, backend: int) -> None:
        """A retired backend's address is back: as a new backend (healthy until checked,
        and its next check reported to the master whatever it says)."""
        self.live[backend] = True
        self.healthy[backend] = True
        self._reported[backend] = None

    async def acquire(
        self,
        on_position: Callable[[int], None],
        exclude: frozenset[int] = frozenset(),
        key: str = "",
    ) -> int:
        if self.leasing and not self._requests:  # none of ours waits: no overtaking
            kept = self._pick_kept(exclude)
            if kept is not None:
                self.in_flight[kept] += 1
                self._low[kept] = min(self._low[kept], self._kept(kept))
                return kept
        self._next_rid += 1
        rid = self._next_rid
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._requests[rid] = _Request(future, on_position, key)  # before sending: quick answers
        acquire = {proto.T: proto.SLOT_ACQUIRE, "rid": rid, "exclude": sorted(exclude)}
        if key:  # absent means ""
            acquire["key"] = key
        if not self._send(proto.with_class(acquire, self.kind)):
            del self._requests[rid]
            raise _master_gone()
        try:
            return await future
        except asyncio.CancelledError:
            if self._requests.pop(rid, None) is not None:
                self._send(proto.with_class({proto.T: proto.SLOT_CANCEL, "rid": rid}, self.kind))
            elif future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result(), key)  # granted, but the waiter went away first
            raise

    def release(self, backend: int, key: str = "") -> None:
        self.in_flight[backend] -= 1
        keyed = self._keyed[backend]
        if keyed.get(key, 0) > 0:  # counted against the key: back to the master, naming it
            keyed[key] -= 1
            if not keyed[key]:
                del keyed[key]
            self._give_back(backend, 1, key)
        elif self.leasing and not self._requests and self.live[backend]:
            self._schedule_trim()
        else:  # nobody may keep it, or one of ours waits at the master: FIFO goes through it
            self._give_back(backend, 1)

    def set_healthy(self, backend: int, healthy: bool) -> None:
        """Record this worker's check and report it to the master when it changed (the chat
        instance only: the master applies it to every class)."""
        self.healthy[backend] = healthy
        if self.kind != proto.SLOT_CLASS_CHAT:
            return
        if self._reported[backend] is not healthy and self._send(
            {proto.T: proto.HEALTH, "backend": backend, "healthy": healthy}
        ):
            self._reported[backend] = healthy

    def on_message(self, msg: Mapping[str, Any]) -> None:
        """Handle a ``slot_grant``, ``slot_queued``, ``slot_refused`` or ``slot_recall`` of our
        class (one of another class is a routing bug: logged and dropped)."""
        if proto.slot_class(msg) != self.kind:
            log.error("%s slots got a message of another slot class: %r", self.kind, msg)
            return
        kind = msg.get(proto.T)
        rid: int = msg.get("rid", 0)
        if kind == proto.SLOT_QUEUED:
            req = self._requests.get(rid)
            position = msg.get("position")
            if req is not None and isinstance(position, int):
                req.on_position(position)
            return
        if kind == proto.SLOT_RECALL:
            self.leasing = False
            for i in range(len(self.backends)):
                self._give_back(i, self._kept(i))
            return
        req = self._requests.pop(rid, None)
        if kind == proto.SLOT_GRANT:
            backend = msg.get("backend")
            if not isinstance(backend, int) or not 0 <= backend < len(self.backends):
                log.error("the master granted a slot of an unknown backend: %r", msg)
                if req is not None and not req.future.done():
                    req.future.set_exception(_master_gone())
                return
            self.leasing = msg.get("lease") is True
            self.held[backend] += 1
            self.in_flight[backend] += 1
            key = req.key if req is not None else ""
            if not self.leasing:
                keyed = self._keyed[backend]
                keyed[key] = keyed.get(key, 0) + 1
            if req is None or req.future.done():
                self.release(backend, key)  # nobody waits for it (cancelled): give it back
            else:
                req.future.set_result(backend)
        elif kind == proto.SLOT_REFUSED and req is not None and not req.future.done():
            if msg.get("reason") == proto.KEY_BUSY:
                req.future.set_exception(KeyBusy())
            elif msg.get("reason") == "busy":
                req.future.set_exception(QueueFull())
            else:
                req.future.set_exception(
                    UpstreamUnavailable(
                        "No healthy LLM backend is available right now: retry in a few seconds."
                    )
                )

    def link_gone(self) -> None:
        """The master link ended: every waiter fails now (no answer can come)."""
        self.leasing = False
        requests, self._requests = self._requests, {}
        for req in requests.values():
            if not req.future.done():
                req.future.set_exception(_master_gone())

    # -- leases ----------------------------------------------------------------------------

    def _kept(self, backend: int) -> int:
        return self.held[backend] - self.in_flight[backend]

    def _pick_kept(self, exclude: frozenset[int]) -> int | None:
        """The allowed backend with a kept slot and the fewest requests in use here."""
        best: int | None = None
        for i, cap in enumerate(self.capacity):
            if i in exclude or self._kept(i) <= 0 or not self.live[i]:
                continue
            if best is None or self.in_flight[i] / cap < (
                self.in_flight[best] / self.capacity[best]
            ):
                best = i
        return best

    def _give_back(self, backend: int, count: int, key: str | None = None) -> None:
        if count <= 0:
            return
        self.held[backend] -= count
        self._low[backend] = min(self._low[backend], self._kept(backend))
        msg: dict[str, Any] = {proto.T: proto.SLOT_RELEASE, "backend": backend}
        if count != 1:
            msg["count"] = count
        if key is not None:
            msg["key"] = key
        self._send(proto.with_class(msg, self.kind))

    def _schedule_trim(self) -> None:
        if self._trim is None:
            self._trim = asyncio.get_running_loop().call_later(LEASE_IDLE, self._trim_idle)

    def _trim_idle(self) -> None:
        """Give back the slots that stayed unused for the whole period just ended."""
        self._trim = None
        for backend in range(len(self.backends)):
            self._give_back(backend, min(self._low[backend], self._kept(backend)))
            self._low[backend] = self._kept(backend)
        if any(self._kept(b) > 0 for b in range(len(self.backends))):
            self._schedule_trim()


def dispatch(msg: Mapping[str, Any], by_class: Mapping[str, MasterSlots]) -> bool:
    """Hand a slot message from the master (``MasterSlots.MESSAGES``) to the instance of its
    class in ``by_class`` (class name -> instance; the message's ``class``, absent: chat).
    False, logged, when the worker has no instance of that class (nothing is waiting for
    it: a master of another version, or a bug)."""
    kind = proto.slot_class(msg)
    slots = by_class.get(kind) if kind is not None else None
    if slots is None:
        log.error("a slot message of a class this worker has no slots of: %r", msg)
        return False
    slots.on_message(msg)
    return True


def _master_gone() -> UpstreamUnavailable:
    return UpstreamUnavailable(
        "This chatd worker lost its master and cannot get an LLM slot: reconnect and resend."
    )
