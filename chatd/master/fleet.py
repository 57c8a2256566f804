"""Fleet-wide LLM slots, the master's side: this host's share of each backend's cap.

With a Redis store several hosts may serve the same backends, and each backend's
``max_parallel`` (``max_parallel_embed``) holds across all of them, not per host (issue #14):
the hosts' masters share the slots through Redis (:mod:`chatd.store.redis_slots`: one *pool*
per backend and class, the hosts' leases in it, an atomic script that shares the pool max-min
fairly over the hosts' needs). This host's granter (:mod:`chatd.master.slotgrant`) grants only
the slots the host holds: :meth:`Granter.limit` is set to the pool's answer. Inside the host
nothing else changes: the queue, its fair order by client, the leases to workers.

The rules are :mod:`chatd.master.fleetpools` (pure); this module carries them.

**Who talks to Redis.** The master runs one selector loop that must never block, and no
threads, so a worker does (as for the dns tables, :mod:`chatd.master.discovery`):
``fleet_sync {rid, host, ttl, pools: [[class, backend, max, want, hold, busy]...]}`` to one
worker (the ready ones in turn), answered ``fleet_synced {rid, ok, pools: [[count, allowed,
fleet_held, fleet_busy, hosts, hungry] or null...], error}`` (:mod:`chatd.worker.fleetsync`;
null: that pool failed alone). The ``rid`` is the sync's seq in Redis as well.

The host's name in the pools is ``hostname:pid:random``: a restarted master is a new host, and
its former self's slots come back when that lease lapses.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from chatd.config_checks import redacted
from chatd.master.fleetpools import ANSWER_S, TTL, Answer, Ask, FleetPools
from chatd.master.services import Services
from chatd.master.slotgrant import Granter, Output
from chatd.master.workers import Worker, Workers
from chatd.proto import control as proto

log = logging.getLogger("chatd.master")


def host_name() -> str:
    """This master's name in the pools: unique per process, readable in ``redis-cli``."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


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
        self._failure = ""  # the current outage's first error ("" while syncs are answered)
        self._dropped = False  # the outage dropped limits (logged; status says so)
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
            log.info(
                "LLM slots are shared with the other hosts of %s as %s", redacted(store), self.host
            )
        elif not redis and self.state is not None:
            self._send(self.state.release_all())
            self.state, self._asked = None, None

    # -- the master loop's clock -----------------------------------------------------------------

    def timeout(self, now: float, longest: float) -> float:
        if self.state is None:
            return longest
        return max(0.0, min(longest, self.state.next_event(now) - now))

    def tick(self, now: float) -> None:
        state = self.state
        if state is None or now < state.next_event(now):
            return
        if self._asked is not None and now >= state.sent_at + ANSWER_S:
            self._failed(f"no answer from the worker within {ANSWER_S:g}s")
        if not state.asked and now >= state.due():
            self._ask(state, now)
        self._lapse(now)

    # -- the workers -----------------------------------------------------------------------------

    def _ask(self, state: FleetPools, now: float) -> None:
        self._turn += 1
        worker = self.workers.helper(self._turn)
        if worker is None:
            state.postpone(now)  # nobody to ask: again after MIN_GAP or POLL
            return
        asks = state.asks(now)
        self._rid += 1  # the sync's seq in Redis too: a late one there changes nothing
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
        error = msg.get("error")
        error = error if isinstance(error, str) else ""
        if msg.get("ok") is not True or answers is None:
            self._failed(error or f"a malformed answer {msg!r}")
            return
        self._send(state.answered(asked[2], answers))
        if error:  # some pools failed on their own (a Cluster node down): they keep theirs
            self._failed(error, answered=True)
        elif self._failure:
            if self._dropped:
                log.info("this host's share of the fleet's LLM slots is renewed again")
            self._failure, self._dropped = "", False

    def _exited(self, worker: Worker) -> None:
        if self._asked is not None and self._asked[1] == worker.pid:
            self._failed(f"worker {worker.slot} exited before it answered")

    def _failed(self, error: str, answered: bool = False) -> None:
        """A sync (or some of its pools) failed: again at the next due time. Logged at debug
        only: a failure matters once a pool's lease may have lapsed (:meth:`_lapse`)."""
        assert self.state is not None
        if not answered:
            self._asked = None
            self.state.failed()
        log.debug("a sync of the fleet's LLM slots failed: %s", error)
        self._failure = self._failure or error

    def _lapse(self, now: float) -> None:
        """Drop the limits of the pools whose lease may have lapsed; one warning per outage."""
        assert self.state is not None
        outputs = self.state.lapsed(now)
        if outputs and not self._dropped:
            self._dropped = True
            log.warning(
                "cannot renew this host's share of the fleet's LLM slots for %gs (%s): no LLM "
                "slot is granted here until it is (requests wait in the queue)",
                *(TTL, self._failure or "no answer"),
            )
        self._send(outputs)

    def _send(self, outputs: Mapping[str, list[Output]]) -> None:
        for kind, out in outputs.items():
            self.deliver(out, kind)

    # -- views -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any] | None:
        """``{host, ttl_s, error, pools: [{class, backend, held, allowed, fleet_held,
        fleet_in_flight, hosts}]}``, or None when the slots are not shared (not Redis).
        ``error``: why the renewals fail, once that dropped limits ("" otherwise)."""
        if self.state is None:
            return None
        return {
            "host": self.host,
            "ttl_s": TTL,
            "error": (self._failure or "no answer") if self._dropped else "",
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


def _answers(raw: Any, count: int) -> list[Answer | None] | None:
    """The pools' answers of a ``fleet_synced`` (None for a pool that failed), or None when
    malformed."""
    if not isinstance(raw, list) or len(raw) != count:
        return None
    out: list[Answer | None] = []
    for line in raw:
        if line is None:
            out.append(None)
            continue
        if not (isinstance(line, list) and len(line) == 6 and all(type(v) is int for v in line)):
            return None
        out.append((line[0], line[1], line[2], line[3], line[4], line[5]))
    return out
