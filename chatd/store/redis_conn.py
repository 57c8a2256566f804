"""The Redis store's connection: the client, the Lua scripts loaded, retries, WAIT.

One job: talk to the Redis of the store URL (one server, a Sentinel-managed master or a Cluster:
:mod:`chatd.store.redis_topology`) for :class:`~chatd.store.redis.RedisStore`, which decides
what to send and what the replies mean. :meth:`RedisConn.open` connects, loads the scripts of
:mod:`chatd.store.redis_lua` (on every master of a Cluster) and warns when Redis may evict keys.
:meth:`RedisConn.retrying` runs an operation again after transient errors (connection errors,
a Cluster that is down or resharding, a Sentinel failover under way), with jittered backoff,
then raises StoreError naming the URL (never its password); only idempotent operations may be
passed to it. At most ``max_connections`` operations run at once; callers beyond wait.

:meth:`RedisConn.pipeline` sends script calls by EVALSHA in one round trip (one per master
in a Cluster, each on its own connection, in parallel), and resends once the ones that met
NOSCRIPT (Redis restarted, or SCRIPT FLUSH) after reloading the scripts, or MOVED (a slot
changed masters) after learning the slot's new master. With ``acks`` (``[sessions]
min_replicas_acks``) > 0, a ``WAIT acks timeout`` follows the writes on each connection that
carried them: WAIT returns once ``acks`` replicas confirmed every write of that connection so
far, or at the timeout with fewer; then the writes of that round trip are reported as a
StoreError, never as done (they may be stored on the master alone, and a resend with the same
ids is safe: the appends are idempotent and a duplicate's reply is itself covered by a WAIT).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis import exceptions as rx
from redis.asyncio.cluster import RedisCluster

from chatd.errors import StoreError
from chatd.store.redis_lua import READS, SCRIPTS
from chatd.store.redis_topology import Client, Topology

log = logging.getLogger("chatd.store.redis")  # the store's logger: its lines name the store
T = TypeVar("T")

Call = tuple[str, list[str], list[Any]]
"""One script call: the script's name in :data:`~chatd.store.redis_lua.SCRIPTS`, KEYS, ARGV."""

_FATAL = (rx.AuthenticationError, rx.AuthorizationError)  # ConnectionErrors a retry won't fix
# Worth another try: connection errors (incl. BusyLoadingError after a restart, a Sentinel's
# "the previous master is now a slave"), and a Cluster electing a master or moving slots.
_TRANSIENT = (
    rx.ConnectionError,
    rx.TimeoutError,
    OSError,
    rx.ClusterDownError,
    rx.TryAgainError,
    rx.SlotNotCoveredError,
    getattr(rx, "RedisClusterUnreachableError", rx.SlotNotCoveredError),  # redis-py >= 8
)
_AGAIN = (rx.NoScriptError, rx.MovedError)  # the call did not run: send it again, once


class RedisConn:
    """A client of the Redis at ``url`` (see the module docstring). ``backoff`` are the pauses
    (s) between attempts on a transient error (its length is the number of retries);
    ``timeout`` bounds one connect or one reply (s), plus ``acks_timeout`` when ``acks``;
    ``max_connections`` bounds the operations at once. ``acks``/``acks_timeout``: the WAIT of
    every write round trip (0: none). ``where`` is the URL fit for errors and logs."""

    def __init__(
        self,
        url: str,
        *,
        backoff: Sequence[float],
        timeout: float,
        max_connections: int,
        acks: int = 0,
        acks_timeout: float = 1.0,
    ) -> None:
        reply_timeout = timeout + (acks_timeout if acks else 0.0)  # a WAIT blocks its reply
        self.topology = Topology(url, timeout=reply_timeout, max_connections=max_connections)
        self.url, self.where = url, self.topology.where
        self.acks, self.acks_timeout = acks, acks_timeout
        self._backoff = tuple(backoff)
        self._gate = asyncio.Semaphore(max_connections)  # pools that do not block: see above
        self._redis: Client | None = None
        self._shas: dict[str, str] = {}

    @property
    def is_open(self) -> bool:
        return self._redis is not None

    @property
    def cluster(self) -> bool:
        return self.topology.cluster

    async def open(self) -> None:
        """Connect and load the scripts; on a StoreError, close again and raise StoreError."""
        self._redis = self.topology.connect()
        try:
            await self.retrying(self.load_scripts)
            await self._check_eviction()
        except StoreError as exc:
            await self.close()
            raise StoreError(f"cannot open the session store: {exc}") from exc

    async def close(self) -> None:
        """Close the connections (idempotent)."""
        if self._redis is not None:
            redis, self._redis = self._redis, None
            await self.topology.close(redis)

    async def load_scripts(self) -> None:
        """(Re)load every script of :data:`~chatd.store.redis_lua.SCRIPTS` (one try); on every
        master of a Cluster (redis-py sends SCRIPT LOAD to each)."""
        for name, body in SCRIPTS.items():
            self._shas[name] = await self.client().script_load(body)

    def sha(self, script: str) -> str:
        """The EVALSHA digest of a loaded script."""
        return self._shas[script]

    async def _check_eviction(self) -> None:
        client = self.client()
        try:
            if isinstance(client, RedisCluster):
                got: Any = await client.config_get(
                    "maxmemory-policy", target_nodes=RedisCluster.PRIMARIES
                )  # {node name: {parameter: value}}
                policies = [v.get("maxmemory-policy", "noeviction") for v in got.values()]
            else:
                got = await client.config_get("maxmemory-policy")
                policies = [got.get("maxmemory-policy", "noeviction")]
        except rx.ResponseError:  # CONFIG is often disabled on managed Redis: cannot tell
            return
        for policy in sorted(set(policies) - {"noeviction"}):
            log.warning(
                "Redis at %s has maxmemory-policy %s: it may evict session keys and lose "
                "stored messages; set maxmemory-policy noeviction",
                *(self.where, policy),
            )

    def client(self) -> Client:
        """The client; StoreError when not open."""
        if self._redis is None:  # (the writer still uses it after close() refused new calls)
            raise StoreError("the session store is not open")
        return self._redis

    async def retrying(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``fn()``, retried after transient errors; every failure as StoreError.

        Only idempotent operations come here: reads, and the write scripts (see
        :mod:`chatd.store.redis`).
        """
        for delay in (*self._backoff, None):
            try:
                async with self._gate:
                    return await fn()
            except StoreError:
                raise
            except (rx.RedisError, rx.RedisClusterException, OSError) as exc:
                if not isinstance(exc, _TRANSIENT) or isinstance(exc, _FATAL):
                    raise StoreError(
                        f"the Redis session store at {self.where} failed: {exc}"
                    ) from exc
                if delay is None:
                    raise StoreError(
                        f"cannot reach the Redis session store at {self.where} ({exc}); "
                        "check that redis-server runs there"
                    ) from exc
            # Jitter: every worker of every host sees the same outage and would retry in step.
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    async def pipeline(self, calls: Sequence[Call], wait: bool = False) -> list[Any]:
        """One round trip per master: an EVALSHA per call, then (``wait`` and ``acks``) a WAIT
        on each connection that carried a write; per-call errors come back as values.

        Not redis-py's Script objects: in a pipeline they cost a SCRIPT EXISTS round trip on
        every execute. NOSCRIPT and MOVED mean the script did not run, so resending is safe.
        """
        replies = await self._send(calls, wait)
        again = [i for i, r in enumerate(replies) if isinstance(r, _AGAIN)]
        if again:
            if any(isinstance(replies[i], rx.NoScriptError) for i in again):
                await self.load_scripts()
            client = self.client()
            for i in again:
                if isinstance(replies[i], rx.MovedError):
                    # A keyed command through the client follows MOVED and patches its slot
                    # map, so the resend below goes to the slot's new master.
                    await client.exists(calls[i][1][0])
            resent = await self._send([calls[i] for i in again], wait)
            for i, reply in zip(again, resent, strict=True):
                replies[i] = reply
        return replies

    def _waits(self, wait: bool, scripts: Sequence[str]) -> bool:
        return wait and self.acks > 0 and any(s not in READS for s in scripts)

    def _lagging(self, got: Any) -> StoreError | None:
        """The error for a WAIT's reply, if fewer than ``acks`` replicas confirmed."""
        if isinstance(got, Exception):
            return StoreError(f"the Redis session store at {self.where}: WAIT failed: {got}")
        if int(got) >= self.acks:
            return None
        return StoreError(
            f"the Redis session store at {self.where}: {int(got)} of {self.acks} replicas "
            f"confirmed the write within {self.acks_timeout:g}s (min_replicas_acks): "
            "it is not acknowledged"
        )

    async def _send(self, calls: Sequence[Call], wait: bool) -> list[Any]:
        client = self.client()
        wait_ms = int(self.acks_timeout * 1000)
        if not isinstance(client, RedisCluster):
            async with client.pipeline(transaction=False) as pipe:
                for script, keys, args in calls:
                    pipe.evalsha(self._shas[script], len(keys), *keys, *args)
                waits = self._waits(wait, [c[0] for c in calls])
                if waits:
                    pipe.execute_command("WAIT", self.acks, wait_ms)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
            if waits:
                lag = self._lagging(replies.pop())
                if lag is not None:
                    replies = [r if isinstance(r, Exception) else lag for r in replies]
            return replies
        return await self._send_cluster(client, calls, wait, wait_ms)

    async def _send_cluster(
        self, cluster: RedisCluster, calls: Sequence[Call], wait: bool, wait_ms: int
    ) -> list[Any]:
        """Each call to its slot's master, explicitly, so that each master's WAIT follows the
        calls it carried on the same connection; redirects are not followed (a call whose
        slot moved comes back MOVED, and :meth:`pipeline` sends it again)."""
        await cluster.initialize()  # a refresh of the slot map asked for after an error
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for i, (_, keys, _) in enumerate(calls):
            node = cluster.get_node_from_key(keys[0])
            if node is None:
                raise rx.SlotNotCoveredError(f"no master serves the slot of {keys[0]}")
            by_node.setdefault(node.name, (node, []))[1].append(i)
        pipe = cluster.pipeline()
        order: list[int] = []  # the call of each queued command; -1 for a WAIT
        for node, numbers in by_node.values():
            for i in numbers:
                script, keys, args = calls[i]
                pipe.execute_command(
                    "EVALSHA", self._shas[script], len(keys), *keys, *args, target_nodes=node
                )
                order.append(i)
            if self._waits(wait, [calls[i][0] for i in numbers]):
                pipe.execute_command("WAIT", self.acks, wait_ms, target_nodes=node)
                order.append(-1)
        got = await pipe.execute(raise_on_error=False, allow_redirections=False)
        replies: list[Any] = [None] * len(calls)
        carried: list[int] = []  # the calls of the node whose WAIT comes next
        for i, reply in zip(order, got, strict=True):
            if i >= 0:
                replies[i] = reply
                carried.append(i)
                continue
            lag = self._lagging(reply)
            for j in carried if lag is not None else ():
                if not isinstance(replies[j], Exception):
                    replies[j] = lag
            carried = []
        return replies
