"""The number of worker slots at run time: ``chatctl scale N``, SIGTTIN (+1), SIGTTOU (-1).

A scale lasts until the next reload or restart, which apply the configuration's ``workers``
(a reload uses :func:`add_slots` and :func:`remove_last_slot` for that).

* **Up**: bind one more SO_REUSEPORT socket per new slot (it joins our group, on our port;
  the kernel spreads new connections over it from then on) and fork its worker.
* **Down**: retire the highest slots. Its worker drains (stops accepting, finishes its
  replies, closes clients with 1001) and the master closes its own copy of the slot's socket
  at once; the socket itself closes when the draining worker lets go of it. Connections still
  queued on it then are reset, unless ``net.ipv4.tcp_migrate_req`` is 1 (the kernel then
  moves them to the other sockets of the group): the master warns at start when it is 0.
"""

from __future__ import annotations

import logging

from chatd.config import Config
from chatd.master.listeners import bind_slots
from chatd.master.supervision import Slot
from chatd.master.workers import Workers

log = logging.getLogger("chatd.master")

MAX_WORKERS = 256


def add_slots(workers: Workers, count: int, cfg: Config, generation: int) -> list[Slot]:
    """Bind ``count`` more slot sockets on our port; the new slots have no worker yet.

    Raises:
        BindError: the sockets cannot be created.
    """
    existing = [s.listener for s in workers.slots]
    listeners = bind_slots(workers.cfg.server.bind, count, existing=existing)
    first = len(workers.slots) + 1
    new = [
        Slot(id=first + i, listener=sock, cfg=cfg, generation=generation)
        for i, sock in enumerate(listeners)
    ]
    workers.slots.extend(new)
    return new


def remove_last_slot(workers: Workers, why: str, keep: int | None = None) -> None:
    """Retire the highest slot: its workers stop, the master's copy of its socket closes.
    Its open WebSockets move (when handoff is on) to the least loaded worker of the first
    ``keep`` slots (default: all those left): never to a slot the same scale-down closes."""
    slot = workers.slots.pop()
    slot.respawn_at = None
    if slot.incoming is not None:
        workers.abandon(slot.incoming)
    if slot.worker is not None:
        successor = workers.least_loaded(len(workers.slots) if keep is None else keep)
        workers.retire(slot.worker, why, successor=successor)
    slot.listener.close()
    log.info("slot %d closed (%s)", slot.id, why)


def scale_to(workers: Workers, count: int) -> str:
    """Make ``count`` slots, each with a worker; returns a sentence for the caller.

    Raises:
        ValueError: ``count`` is out of range (the message says so).
        BindError: the new sockets cannot be created (nothing changed then).
    """
    if not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"the number of workers must be 1..{MAX_WORKERS}, got {count}")
    before = len(workers.slots)
    if count > before:
        for slot in add_slots(workers, count - before, workers.cfg, workers.generation):
            workers.spawn(slot)
    while len(workers.slots) > count:
        remove_last_slot(workers, f"scaled down to {count}", keep=count)
    if count != before:
        log.info("scaled from %d to %d workers (until the next reload or restart)", before, count)
    return f"{count} workers (was {before}); until the next reload or restart"
