"""Fleet-wide LLM slots, the master's rules: when to sync this host's share, what it asks,
what the granters do with the answers (:mod:`chatd.master.fleet` is the link that carries
them). Pure: no I/O, time passed in.

* One *sync* at a time renews the host's lease on every pool and tells each pool what the
  host needs: ``want`` = slots in flight + waiters that could use the backend + requests
  refused ``busy`` since the last sync (``max_queue = 0``, a full queue), at most
  ``max_parallel``; ``hold`` = what it cannot give back (its granter's limit, or the slots in
  flight if more: the granter may fill its limit while the sync travels); ``busy`` = in
  flight. The answer is the host's holding (``count``) and what it may use (``allowed``); the
  granter's limit becomes ``allowed``. A host holding more than it may use (another host
  needs its share) gives the rest back on its next sync once they come back from the
  workers; its idle leased slots are recalled when another host is short of its share.
* Each sync carries a growing seq (the ``rid``): a sync that reaches Redis after a newer one
  of this host (a slow worker, after its answer's timeout) changes nothing there.
* When: every :data:`RENEW` seconds (the lease is :data:`TTL`); every :data:`POLL` seconds
  while this host or another one is short of its share; at once (at most every
  :data:`MIN_GAP`) when the host's need grew past its limit or it has slots to give back.
  What is due is worked out again only after an event of a granter (its ``version``) or of
  the syncs, so the master's loop pays nothing per turn.
* Order of changes, so the cap holds at every instant: a limit rises only after Redis
  counted the slots for this host; Redis lowers a holding only to what the master says it
  keeps (and never below what is in flight). A host whose lease lapsed in Redis (stalled
  beyond TTL) restarts from what it has in flight.
* A pool not renewed for :data:`TTL` seconds since the last sync it answered (Redis down, no
  worker to ask, its Cluster node down) may have lost its lease, so its limit drops to 0:
  this host grants none of its slots (requests wait in its queue) until a sync is answered
  again; requests in flight finish. One warning per outage, and ``chatctl status`` says so
  from then on (a failed sync before that is normal: the next one is due 0.02-0.5 s later).
  A failover of Redis can lose the pools' keys: the hosts count again from their next sync
  (each at least what it has in flight).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from chatd.master.slotgrant import Granter, Output

TTL = 2.0
"""Seconds a host's slots stay its own in Redis without a renewal (a dead host's come back
within this)."""
RENEW = TTL / 4
"""Seconds between two syncs when nothing else calls for one."""
POLL = 0.1
"""Seconds between two syncs while this host or another is short of its share."""
MIN_GAP = 0.02
"""The shortest time between two syncs (each is a round trip through a worker to Redis)."""
ANSWER_S = 1.0
"""Seconds a worker has to answer a sync; then it counts as failed."""

Ask = tuple[str, str, int, int, int, int]
"""One pool's line of a sync: class, backend, max_parallel, want, hold, busy."""
Answer = tuple[int, int, int, int, int, int]
"""One pool's answer: count, allowed, fleet_held, fleet_busy, hosts, hungry."""


@dataclass(eq=False)
class Pool:
    """One backend of one class, as this host knows it from its last answer."""

    kind: str
    backend: str
    count: int = 0  # held in Redis
    allowed: int = 0  # the granter's limit
    valid_until: float = float("-inf")  # its lease certainly held until then
    asked_want: int = -1  # the want of the last sync sent
    refused: int = 0  # the granter's busy refusals seen by the last sync sent
    fleet_held: int = 0
    fleet_busy: int = 0
    hosts: int = 0
    hungry: int = 0


@dataclass(eq=False)
class FleetPools:
    """This host's pools and when to sync them (see the module): pure, over the granters of
    each class. Every method that changes a limit returns the granters' outputs, by class."""

    granters: Mapping[str, Granter]
    pools: dict[tuple[str, str], Pool] = field(default_factory=dict)
    sent_at: float = float("-inf")  # when the last sync was sent
    asked: bool = False  # a sync is under way
    _epoch: int = 0  # counts this object's own changes (the cache below)
    _cached: tuple[tuple[int, ...], float] | None = None  # (versions, next event)

    def __post_init__(self) -> None:
        for granter in self.granters.values():
            granter.new_limit = 0  # a backend is granted nothing before the fleet says so
            for key in list(granter.backends):
                granter.limit(key, 0)

    def _refresh(self) -> dict[tuple[str, str], tuple[int, int, int, bool]]:
        """Follow the granters' backends (a pool each; one the granter forgot, dropped and its
        last slot back, is kept until a sync gave its holding back); each pool's
        ``(max_parallel, want, busy, usable)`` now."""
        lines: dict[tuple[str, str], tuple[int, int, int, bool]] = {}
        for kind, granter in self.granters.items():
            refused = granter.refused_busy
            for key, (max_parallel, busy, waiting, usable) in granter.needs().items():
                p = self.pools.setdefault((kind, key), Pool(kind, key, refused=refused))
                # Requests refused busy since the last sync (max_queue = 0, or a full
                # queue) are need the queue does not show.
                want = min(max_parallel, busy + waiting + max(0, refused - p.refused))
                lines[(kind, key)] = (max_parallel, want, busy, usable)
        for (kind, key), p in list(self.pools.items()):
            if (kind, key) not in lines:
                if p.count == 0:
                    del self.pools[(kind, key)]
                else:
                    lines[(kind, key)] = (0, 0, 0, False)
        return lines

    def _versions(self) -> tuple[int, ...]:
        return (self._epoch, *(g.version for g in self.granters.values()))

    def next_event(self, now: float) -> float:
        """When :meth:`due` or :meth:`lapsed` may act next (possibly in the past: now).
        Computed again only after an event of a granter or of this object."""
        versions = self._versions()
        if self._cached is None or self._cached[0] != versions:
            self._cached = (versions, self._next_event())
        return self._cached[1]

    def _next_event(self) -> float:
        due = self.due()
        for p in self.pools.values():
            if p.allowed or p.count:
                due = min(due, p.valid_until)
        return due

    def due(self) -> float:
        """When the next sync should be sent (possibly in the past: now); the answer's
        deadline while one is under way."""
        if self.asked:
            return self.sent_at + ANSWER_S
        soon = self.sent_at + RENEW
        for key, (_, want, busy, _) in self._refresh().items():
            p = self.pools[key]
            if p.count > max(p.allowed, busy) or (want > p.allowed and want != p.asked_want):
                return self.sent_at + MIN_GAP
            if want > p.allowed or p.hungry or p.count > p.allowed:
                soon = min(soon, self.sent_at + POLL)
        return soon

    def asks(self, now: float) -> list[Ask]:
        """Start a sync: each pool's line (see the module)."""
        lines = self._refresh()
        self.asked, self.sent_at = True, now
        self._epoch += 1
        out: list[Ask] = []
        for key, (max_parallel, want, busy, usable) in lines.items():
            p = self.pools[key]
            p.asked_want, p.refused = want, self.granters[p.kind].refused_busy
            # What the granter may fill while the sync travels: its limit (not on a backend
            # it cannot grant: unhealthy, dropped), or what is in flight if more.
            hold = max(p.allowed if usable else 0, busy)
            out.append((p.kind, p.backend, max_parallel, want, hold, busy))
        return out

    def answered(
        self, asks: Sequence[Ask], answers: Sequence[Answer | None]
    ) -> dict[str, list[Output]]:
        """The sync of ``asks`` was answered (None: that pool failed on its own, it keeps
        what it had): the limits follow (module docstring)."""
        self.asked = False
        self._epoch += 1
        out: dict[str, list[Output]] = {}
        for ask, answer in zip(asks, answers, strict=True):
            p = self.pools.get((ask[0], ask[1]))
            if p is None or answer is None or answer[1] < 0:
                continue  # (allowed < 0: Redis saw a newer sync of this host: never here)
            p.count, p.allowed, p.fleet_held, p.fleet_busy, p.hosts, p.hungry = answer
            p.valid_until = self.sent_at + TTL
            granter = self.granters[p.kind]
            outputs = out.setdefault(p.kind, [])
            # Always: the granter's limit may differ from the pool's (a backend forgotten
            # and added again starts at 0); the same limit again changes nothing.
            outputs += granter.limit(p.backend, p.allowed)
            if p.hungry and granter.leasing_any():
                outputs += granter.recall()  # idle leased slots: another host is short
        return out

    def postpone(self, now: float) -> None:
        """No sync could be sent now (no worker to ask): the next is due as if one had been,
        and the need it would have carried stays to be told."""
        self.sent_at = now
        self._epoch += 1

    def failed(self) -> None:
        """The sync under way will not be answered."""
        self.asked = False
        self._epoch += 1

    def lapsed(self, now: float) -> dict[str, list[Output]]:
        """The pools whose lease may have lapsed (no answer for TTL, module docstring): their
        limit drops to 0. Empty when none did just now."""
        out: dict[str, list[Output]] = {}
        for p in self.pools.values():
            if now < p.valid_until or not (p.allowed or p.count):
                continue
            self._epoch += 1
            p.count = 0
            if p.allowed:
                p.allowed = 0
                out.setdefault(p.kind, []).extend(self.granters[p.kind].limit(p.backend, 0))
        return out

    def release_all(self) -> dict[str, list[Output]]:
        """Fleet slots no more (the store is no longer Redis): the granters' own caps only."""
        out: dict[str, list[Output]] = {}
        for kind, granter in self.granters.items():
            granter.new_limit = None
            for key in list(granter.backends):
                out.setdefault(kind, []).extend(granter.limit(key, None))
        return out
