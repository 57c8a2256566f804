"""Daemon-wide LLM slot granting, as pure logic: requests in, grants out (no I/O, no clock).

The master owns one :class:`Granter`. Each method takes one event (a worker asks for a slot,
gives one back, cancels a wait, reports a backend's health, dies; or time passes) and returns
the messages to send: :class:`Grant`, :class:`Queued`, :class:`Refused`, :class:`Recall`,
each addressed to an *owner* (the master uses the worker's pid) and a request id (``rid``,
unique per owner). The caller sends them; time comes in as ``now`` (monotonic seconds).

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

*Who.* Waiters are served first in, first out, across the whole daemon. The granting pass
walks the queue in order and gives each waiter a slot on its best backend; a waiter whose
allowed backends are all full is skipped (it keeps its place) so that it does not block the
ones behind it that could use a free slot elsewhere; the pass stops as soon as no backend
has a free slot at all. Invariant, after every event: no waiter could be granted. Hence a
new request is granted at once when a slot it may use is free (no waiter could use that
slot: it is not jumping the queue), else it waits, unless ``max_queue`` are already waiting:
then it is refused with ``busy`` at once.

*Health.* Workers check the backends (the master has no event loop and must not block) and
report what they see. The granter's verdict on a backend is the *latest report received*,
from any worker: the freshest observation wins, so one worker noticing an outage takes the
backend out of rotation at once, and the first one to see it answer again brings it back
(workers re-check a down backend every second). Before any report a backend counts as
healthy. An unhealthy backend gets no new slots; the ones it holds are released as usual.
A request none of whose allowed backends is healthy is refused with ``unavailable`` at once,
and so are the waiters left with no healthy allowed backend when one goes down (failing
fast beats a timeout: the client may retry).

*Positions.* A waiter gets :class:`Queued` when it starts waiting, then again when its
position (1 = next) has changed, at most once per ``position_interval`` seconds: the events
mark positions dirty and :meth:`Granter.tick` sends what is due (scanning the queue at
most every ``SCAN_EVERY``); :meth:`Granter.next_due` says when to call it next.

*Leases.* A master round trip per message costs CPU (figures in ``docs/slots.md``), so a
grant made while nobody waits says ``lease=True``: the owner may keep the slot when done and
reuse it for its next requests without asking. A leased slot still counts in ``in_flight``
(the cap stays exact). As soon as a request has to wait, every owner that may lease gets
:class:`Recall`: it gives back the slots it keeps unused and keeps none until a grant leases
again; FIFO then holds up to the requests an owner served from its leases before the recall
reached it (one link round trip). A backend going down and a new configuration recall every
lease too. With ``max_queue = 0`` nobody leases (an idle lease elsewhere would mean ``busy``).

*Configuration.* Backends are named by a key (the base URL), so :meth:`Granter.reconfigure`
can keep the counts of the backends a new configuration keeps; a dropped backend gets no
new slots and is forgotten once its last slot comes back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from chatd.stats import BackendSlots, GranterStats

POSITION_INTERVAL = 1.0  # seconds: at most one position update per waiter per interval
SCAN_EVERY = 0.1  # seconds: the queue is scanned for position updates at most this often

Reason = Literal["busy", "unavailable"]


@dataclass(frozen=True, slots=True)
class Grant:
    """``owner``'s request ``rid`` holds a slot of ``backend`` until it releases it; with
    ``lease``, the owner may keep the slot for its next requests (nobody waits)."""

    owner: int
    rid: int
    backend: str
    lease: bool = False


@dataclass(frozen=True, slots=True)
class Queued:
    """``owner``'s request ``rid`` waits at ``position`` (1 = next)."""

    owner: int
    rid: int
    position: int


@dataclass(frozen=True, slots=True)
class Refused:
    """``owner``'s request ``rid`` gets no slot: the queue is full, or no backend is usable."""

    owner: int
    rid: int
    reason: Reason


@dataclass(frozen=True, slots=True)
class Recall:
    """``owner`` must give back the slots it keeps unused and keep none until a grant leases
    again (``rid`` is always 0: it answers no request)."""

    owner: int
    rid: int = 0


Output = Grant | Queued | Refused | Recall


@dataclass(slots=True)
class _Backend:
    key: str
    max_parallel: int
    in_flight: int = 0
    healthy: bool | None = None
    configured: bool = True

    def usable(self) -> bool:
        return self.configured and self.healthy is not False

    def free(self) -> bool:
        return self.usable() and self.in_flight < self.max_parallel


@dataclass(slots=True, eq=False)
class _Waiter:
    owner: int
    rid: int
    allowed: frozenset[str]
    position: int  # the last one sent
    sent_at: float


class Granter:
    """The daemon's slots and queue (see the module docstring for the algorithm).

    Args:
        backends: ``(key, max_parallel)`` per backend, in configuration order; keys unique.
        max_queue: how many requests may wait; one more is refused with ``busy``.
        position_interval: the shortest time between two position updates of a waiter.
    """

    def __init__(
        self,
        backends: Sequence[tuple[str, int]],
        max_queue: int,
        position_interval: float = POSITION_INTERVAL,
    ) -> None:
        self.backends: dict[str, _Backend] = {}
        self.max_queue = max_queue
        self.position_interval = position_interval
        # Insertion-ordered: the FIFO queue, with O(1) removal of a cancelled waiter.
        self._waiters: dict[tuple[int, int], _Waiter] = {}
        self._held: dict[int, dict[str, int]] = {}  # owner -> backend -> slots held
        self._leasing: set[int] = set()  # owners whose last grant said lease=True
        self._dirty = False  # positions may have changed since the last tick
        self._due: float | None = None  # earliest postponed position update
        self._scanned = float("-inf")  # when tick last scanned the queue (O(queue) each)
        self._counts = {"granted": 0, "queued": 0, "busy": 0, "unavailable": 0}
        self.reconfigure(backends, max_queue)

    # -- events ------------------------------------------------------------------------------

    def acquire(self, owner: int, rid: int, allowed: Iterable[str], now: float) -> list[Output]:
        """``owner`` asks for a slot on one of the ``allowed`` backends for request ``rid``.

        Returns exactly one answer for ``rid``: a grant, ``unavailable`` (no allowed backend
        is healthy), ``busy`` (the queue is full), or the first position (then a grant or a
        refusal follows later, unless the owner cancels or dies).
        """
        allowed = frozenset(allowed)
        if not self._any_usable(allowed):
            self._counts["unavailable"] += 1
            return [Refused(owner, rid, "unavailable")]
        backend = self._pick(allowed)
        if backend is not None:
            return [self._grant(owner, rid, backend, waiting=len(self._waiters))]
        if len(self._waiters) >= self.max_queue:
            self._counts["busy"] += 1
            return [Refused(owner, rid, "busy")]
        position = len(self._waiters) + 1
        # A repeated (owner, rid) would replace the waiter in place: rids are the owner's to
        # keep unique, and the older request then simply never hears back.
        self._waiters[owner, rid] = _Waiter(owner, rid, allowed, position, now)
        self._counts["queued"] += 1
        return [Queued(owner, rid, position), *self._recall_leases()]

    def release(self, owner: int, backend: str, count: int = 1) -> list[Output]:
        """``owner`` gives back ``count`` slots of ``backend``; waiters may get them at once.

        Slots the owner does not hold are ignored (a release of none returns nothing).
        """
        count = min(count, self._held.get(owner, {}).get(backend, 0))
        if count <= 0:
            return []
        self._take_back(owner, backend, count)
        return self._serve_queue()

    def cancel(self, owner: int, rid: int) -> list[Output]:
        """``owner`` no longer waits for ``rid``. Unknown rids are ignored: when the grant
        raced the cancellation, the owner gives the slot back with :meth:`release`."""
        if self._waiters.pop((owner, rid), None) is not None:
            self._dirty = True
            # The queue is shorter, but a slot is not freer: nothing to grant.
        return []

    def owner_gone(self, owner: int) -> list[Output]:
        """``owner`` died: its waiters are dropped, its slots taken back and granted anew."""
        for key in [k for k in self._waiters if k[0] == owner]:
            del self._waiters[key]
            self._dirty = True
        for backend, count in list(self._held.get(owner, {}).items()):
            self._take_back(owner, backend, count)
        self._held.pop(owner, None)
        self._leasing.discard(owner)
        return self._serve_queue()

    def report_health(self, backend: str, healthy: bool) -> list[Output]:
        """A worker's latest health check of ``backend``: the latest report wins."""
        b = self.backends.get(backend)
        if b is None or b.healthy is healthy:
            return []
        b.healthy = healthy
        if healthy:
            return self._serve_queue()
        return self._recall_leases() + self._refuse_stranded()

    def reconfigure(self, backends: Sequence[tuple[str, int]], max_queue: int) -> list[Output]:
        """Apply a new configuration: ``(key, max_parallel)`` per backend, and ``max_queue``.

        Kept backends keep their counts and health; a lower ``max_parallel`` takes effect as
        slots come back (nothing is revoked). Dropped backends get no new slots. Waiters beyond
        a lower ``max_queue`` keep waiting: they were promised a place.
        """
        keys = [key for key, _ in backends]
        if len(set(keys)) != len(keys):
            raise ValueError(f"backend keys must be unique, got {keys}")
        old = self.backends
        self.backends = {}
        for key, max_parallel in backends:
            b = old.pop(key, None) or _Backend(key, max_parallel)
            b.max_parallel, b.configured = max_parallel, True
            self.backends[key] = b
        for key, b in old.items():
            if b.in_flight > 0:
                b.configured = False
                self.backends[key] = b
        self.max_queue = max_queue
        return self._recall_leases() + self._serve_queue() + self._refuse_stranded()

    def tick(self, now: float) -> list[Output]:
        """Position updates that are due: changed, and not sent within ``position_interval``."""
        due = self.next_due()
        if due is None or now < due:
            return []
        out: list[Output] = []
        self._dirty, self._due, self._scanned = False, None, now
        for position, w in enumerate(self._waiters.values(), 1):
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

    def leasing(self, owner: int) -> bool:
        """Whether ``owner`` may keep the slots it is done with (its last grant leased)."""
        return owner in self._leasing

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    def statistics(self) -> GranterStats:
        c = self._counts
        return GranterStats(
            backends=tuple(
                BackendSlots(b.key, b.max_parallel, b.in_flight, b.healthy, b.configured)
                for b in self.backends.values()
            ),
            queue_depth=len(self._waiters),
            max_queue=self.max_queue,
            granted_total=c["granted"],
            queued_total=c["queued"],
            refused_busy_total=c["busy"],
            refused_unavailable_total=c["unavailable"],
            held={owner: dict(held) for owner, held in self._held.items() if held},
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

    def _grant(self, owner: int, rid: int, b: _Backend, waiting: int) -> Grant:
        """Grant ``b`` to ``owner``; ``waiting``: requests still queued after this grant."""
        b.in_flight += 1
        held = self._held.setdefault(owner, {})
        held[b.key] = held.get(b.key, 0) + 1
        self._counts["granted"] += 1
        lease = waiting == 0 and self.max_queue > 0
        if lease:
            self._leasing.add(owner)
        else:
            self._leasing.discard(owner)
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
        """The granting pass: FIFO, skipping waiters that cannot use any free slot. It stops at
        the first point where no slot is free, usually after one grant: O(1), not O(queue)."""
        out: list[Output] = []
        granted: list[tuple[int, int]] = []
        for key, w in self._waiters.items():
            if not any(b.free() for b in self.backends.values()):
                break
            backend = self._pick(w.allowed)
            if backend is None:
                continue
            granted.append(key)
            waiting = len(self._waiters) - len(granted)
            out.append(self._grant(w.owner, w.rid, backend, waiting))
        for key in granted:
            del self._waiters[key]
        self._dirty = self._dirty or bool(granted)
        return out

    def _refuse_stranded(self) -> list[Output]:
        """Refuse the waiters none of whose allowed backends is usable any more."""
        out: list[Output] = []
        for key, w in list(self._waiters.items()):
            if not self._any_usable(w.allowed):
                del self._waiters[key]
                self._dirty = True
                self._counts["unavailable"] += 1
                out.append(Refused(w.owner, w.rid, "unavailable"))
        return out
