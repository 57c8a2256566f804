"""Fast takeover: the leases of a worker that died are released at once, not a lease later.

Every acknowledged message is leased to the store of the worker generating it (contract 6 of
``chatd.store.base``); a worker that dies leaves its leases to lapse, after which some worker
claims and generates the messages again. Within a host the master knows better than a lease:
it reaps its dead children. So:

- each worker names its store's owner id right after ``ready`` (``owner {owner}``);
- when the master reaps a worker that did not exit cleanly (any code but 0, or a signal: a
  crash, a kill, a hung worker killed, a drain cut short), it tells one ready worker
  ``owner_gone {owner}``: that worker releases the dead store's leases (``Store.release``)
  and claims the messages at once (:func:`chatd.worker.leases.owner_gone`);
- with no ready worker left (the dead one was the only one, or every other one is starting
  or draining), the owner waits here and goes to the next worker that reports ``owner``
  (its replacement, as soon as it is ready);
- a worker that exits within FORWARD_S of being told (even cleanly: a drain may cut the
  release short) passes what it was told on (it may have exited before releasing them; a
  second release of an owner finds nothing). Later, the leases have lapsed by themselves.

Why only once reaped: releasing the leases of a live worker would let a second worker
generate its messages while it still does. A reaped process is certainly dead, and so is its
store (it is per process): nothing of it renews or answers any more. A clean exit (code 0)
comes from a drain, which hands its unanswered messages' leases back itself
(``chatd.worker.closing``): a release would find none, and with Redis it costs a read of every
lease index, so it is skipped. A worker that dies before it reported its owner was never
ready: it served nothing and holds no lease. When the daemon stops (``Workers.replacing``
off), nothing is released: no worker would be left to generate the messages; the next start's
sweeps, or another host's, take them a lease later.

Runs in the master's single-threaded loop; the handlers return at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from chatd.master.workers import Worker, Workers
from chatd.proto import control as proto

log = logging.getLogger("chatd.master")

FORWARD_S = 10.0
"""Seconds an ``owner_gone`` order is passed on if its worker exits: longer than a lease
(``chatd.store.base.LEASE_S``, 2 s), after which the sweeps take the messages anyway."""
MAX_WAITING = 256
"""Dead owners kept for a worker to come, and per worker told (the oldest dropped beyond:
their leases then lapse by themselves); more than a daemon's workers dying while none is
ready is a crash loop."""


class Takeover:
    """The owners of the workers' stores, and the ``owner_gone`` orders (module docstring).

    Registers its handler of ``owner`` and its exit hook in ``workers``.
    """

    def __init__(self, workers: Workers) -> None:
        self.workers = workers
        self.owners: dict[int, str] = {}  # pid -> its store's owner id, reported after ready
        self.waiting: list[tuple[str, str]] = []  # (owner, who died) for the next ready worker
        # pid -> (when, owner, who) it was told are gone: if it exits too, maybe before it
        # released them, they go on to another worker (a release is idempotent).
        self.told: dict[int, list[tuple[float, str, str]]] = {}
        workers.handlers[proto.OWNER] = self._owner
        workers.on_exit.append(self._exited)

    def _owner(self, worker: Worker, msg: dict[str, Any]) -> None:
        owner = msg.get("owner")
        if not isinstance(owner, str) or not owner:
            log.warning("worker %d: owner without an owner id: %r", worker.slot, msg)
            return
        self.owners[worker.pid] = owner
        waiting, self.waiting = self.waiting, []
        for gone, who in waiting:
            self._order(gone, who)

    def _exited(self, worker: Worker) -> None:
        owner = self.owners.pop(worker.pid, None)
        told = self.told.pop(worker.pid, [])
        if not self.workers.replacing:
            return
        now = time.monotonic()
        gone = [(o, who) for when, o, who in told if now - when < FORWARD_S]
        if owner is not None and worker.exit_code != 0:
            gone.insert(0, (owner, f"worker {worker.slot} (pid {worker.pid})"))
        for o, who in gone:
            self._order(o, who)

    def _order(self, owner: str, who: str) -> None:
        """Tell the least loaded ready worker to release ``owner``'s leases; or keep it for
        the next worker that is ready."""
        ready = [
            w
            for pid, w in self.workers.by_pid.items()
            if pid in self.owners and w.state == "ready" and not w.detached
        ]
        ready.sort(key=_connections)
        for target in ready:
            if self.workers.tell(target, {proto.T: proto.OWNER_GONE, "owner": owner}):
                told = self.told.setdefault(target.pid, [])
                if len(told) >= MAX_WAITING:
                    told.pop(0)
                told.append((time.monotonic(), owner, who))
                log.info(
                    "%s died: worker %d (pid %d) releases its leases and takes them over",
                    *(who, target.slot, target.pid),
                )
                return
        if len(self.waiting) >= MAX_WAITING:
            self.waiting.pop(0)
        self.waiting.append((owner, who))
        log.info("%s died: its leases are released by the next worker ready", who)


def _connections(worker: Worker) -> int:
    """Its open connections, from its last report (anything else there counts as none)."""
    n = worker.stats.get("connections")
    return n if isinstance(n, int) else 0
