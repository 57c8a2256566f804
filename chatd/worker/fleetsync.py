"""The fleet's LLM slots, a worker's side: it talks to Redis for its master.

The master shares each backend's cap with the other hosts of a Redis store
(:mod:`chatd.master.fleet`) but does no I/O, so it asks a worker: ``fleet_sync {rid, host,
ttl, pools}`` is run against the pools in Redis (:class:`chatd.store.redis_slots.SlotLeases`,
one round trip, the ``rid`` as the sync's seq) in a task, and answered ``fleet_synced {rid,
ok, pools, error}``, each pool's answer in the order asked (null for a pool that failed on its
own, ``error`` then says why). A sync that fails whole (Redis down, a malformed request) is
answered ``ok: false`` with the reason: the master keeps what it knew and asks again. The
connection is made at the first sync and again after a failure, so a worker that is never
asked holds none.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from chatd.errors import StoreError
from chatd.proto import control as proto
from chatd.store.redis_slots import PoolAsk, SlotLeases

log = logging.getLogger("chatd.worker")


class FleetSync:
    """Answers the master's ``fleet_sync`` (see the module). ``leases``: the client (None: the
    store is not Redis, every sync is refused); ``send`` queues a message for the master."""

    MESSAGES = frozenset((proto.FLEET_SYNC,))

    def __init__(
        self, leases: SlotLeases | None, send: Callable[[Mapping[str, Any]], bool]
    ) -> None:
        self.leases = leases
        self._send = send
        self._tasks: set[asyncio.Task[None]] = set()

    def on_message(self, msg: Mapping[str, Any]) -> None:
        task = asyncio.ensure_future(self._sync(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel the syncs under way and close the connection."""
        for task in self._tasks:
            task.cancel()
        if self.leases is not None:
            await self.leases.close()

    async def _sync(self, msg: Mapping[str, Any]) -> None:
        answer: dict[str, Any] = {proto.T: proto.FLEET_SYNCED, "rid": msg.get("rid")}
        try:
            rid, host, ttl, asks = _parse(msg)
            if self.leases is None:
                raise ValueError("the session store is not Redis: no fleet slots here")
            got = await self.leases.sync(host, ttl, rid, asks)
        except (StoreError, ValueError) as exc:
            answer.update(ok=False, error=str(exc))
        except Exception as exc:  # a bug: the master must hear back all the same
            log.exception("fleet slot sync failed unexpectedly")
            answer.update(ok=False, error=str(exc) or type(exc).__name__)
        else:
            errors = [str(a) for a in got if isinstance(a, StoreError)]
            pools = [
                None
                if isinstance(a, StoreError)
                else [a.count, a.allowed, a.fleet_held, a.fleet_busy, a.hosts, a.hungry]
                for a in got
            ]
            answer.update(ok=True, pools=pools, error=errors[0] if errors else "")
        self._send(answer)


def _parse(msg: Mapping[str, Any]) -> tuple[int, str, float, list[PoolAsk]]:
    """The rid, host, TTL and pools of a ``fleet_sync``; ValueError naming what is wrong."""
    rid, host, ttl, pools = msg.get("rid"), msg.get("host"), msg.get("ttl"), msg.get("pools")
    if type(rid) is not int or rid <= 0:
        raise ValueError(f"fleet_sync without a positive integer rid: {msg!r}")
    if not isinstance(host, str) or not host:
        raise ValueError(f"fleet_sync without a host: {msg!r}")
    if not isinstance(ttl, int | float) or ttl <= 0:
        raise ValueError(f"fleet_sync without a positive ttl: {msg!r}")
    if not isinstance(pools, list):
        raise ValueError(f"fleet_sync without its pools: {msg!r}")
    asks = []
    for line in pools:
        ok = isinstance(line, list) and len(line) == 6
        if not ok or not all(isinstance(v, str) for v in line[:2]):
            raise ValueError(f"fleet_sync: a malformed pool {line!r}")
        if not all(type(v) is int and v >= 0 for v in line[2:]):
            raise ValueError(f"fleet_sync: a malformed pool {line!r}")
        asks.append(PoolAsk(*line))
    return rid, host, float(ttl), asks
