"""Daemon-wide LLM slot granting, as pure logic: requests in, grants out (no I/O, no clock).

The master owns one :class:`Granter` per slot class (chat, embed: :mod:`chatd.master.services`;
a granter knows nothing of classes: each is a whole pool of its own). Each method takes one
event (a worker asks for a slot, gives one back, cancels a wait, reports a backend's health,
dies; or time passes) and returns the messages to send: :class:`Grant`, :class:`Queued`,
:class:`Refused`, :class:`Recall`, each addressed to an *owner* (the master uses the worker's
pid) and a request id (``rid``, unique per owner). The caller sends them; time comes in as
``now`` (monotonic seconds).

Algorithm
---------
*Slots.* Backend ``b`` has ``max_parallel[b]`` slots; ``in_flight[b]`` counts the slots
granted and not yet given back, summed over every owner. A grant needs
``in_flight[b] < max_parallel[b]``, so the cap holds across all workers at every instant.
Each owner's holdings are kept too: a release of a slot the owner does not hold is ignored
(a confused worker cannot free another's slot), and the holdings of an owner that dies are
taken back at once.

*Which backend.* Among the backends the request *allows* (the worker's own list minus the
ones that already failed this message), that are not unhealthy and have a free slot, the
least loaded one, ``in_flight / max_parallel``, the first in configuration order on a tie.

*Who.* Each request comes with a *key*, the client it is for (the worker's choice: the hash
of the client's auth token, else its address; ``""`` for none). Waiters wait in one FIFO per
key and the keys take turns (:mod:`chatd.master.fairqueue`, deficit round robin with a quantum
of one request): a slot that frees goes to the next key in round-robin order, so a client
with 50 requests waiting delays another's by one request per key waiting, not 50; a key alone
gets every slot (work-conserving). The granting pass takes, in ring order, the first key
under its ``max_in_flight_per_key`` and the first waiter of its FIFO with a free slot on an
allowed backend; a waiter whose allowed backends are all full, or whose key holds its
``max_in_flight_per_key`` slots, is skipped (it keeps its place) so that it blocks nobody; the
pass stops as soon as no backend has a free slot. Invariant, after every event: no waiter
could be granted. Hence a new request is granted at once when a slot it may use is free and
its key is under its in-flight bound (no waiter could use that slot), else it waits, unless
its key has ``max_queued_per_key`` waiting (refused at once with ``key_busy``) or ``max_queue``
wait in all (``busy``). The per-key bound is checked first, so a key over it never takes the
global room: with ``max_queued_per_key < max_queue`` one flooding client cannot make the
others ``busy`` (several can: the global bound stays ``max_queue``). 0 = no bound per key.

*Slots per key.* A grant that does not lease (below) counts against its key until the owner
gives it back naming the key; a leased slot counts against no key (the owner may reuse it
for any request, unseen), so a slot kept leased and idle counts for none. With
``max_in_flight_per_key`` set nobody leases: every slot counts, and the bound is exact.

*Health.* Workers check the backends (the master has no event loop and must not block) and
report what they see. The granter's verdict on a backend is the *latest report received*,
from any worker: the freshest observation wins, so one worker noticing an outage takes the
backend out of rotation at once, and the first one to see it answer again brings it back
(workers re-check a down backend every second). Before any report a backend counts as
healthy. An unhealthy backend gets no new slots; the ones it holds are released as usual.
A request none of whose allowed backends is healthy is refused with ``unavailable`` at once,
and so are the waiters left with no healthy allowed backend when one goes down (failing
fast beats a timeout: the client may retry).

*Positions.* A waiter's position is 1 + the number of waiters the round robin serves before
it, as things stand (:mod:`chatd.master.fairqueue`: its round in its key's FIFO, plus the
keys ahead of it in the ring for that round); 1 = next. It does not grow unless a request
arrives that is served before it (or its own key's turn went to a later waiter of its key
that could use a slot it could not). A waiter gets :class:`Queued` when it starts waiting,
then again when its position has changed, at most once per ``position_interval`` seconds: the
events mark positions dirty and :meth:`Granter.tick` sends what is due (scanning the queue at
most every ``SCAN_EVERY``); :meth:`Granter.next_due` says when to call it next.

*Leases.* A master round trip per message costs CPU (figures in ``docs/slots.md``), so a
grant made while nobody waits says ``lease=True``: the owner may keep the slot when done and
reuse it for its next requests without asking. A leased slot still counts in ``in_flight``
(the cap stays exact). As soon as a request has to wait, every owner that may lease gets
:class:`Recall`: it gives back the slots it keeps unused and keeps none until a grant leases
again; the order then holds up to the requests an owner served from its leases before the
recall reached it (one link round trip). A backend going down and a new configuration recall
every lease too. With ``max_queue = 0`` nobody leases (an idle lease elsewhere would mean
``busy``), nor with ``max_in_flight_per_key`` (the bound needs every request seen).

*Fleet limit.* With a Redis store the hosts share each backend's slots
(:mod:`chatd.master.fleetpools`): :meth:`Granter.limit` caps a backend's slots in flight at
this host's share (a free slot needs ``in_flight < min(limit, max_parallel)``), a new backend
starts at ``new_limit`` (0: nothing before the fleet says so), and :meth:`Granter.needs` says
what the host needs of each. A lower limit takes effect as slots come back, recalling the
leases so the idle ones come back now; a higher one grants at once.

*Configuration.* Backends are named by their base URL, so :meth:`Granter.reconfigure`
can keep the counts of the backends a new configuration keeps; a dropped backend gets no
new slots and is forgotten once its last slot comes back. The backends of a dns table
(:mod:`chatd.backendtable`) come and go the same way, each address its own backend: one that
disappears is *drained* (its requests in flight finish, it gets no new one), and the waiters
of the workers that learn of a new one may use it (:meth:`Granter.allow`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from chatd.master.fairqueue import FairQueue, KeyCounts, busiest
from chatd.master.slotmsgs import Grant, Output, Queued, Reason, Recall, Refused
from chatd.stats import BackendSlots, GranterStats, KeyLoad

POSITION_INTERVAL = 1.0  # seconds: at most one position update per waiter per interval
SCAN_EVERY = 0.1  # seconds: the queue is scanned for position updates at most this often
TOP_KEYS = 10  # keys listed one by one in the statistics (the rest are summed)

__all__ = ["Grant", "Granter", "Output", "Queued", "Reason", "Recall", "Refused"]


@dataclass(slots=True)
class _Backend:
    key: str
    max_parallel: int
    in_flight: int = 0
    healthy: bool | None = None
    configured: bool = True
    limit: int | None = None  # the fleet's share of this host (Granter.limit); None: no share

    def usable(self) -> bool:
        return self.configured and self.healthy is not False

    def free(self) -> bool:
        cap = self.max_parallel if self.limit is None else min(self.limit, self.max_parallel)
        return self.usable() and self.in_flight < cap


@dataclass(slots=True, eq=False)
class _Waiter:
    owner: int
    rid: int
    key: str
    allowed: frozenset[str]
    position: int  # the last one sent
    sent_at: float


class Granter:
    """The daemon's slots and queue (see the module docstring for the algorithm).

    Args:
        backends: ``(key, max_parallel)`` per backend, in configuration order; keys unique.
        max_queue: how many requests may wait; one more is refused with ``busy``.
        position_interval: the shortest time between two position updates of a waiter.
        max_queued_per_key: how many requests of one key may wait (0: no bound of its own);
            one more is refused with ``key_busy``.
        max_in_flight_per_key: how many slots one key may hold at once (0: no bound).
    """

    def __init__(
        self,
        backends: Sequence[tuple[str, int]],
        max_queue: int,
        position_interval: float = POSITION_INTERVAL,
        *,
        max_queued_per_key: int = 0,
        max_in_flight_per_key: int = 0,
    ) -> None:
        self.backends: dict[str, _Backend] = {}
        self.max_queue = max_queue
        self.max_queued_per_key = max_queued_per_key
        self.max_in_flight_per_key = max_in_flight_per_key
        self.position_interval = position_interval
        self._queue: FairQueue[tuple[int, int], _Waiter] = FairQueue()
        self._held: dict[int, dict[str, int]] = {}  # owner -> backend -> slots held
        self._keyed = KeyCounts()  # the slots counted against each key (module docstring)
        self._leasing: set[int] = set()  # owners whose last grant said lease=True
        self._dirty = False  # positions may have changed since the last tick
        self._due: float | None = None  # earliest postponed position update
        self._scanned = float("-inf")  # when tick last scanned the queue (O(queue) each)
        self._counts = dict.fromkeys(("granted", "queued", "busy", "key_busy", "unavailable"), 0)
        self.new_limit: int | None = None  # a new backend's limit (see limit())
        self.version = 0  # counts the events: what needs() answers changes only with it
        self.reconfigure(backends, max_queue, max_queued_per_key, max_in_flight_per_key)

    # -- events ------------------------------------------------------------------------------

    def acquire(
        self, owner: int, rid: int, allowed: Iterable[str], now: float, key: str = ""
    ) -> list[Output]:
        """``owner`` asks for a slot on an ``allowed`` backend for request ``rid`` of ``key``.

        Returns exactly one answer for ``rid``: a grant, ``unavailable`` (no allowed backend
        is healthy), ``key_busy`` (``key`` has ``max_queued_per_key`` waiting), ``busy`` (the
        queue is full), or the first position (then a grant or a refusal follows later,
        unless the owner cancels or dies).
        """
        self.version += 1
        allowed = frozenset(allowed)
        if not self._any_usable(allowed):
            return [self._refuse(owner, rid, "unavailable")]
        backend = self._pick(allowed) if self._key_may_grow(key) else None
        if backend is not None:
            return [self._grant(owner, rid, backend, len(self._queue), key)]
        if 0 < self.max_queued_per_key <= self._queue.queued(key):
            return [self._refuse(owner, rid, "key_busy")]
        if len(self._queue) >= self.max_queue:
            return [self._refuse(owner, rid, "busy")]
        waiter = _Waiter(owner, rid, key, allowed, 0, now)
        # A repeated (owner, rid) replaces the older waiter: rids are the owner's to keep
        # unique, and the older request then simply never hears back.
        waiter.position = self._queue.push(key, (owner, rid), waiter)
        # Unless it is served last, the waiters it is served before move back one place.
        self._dirty = self._dirty or waiter.position < len(self._queue)
        self._counts["queued"] += 1
        return [Queued(owner, rid, waiter.position), *self._recall_leases()]

    def release(
        self, owner: int, backend: str, count: int = 1, key: str | None = None
    ) -> list[Output]:
        """``owner`` gives back ``count`` slots of ``backend``; waiters may get them at once.

        ``key``: the slots were granted (not leased) to that client's requests; None: leased.
        Slots the owner does not hold are ignored (a release of none returns nothing).
        """
        self.version += 1
        count = min(count, self._held.get(owner, {}).get(backend, 0))
        if count <= 0:
            return []
        if key is not None:
            self._keyed.remove(owner, key, count)
        self._take_back(owner, backend, count)
        return self._serve_queue()

    def cancel(self, owner: int, rid: int) -> list[Output]:
        """``owner`` no longer waits for ``rid``. Unknown rids are ignored: when the grant
        raced the cancellation, the owner gives the slot back with :meth:`release`."""
        self.version += 1
        if self._queue.remove((owner, rid)) is not None:
            self._dirty = True
            # The queue is shorter, but a slot is not freer: nothing to grant.
        return []

    def allow(self, owner: int, keys: Iterable[str]) -> list[Output]:
        """``owner``'s waiters may use ``keys`` too (backends it just learnt of: addresses a
        dns table gained), and are granted them where free. Call it before :meth:`reconfigure`
        adds them, so no waiter of a replaced address is refused as stranded meanwhile."""
        self.version += 1
        new = frozenset(keys)
        for _, w in self._queue.items():
            if w.owner == owner:
                w.allowed |= new
        return self._serve_queue() if new else []

    def owner_gone(self, owner: int) -> list[Output]:
        """``owner`` died: its waiters are dropped, its slots taken back and granted anew."""
        self.version += 1
        if self._queue.remove_if(lambda w: w.owner == owner):
            self._dirty = True
        self._keyed.drop_owner(owner)
        for backend, count in list(self._held.get(owner, {}).items()):
            self._take_back(owner, backend, count)
        self._held.pop(owner, None)
        self._leasing.discard(owner)
        return self._serve_queue()

    def report_health(self, backend: str, healthy: bool) -> list[Output]:
        """A worker's latest health check of ``backend``: the latest report wins."""
        self.version += 1
        b = self.backends.get(backend)
        if b is None or b.healthy is healthy:
            return []
        b.healthy = healthy
        if healthy:
            return self._serve_queue()
        return self._recall_leases() + self._refuse_stranded()

    def reconfigure(
        self,
        backends: Sequence[tuple[str, int]],
        max_queue: int,
        max_queued_per_key: int = 0,
        max_in_flight_per_key: int = 0,
    ) -> list[Output]:
        """Apply a new configuration: ``(key, max_parallel)`` per backend, and the bounds.

        Kept backends keep their counts and health; a lower ``max_parallel`` or
        ``max_in_flight_per_key`` takes effect as slots come back (nothing is revoked).
        Dropped backends get no new slots. Waiters beyond a lower ``max_queue`` or
        ``max_queued_per_key`` keep waiting: they were promised a place.
        """
        self.version += 1
        keys = [key for key, _ in backends]
        if len(set(keys)) != len(keys):
            raise ValueError(f"backend keys must be unique, got {keys}")
        old = self.backends
        self.backends = {}
        for key, max_parallel in backends:
            b = old.pop(key, None) or _Backend(key, max_parallel, limit=self.new_limit)
            b.max_parallel, b.configured = max_parallel, True
            self.backends[key] = b
        for key, b in old.items():
            if b.in_flight > 0:
                b.configured = False
                self.backends[key] = b
        self.max_queue = max_queue
        self.max_queued_per_key = max_queued_per_key
        self.max_in_flight_per_key = max_in_flight_per_key
        return self._recall_leases() + self._serve_queue() + self._refuse_stranded()

    def limit(self, key: str, capacity: int | None) -> list[Output]:
        """At most ``capacity`` slots of ``key`` may be in flight from now on (never more than
        its ``max_parallel``; None: ``max_parallel``): the share of the fleet's slots this host
        holds (:mod:`chatd.master.fleet`). A higher one grants to waiters at once; a lower one
        takes effect as slots come back (nothing is revoked), and recalls the leases when more
        than ``capacity`` are out, so the idle ones come back now."""
        self.version += 1
        b = self.backends.get(key)
        if b is None or b.limit == capacity:
            return []
        old, b.limit = b.limit, capacity
        if capacity is None or (old is not None and capacity > old):
            return self._serve_queue()
        return self._recall_leases() if b.in_flight > capacity else []

    def recall(self) -> list[Output]:
        """Recall every lease: the owners give back the slots they keep unused (another host
        needs them: :mod:`chatd.master.fleet`)."""
        return self._recall_leases()

    def tick(self, now: float) -> list[Output]:
        """Position updates that are due: changed, and not sent within ``position_interval``."""
        due = self.next_due()
        if due is None or now < due:
            return []
        out: list[Output] = []
        self._dirty, self._due, self._scanned = False, None, now
        for w, position in self._queue.positions():
            if position == w.position:
                continue
            due = w.sent_at + self.position_interval
            if now >= due:
                w.position, w.sent_at = position, now
                out.append(Queued(w.owner, w.rid, position))
            elif self._due is None or due < self._due:
                self._due = due
        return out

    def next_due(self) -> float | None:
        """When :meth:`tick` may have something to send: None (nothing), or a monotonic time
        (possibly in the past: call it now)."""
        due = float("-inf") if self._dirty else self._due
        return None if due is None else max(due, self._scanned + SCAN_EVERY)

    # -- views -------------------------------------------------------------------------------

    def held(self, owner: int) -> dict[str, int]:
        """The slots ``owner`` holds (in use or leased), by backend."""
        return {k: n for k, n in self._held.get(owner, {}).items() if n}

    def leasing_any(self) -> bool:
        """Whether some owner may keep the slots it is done with."""
        return bool(self._leasing)

    def leasing(self, owner: int) -> bool:
        """Whether ``owner`` may keep the slots it is done with (its last grant leased)."""
        return owner in self._leasing

    def needs(self) -> dict[str, tuple[int, int, int, bool]]:
        """Per backend: its ``max_parallel``, slots in flight, waiters that could use it (its
        key under ``max_in_flight_per_key``; a waiter allowing k backends counts for each),
        and whether it is usable (healthy, configured): what this host needs of the fleet's
        slots (:mod:`chatd.master.fleet`). One pass over the queue."""
        waiting = dict.fromkeys(self.backends, 0)
        for _, w in self._queue.items():
            if self._key_may_grow(w.key):
                for key in w.allowed:
                    if key in waiting:
                        waiting[key] += 1
        return {
            k: (b.max_parallel, b.in_flight, waiting[k] if b.usable() else 0, b.usable())
            for k, b in self.backends.items()
        }

    @property
    def refused_busy(self) -> int:
        """Requests refused ``busy`` so far (the queue full, or ``max_queue = 0``): need the
        queue did not show."""
        return self._counts["busy"]

    def key_in_flight(self, key: str) -> int:
        """The slots counted against ``key`` (granted to its requests, not leased)."""
        return self._keyed.get(key)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def statistics(self) -> GranterStats:
        c = self._counts
        top, rest = busiest(self._queue.counts(), self._keyed.total, TOP_KEYS)
        return GranterStats(
            backends=tuple(
                BackendSlots(b.key, b.max_parallel, b.in_flight, b.healthy, b.configured)
                for b in self.backends.values()
            ),
            queue_depth=len(self._queue),
            max_queue=self.max_queue,
            granted_total=c["granted"],
            queued_total=c["queued"],
            refused_busy_total=c["busy"],
            refused_unavailable_total=c["unavailable"],
            held={owner: dict(held) for owner, held in self._held.items() if held},
            refused_key_busy_total=c["key_busy"],
            keys=tuple(KeyLoad(*load) for load in top),
            other_keys=KeyLoad("", *rest),
        )

    # -- internals ---------------------------------------------------------------------------

    def _pick(self, allowed: frozenset[str]) -> _Backend | None:
        """The least-loaded allowed backend with a free slot (first on a tie), or None."""
        best: _Backend | None = None
        best_load = 2.0
        for b in self.backends.values():
            if b.key in allowed and b.free():
                load = b.in_flight / b.max_parallel
                if load < best_load:
                    best, best_load = b, load
        return best

    def _any_usable(self, allowed: frozenset[str]) -> bool:
        return any(b.usable() for b in self.backends.values() if b.key in allowed)

    def _key_may_grow(self, key: str) -> bool:
        """Whether ``key`` holds fewer than ``max_in_flight_per_key`` slots (or no bound)."""
        cap = self.max_in_flight_per_key
        return cap <= 0 or self._keyed.get(key) < cap

    def _refuse(self, owner: int, rid: int, reason: Reason) -> Refused:
        self._counts[reason] += 1
        return Refused(owner, rid, reason)

    def _grant(self, owner: int, rid: int, b: _Backend, waiting: int, key: str) -> Grant:
        """Grant ``b`` to ``owner`` for ``key``; ``waiting``: requests queued after it."""
        b.in_flight += 1
        held = self._held.setdefault(owner, {})
        held[b.key] = held.get(b.key, 0) + 1
        self._counts["granted"] += 1
        lease = waiting == 0 and self.max_queue > 0 and self.max_in_flight_per_key <= 0
        if lease:
            self._leasing.add(owner)
        else:  # counted against its key until given back with the key (module docstring)
            self._leasing.discard(owner)
            self._keyed.add(owner, key)
        return Grant(owner, rid, b.key, lease)

    def _recall_leases(self) -> list[Output]:
        """Tell every owner that may lease to stop and give back what it keeps unused."""
        out: list[Output] = [Recall(owner) for owner in sorted(self._leasing)]
        self._leasing.clear()
        return out

    def _take_back(self, owner: int, key: str, count: int) -> None:
        held = self._held[owner]
        held[key] -= count
        if not held[key]:
            del held[key]
        b = self.backends[key]
        b.in_flight -= count
        if not b.configured and b.in_flight == 0:
            del self.backends[key]

    def _serve_queue(self) -> list[Output]:
        """The granting pass: round robin across keys, skipping the waiters that cannot be
        granted now. It stops as soon as no slot is free, usually after one grant."""
        out: list[Output] = []
        while any(b.free() for b in self.backends.values()):
            w = self._queue.take(self._key_may_grow, lambda w: self._pick(w.allowed) is not None)
            if w is None:
                break
            backend = self._pick(w.allowed)
            assert backend is not None
            out.append(self._grant(w.owner, w.rid, backend, len(self._queue), w.key))
            self._dirty = True
        return out

    def _refuse_stranded(self) -> list[Output]:
        """Refuse the waiters none of whose allowed backends is usable any more."""
        gone = self._queue.remove_if(lambda w: not self._any_usable(w.allowed))
        self._dirty = self._dirty or bool(gone)
        return [self._refuse(w.owner, w.rid, "unavailable") for w in gone]
