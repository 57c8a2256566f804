"""The fleet's LLM slots in Redis: the per-backend cap across every host sharing a Redis store.

Each master grants the slots of its own host (:mod:`chatd.master.slotgrant`); with a Redis store
the hosts' masters share each backend's ``max_parallel`` through Redis (issue #14): a host may
grant only the slots it holds there. A *pool* is one backend (its key, the base URL every host
names it by) and one slot class (chat, embed); in Redis it is two keys with one hash tag
(:func:`pool_keys`, so one Cluster slot): a hash of each host's holding, need and use, and a
sorted set of each host's lease end. One script (``slots`` in :mod:`chatd.store.redis_lua`),
run atomically per pool, renews the host's lease, drops the hosts whose lease lapsed (a dead
host's slots come back within the lease), and answers how many slots the host holds and may
use: the pool's ``max_parallel`` shared max-min fairly over the hosts' needs, never more in all.

The master cannot do I/O (:mod:`chatd.master.fleet`), so a worker runs the script for it:
:class:`SlotLeases` is that worker's client, with a connection of its own (not the store's:
no ``WAIT``, and a short retry, since the master waits for the answer). Its
:meth:`SlotLeases.sync` sends every pool's call in one round trip (one per master in a
Cluster).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from chatd.errors import StoreError
from chatd.store.redis_conn import RedisConn

PREFIX = "chatd:slots"

BACKOFF = (0.05,)
"""One quick retry: the master gives up on an answer after ``chatd.master.fleet.ANSWER_S``."""


def pool_keys(kind: str, backend: str) -> list[str]:
    """The pool's hash and lease set: one hash tag (a digest: a URL may hold braces)."""
    tag = hashlib.sha1(f"{kind} {backend}".encode()).hexdigest()[:16]
    return [f"{PREFIX}:{{{tag}}}:hosts", f"{PREFIX}:{{{tag}}}:leases"]


@dataclass(frozen=True, slots=True)
class PoolAsk:
    """What a host tells a pool: it needs ``want`` slots (in flight + waiting, at most
    ``max_parallel``), it keeps ``hold`` (it cannot give back fewer: it may be granting that
    many meanwhile), ``busy`` are in use."""

    kind: str
    backend: str
    max_parallel: int
    want: int
    hold: int
    busy: int


@dataclass(frozen=True, slots=True)
class PoolAnswer:
    """The pool's answer: this host holds ``count`` slots and may use ``allowed`` of them
    (``count`` > ``allowed``: it must give back the rest as they come free); the fleet holds
    ``fleet_held``, uses ``fleet_busy`` (each host's as of its last renewal), over ``hosts``;
    ``hungry`` other hosts hold fewer than their share."""

    count: int
    allowed: int
    fleet_held: int
    fleet_busy: int
    hosts: int
    hungry: int


class SlotLeases:
    """A worker's client of the fleet's slot pools (see the module) at the Redis of ``url``."""

    def __init__(self, url: str, timeout: float = 1.0) -> None:
        self._conn = RedisConn(url, backoff=BACKOFF, timeout=timeout, max_connections=2)

    async def open(self) -> None:
        """Connect and load the scripts (StoreError when Redis cannot be reached)."""
        await self._conn.open()

    async def close(self) -> None:
        await self._conn.close()

    async def sync(self, host: str, ttl: float, asks: Sequence[PoolAsk]) -> list[PoolAnswer]:
        """Renew ``host``'s lease on every pool of ``asks`` for ``ttl`` seconds and take the
        pools' answers, in order. Raises StoreError when any pool did not answer: the caller
        then keeps what it knew (its leases lapse at their end unless a later sync renews
        them)."""
        if not self._conn.is_open:
            await self._conn.open()
        ttl_ms = max(1, int(ttl * 1000))
        calls = [
            (
                "slots",
                pool_keys(a.kind, a.backend),
                [host, ttl_ms, a.max_parallel, a.want, a.hold, a.busy],
            )
            for a in asks
        ]
        replies = await self._conn.retrying(lambda: self._conn.pipeline(calls))
        answers = []
        for ask, reply in zip(asks, replies, strict=True):
            if isinstance(reply, Exception):
                raise StoreError(f"slot pool {ask.kind} {ask.backend}: {reply}")
            answers.append(PoolAnswer(*(int(v) for v in reply)))
        return answers
