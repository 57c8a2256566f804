"""Fleet-wide LLM slots, the master's side: this host's share of each backend's cap.

With a Redis store several hosts may serve the same backends, and each backend's
``max_parallel`` (``max_parallel_embed``) holds across all of them, not per host (issue #14):
the hosts' masters share the slots through Redis (:mod:`chatd.store.redis_slots`: one *pool*
per backend and class, the hosts' leases in it, an atomic script that shares the pool max-min
fairly over the hosts' needs). This host's granter (:mod:`chatd.master.slotgrant`) grants only
the slots the host holds: :meth:`Granter.limit` is set to the pool's answer. Inside the host
nothing else changes: the queue, its fair order by client, the leases to workers.

**The rules** (:class:`FleetPools`, pure: no I/O, time passed in):

* One *sync* at a time renews the host's lease on every pool and tells each pool what the
  host needs: ``want`` = slots in flight + waiters that may use the backend (at most
  ``max_parallel``), ``hold`` = what it cannot give back (its granter's limit, or the slots in
  flight if more: the granter may fill its limit while the sync travels), ``busy`` = in
  flight. The answer is the host's holding (``count``) and what it may use (``allowed``); the
  granter's limit becomes ``allowed``. A host holding more than it may use (another host
  needs its share) gives the rest back on its next sync once they come back from the
  workers; its idle leased slots are recalled when another host is short of its share.
* When: every :data:`RENEW` seconds (the lease is :data:`TTL`); every :data:`POLL` seconds
  while this host or another one is short of its share; at once (at most every
  :data:`MIN_GAP`) when the host's need grew past its limit or it has slots to give back.
* Order of changes, so the cap holds at every instant: a limit rises only after Redis
  counted the slots for this host; Redis lowers a holding only to what the master says it
  keeps. A host whose lease lapsed in Redis (stalled beyond TTL) restarts from none.
* No answer for :data:`TTL` seconds since the last sync that was answered (Redis down, no
  worker to ask): the leases may have lapsed, so every limit drops to 0: this host grants no
  new slot (requests wait in its queue) until a sync is answered again. Requests in flight
  finish. A failover of Redis can lose the pools' keys: the hosts count again from their next
  sync, and the backend may see up to the old holdings twice for the length of a reply.

**Who talks to Redis.** The master runs one selector loop that must never block, and no
threads, so a worker does (as for the dns tables, :mod:`chatd.master.discovery`):
``fleet_sync {rid, host, ttl, pools: [[class, backend, max, want, hold, busy]...]}`` to one
worker (the ready ones in turn), answered ``fleet_synced {rid, ok, pools: [[count, allowed,
fleet_held, fleet_busy, hosts, hungry]...], error}`` (:mod:`chatd.worker.fleetsync`).

The host's name in the pools is ``hostname:pid:random``: a restarted master is a new host, and
its former self's slots come back when that lease lapses.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatd.master.services import Services
from chatd.master.slotgrant import Granter, Output
from chatd.master.workers import Worker, Workers
from chatd.proto import control as proto

log = logging.getLogger("chatd.master")

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
CACHE_S = MIN_GAP / 4
"""Seconds the master loop may reuse its last look at when the next sync is due."""

Ask = tuple[str, str, int, int, int, int]
"""One pool's line of a sync: class, backend, max_parallel, want, hold, busy."""
Answer = tuple[int, int, int, int, int, int]
"""One pool's answer: count, allowed, fleet_held, fleet_busy, hosts, hungry."""


def host_name() -> str:
    """This master's name in the pools: unique per process, readable in ``redis-cli``."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(eq=False)
class Pool:
    """One backend of one class, as this host knows it from its last answer."""

    kind: str
    backend: str
    count: int = 0  # held in Redis
    allowed: int = 0  # the granter's limit
    asked_want: int = -1  # the want of the last sync sent
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
    valid_until: float = float("-inf")  # the leases certainly held until then
    asked: bool = False  # a sync is under way

    def __post_init__(self) -> None:
        for granter in self.granters.values():
            granter.new_limit = 0  # a backend is granted nothing before the fleet says so
            for key in list(granter.backends):
                granter.limit(key, 0)

    def _refresh(self) -> None:
        """Follow the granters' backends: a pool per backend; one the granter forgot (dropped,
        its last slot back) is kept until a sync gave its holding back."""
        for kind, granter in self.granters.items():
            for key in granter.backends:
                self.pools.setdefault((kind, key), Pool(kind, key))
        for (kind, key), p in list(self.pools.items()):
            if key not in self.granters[kind].backends:
                p.allowed = 0
                if p.count == 0:
                    del self.pools[(kind, key)]

    def _line(self, p: Pool) -> tuple[int, int, int]:
        """The pool's max_parallel, want and busy now."""
        max_parallel, busy, waiting = self.granters[p.kind].need(p.backend)
        return max_parallel, min(max_parallel, busy + waiting), busy

    def next_event(self, now: float) -> float:
        """When :meth:`due` or :meth:`lapsed` may act next (possibly in the past: now)."""
        due = self.due(now)
        if now < self.valid_until and any(p.allowed or p.count for p in self.pools.values()):
            return min(due, self.valid_until)
        return due

    def due(self, now: float) -> float:
        """When the next sync should be sent (possibly in the past: now); the answer's
        deadline while one is under way."""
        if self.asked:
            return self.sent_at + ANSWER_S
        self._refresh()
        soon = self.sent_at + RENEW
        for p in self.pools.values():
            _, want, busy = self._line(p)
            if p.count > max(p.allowed, busy) or (want > p.allowed and want != p.asked_want):
                return self.sent_at + MIN_GAP
            if want > p.allowed or p.hungry or p.count > p.allowed:
                soon = min(soon, self.sent_at + POLL)
        return soon

    def asks(self, now: float) -> list[Ask]:
        """Start a sync: each pool's line (see the module)."""
        self._refresh()
        self.asked, self.sent_at = True, now
        out: list[Ask] = []
        for p in self.pools.values():
            max_parallel, want, busy = self._line(p)
            p.asked_want = want
            out.append((p.kind, p.backend, max_parallel, want, max(p.allowed, busy), busy))
        return out

    def answered(self, asks: Sequence[Ask], answers: Sequence[Answer]) -> dict[str, list[Output]]:
        """The sync of ``asks`` was answered: the limits follow (module docstring)."""
        self.asked = False
        self.valid_until = self.sent_at + TTL
        out: dict[str, list[Output]] = {}
        for ask, answer in zip(asks, answers, strict=True):
            p = self.pools.get((ask[0], ask[1]))
            if p is None:
                continue
            p.count, allowed, p.fleet_held, p.fleet_busy, p.hosts, p.hungry = answer
            granter = self.granters[p.kind]
            outputs = out.setdefault(p.kind, [])
            if allowed != p.allowed:
                p.allowed = allowed
                outputs += granter.limit(p.backend, allowed)
            if p.hungry and granter.leasing_any():
                outputs += granter.recall()  # idle leased slots: another host is short
        return out

    def failed(self) -> None:
        """The sync under way will not be answered."""
        self.asked = False

    def lapsed(self, now: float) -> dict[str, list[Output]]:
        """When no sync was answered for TTL (module docstring): every limit drops to 0."""
        out: dict[str, list[Output]] = {}
        if now < self.valid_until or not any(p.allowed or p.count for p in self.pools.values()):
            return out
        for p in self.pools.values():
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


class Fleet:
    """The master's link to the fleet's slots (see the module): a clock of the master's loop
    (in ``services.clocks``) and the handler of ``fleet_synced``, active with a Redis store.

    Args:
        store: the ``[sessions] store`` URL.
        workers: the master's workers (one of them syncs).
        granters: the granters by class.
        deliver: sends a granter's outputs for a class (``Services.deliver``).
    """

    def __init__(
        self,
        store: str,
        workers: Workers,
        granters: Mapping[str, Granter],
        deliver: Callable[[Iterable[Output], str], None],
    ) -> None:
        self.workers = workers
        self.granters = granters
        self.deliver = deliver
        self.host = host_name()
        self.state: FleetPools | None = None
        self._rid = 0
        self._asked: tuple[int, int, list[Ask]] | None = None  # rid, pid, what it asked
        self._turn = 0
        self._next_at = (float("-inf"), float("-inf"))  # (computed at, next event): timeout()
        self._error = ""  # the current outage's first error ("" while syncs are answered)
        workers.handlers[proto.FLEET_SYNCED] = self._synced
        workers.on_exit.append(self._exited)
        self.configure(store)

    @classmethod
    def attach(cls, store: str, workers: Workers, services: Services) -> Fleet:
        """The fleet of ``services``' granters: one of the master loop's clocks, its status
        shown by ``services``."""
        fleet = cls(store, workers, services.granters, services.deliver)
        services.clocks.append(fleet)
        services.fleet = fleet.status
        return fleet

    def configure(self, store: str) -> None:
        """On with a Redis store (every limit 0 until the first answer), off otherwise."""
        redis = store.startswith(("redis://", "rediss://", "redis+", "rediss+"))
        if redis and self.state is None:
            self.state = FleetPools(self.granters)
            log.info("LLM slots are shared with the other hosts of %s as %s", store, self.host)
        elif not redis and self.state is not None:
            self._send(self.state.release_all())
            self.state, self._asked = None, None

    # -- the master loop's clock -----------------------------------------------------------------

    def timeout(self, now: float, longest: float) -> float:
        if self.state is None:
            return longest
        # Computed at most every CACHE_S: a turn of the loop per link message, and the need of
        # a backend is O(queue); a sync is never due sooner than MIN_GAP after the last one.
        if now >= self._next_at[0] + CACHE_S:
            self._next_at = (now, self.state.next_event(now))
        return max(0.0, min(longest, self._next_at[1] - now))

    def tick(self, now: float) -> None:
        state = self.state
        if state is None:
            return
        if now < self._next_at[1]:
            return
        if self._asked is not None and now >= state.sent_at + ANSWER_S:
            self._failed(f"no answer from the worker within {ANSWER_S:g}s", now)
        if not state.asked and now >= state.due(now):
            self._ask(state, now)
        self._send(state.lapsed(now))
        self._next_at = (now, state.next_event(now))

    # -- the workers -----------------------------------------------------------------------------

    def _ask(self, state: FleetPools, now: float) -> None:
        self._turn += 1
        worker = self.workers.helper(self._turn)
        if worker is None:
            state.sent_at = now  # nobody to ask: try again after MIN_GAP or POLL
            return
        asks = state.asks(now)
        self._rid += 1
        msg = {
            proto.T: proto.FLEET_SYNC,
            "rid": self._rid,
            "host": self.host,
            "ttl": TTL,
            "pools": [list(a) for a in asks],
        }
        if self.workers.tell(worker, msg):
            self._asked = (self._rid, worker.pid, asks)
        else:
            state.failed()

    def _synced(self, worker: Worker, msg: dict[str, Any]) -> None:
        state, asked = self.state, self._asked
        if state is None or asked is None or msg.get("rid") != asked[0]:
            return  # late (after its timeout), or the fleet was turned off meanwhile
        self._asked = None
        answers = _answers(msg.get("pools"), len(asked[2]))
        if msg.get("ok") is not True or answers is None:
            error = msg.get("error")
            self._failed(error if isinstance(error, str) and error else repr(msg), time.monotonic())
            return
        if self._error:
            log.info("the fleet's LLM slots answer again (after: %s)", self._error)
            self._error = ""
        self._send(state.answered(asked[2], answers))
        self._next_at = (float("-inf"), float("-inf"))

    def _exited(self, worker: Worker) -> None:
        if self._asked is not None and self._asked[1] == worker.pid:
            self._failed(f"worker {worker.slot} exited before it answered", time.monotonic())

    def _failed(self, error: str, now: float) -> None:
        assert self.state is not None
        self._asked = None
        self.state.failed()
        if not self._error:  # one line per outage
            self._error = error
            log.warning(
                "cannot renew this host's share of the fleet's LLM slots: %s; retrying (after "
                "%gs without an answer this host grants none until it has one)",
                *(error, TTL),
            )
        self._send(self.state.lapsed(now))
        self._next_at = (float("-inf"), float("-inf"))

    def _send(self, outputs: Mapping[str, list[Output]]) -> None:
        for kind, out in outputs.items():
            self.deliver(out, kind)

    # -- views -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any] | None:
        """``{host, ttl_s, error, pools: [{class, backend, held, allowed, fleet_held,
        fleet_in_flight, hosts}]}``, or None when the slots are not shared (not Redis)."""
        if self.state is None:
            return None
        return {
            "host": self.host,
            "ttl_s": TTL,
            "error": self._error,
            "pools": [
                {
                    "class": p.kind,
                    "backend": p.backend,
                    "held": p.count,
                    "allowed": p.allowed,
                    "fleet_held": p.fleet_held,
                    "fleet_in_flight": p.fleet_busy,
                    "hosts": p.hosts,
                }
                for p in self.state.pools.values()
            ],
        }


def _answers(raw: Any, count: int) -> list[Answer] | None:
    """The pools' answers of a ``fleet_synced``, or None when malformed."""
    if not isinstance(raw, list) or len(raw) != count:
        return None
    out: list[Answer] = []
    for line in raw:
        if not (isinstance(line, list) and len(line) == 6 and all(type(v) is int for v in line)):
            return None
        out.append((line[0], line[1], line[2], line[3], line[4], line[5]))
    return out
