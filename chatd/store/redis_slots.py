"""The fleet's LLM slots in Redis: the per-backend cap across every host sharing a Redis store.

Each master grants the slots of its own host (:mod:`chatd.master.slotgrant`); with a Redis store
the hosts' masters share each backend's ``max_parallel`` through Redis (issue #14): a host may
grant only the slots it holds there. A *pool* is one backend (its key, the base URL every host
names it by) and one slot class (chat, embed); in Redis it is one hash (:func:`pool_key`, a
hash tag of its own, so any Cluster node) of each host's holding, need, use, lease end and
last sync's seq. One script (``slots`` in :mod:`chatd.store.redis_lua`), run atomically per
pool, renews the host's lease, drops the hosts whose lease lapsed (a dead host's slots come
back within the lease), and answers how many slots the host holds and may use: the pool's
``max_parallel`` shared max-min fairly over the hosts' needs, never more in all.

A sync carries its master's *seq* (growing): one that reaches Redis after a newer one of the
same host (a slow worker, a retry) changes nothing, so a host's holding never goes back to
what an older sync said while the newer answer is in use.

The master cannot do I/O (:mod:`chatd.master.fleet`), so a worker runs the script for it:
:class:`SlotLeases` is that worker's client, with a connection of its own (not the store's:
no ``WAIT``, and no retry: the master asks again). Its :meth:`SlotLeases.sync` sends every
pool's call in one round trip (one per master in a Cluster); each pool answers or fails on
its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from chatd.errors import StoreError
from chatd.store.redis_conn import RedisConn

PREFIX = "chatd:slots"
"""Pools are ``chatd:slots:{DIGEST}`` (the ACL pattern ``~chatd:slots:*``)."""

ROTATE_MS = 1000
"""Every this many ms the water-filling starts its rounds at another host, so the remainder
of an uneven share (one slot, two hosts that need it) goes to each host in turn."""


def pool_key(kind: str, backend: str) -> str:
    """The pool's hash; its hash tag is a digest (a URL may hold braces)."""
    tag = hashlib.sha1(f"{kind} {backend}".encode()).hexdigest()[:16]
    return f"{PREFIX}:{{{tag}}}"


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

    def __init__(self, url: str, timeout: float = 0.5) -> None:
        self._conn = RedisConn(url, backoff=(), timeout=timeout, max_connections=2)

    async def open(self) -> None:
        """Connect and load the scripts (StoreError when Redis cannot be reached)."""
        await self._conn.open()

    async def close(self) -> None:
        await self._conn.close()

    async def sync(
        self, host: str, ttl: float, seq: int, asks: Sequence[PoolAsk]
    ) -> list[PoolAnswer | StoreError]:
        """Renew ``host``'s lease on every pool of ``asks`` for ``ttl`` seconds and take each
        pool's answer, in order: a :class:`PoolAnswer`, or the StoreError of that pool alone
        (a Cluster node down). ``seq``: this sync's, greater than the host's earlier ones.
        Raises StoreError when Redis cannot be reached at all."""
        if not self._conn.is_open:
            await self._conn.open()
        ttl_ms = max(1, int(ttl * 1000))
        calls = [
            (
                "slots",
                [pool_key(a.kind, a.backend)],
                [host, ttl_ms, a.max_parallel, a.want, a.hold, a.busy, seq, ROTATE_MS],
            )
            for a in asks
        ]
        replies = await self._conn.retrying(lambda: self._conn.pipeline(calls))
        out: list[PoolAnswer | StoreError] = []
        for ask, reply in zip(asks, replies, strict=True):
            if isinstance(reply, Exception):
                out.append(StoreError(f"slot pool {ask.kind} {ask.backend}: {reply}"))
            else:
                out.append(PoolAnswer(*(int(v) for v in reply)))
        return out
