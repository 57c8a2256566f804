"""Which Redis a store URL names, and the redis-py client that reaches it (see chatd.store.redis).

One job: turn ``[sessions] store`` into a connected-on-demand asyncio client of redis-py, whose
own classes do the topology work (nothing of it is written here):

- ``redis://``, ``rediss://``: one server, ``Redis`` on a ``BlockingConnectionPool`` (callers
  beyond ``max_connections`` wait for a free connection).
- ``redis+sentinel://S1,S2,.../MASTER[/DB]``: :class:`redis.asyncio.sentinel.Sentinel` and its
  ``master_for``: each new connection asks the Sentinels (in turn, the last one that answered
  first) where the master is. After a failover the connections to the old master fail (it is
  dead: a connection error; or it is a replica now: ``READONLY``, which redis-py turns into a
  connection error and a disconnect), the store's retry reconnects, and the Sentinels name the
  new master once they promoted it. Until then every attempt fails: the write is refused with
  a retryable StoreError (``store_unavailable``), never acknowledged.
- ``redis+cluster://N1,N2,...``: :class:`redis.asyncio.cluster.RedisCluster`, seeded with
  those nodes; it reads the slot map (CLUSTER SLOTS), sends each command to its slot's master,
  and refreshes the map after a connection error or a ``MOVED`` (its own retries are off: the
  store's retries know what is safe to repeat, see :mod:`chatd.store.redis_conn`).

The URL's ``USER:PASSWORD@`` authenticates to the data nodes (the master and replicas, or every
Cluster node), as for ``redis://``; Sentinels are asked without credentials (a Sentinel with
``requirepass`` is not supported yet).
"""

from __future__ import annotations

from typing import Any, TypeAlias

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from chatd.config_checks import RedisUrl, parse_redis_url, redacted
from chatd.errors import StoreError

__all__ = ["Client", "Topology", "parse", "redacted"]

Client: TypeAlias = "Redis | RedisCluster"
"""What a store talks to: one server's (or Sentinel's master's) client, or a Cluster's."""


def parse(url: str) -> RedisUrl:
    """The parts of a Redis store URL; StoreError (naming it, without its password) if bad."""
    try:
        return parse_redis_url(url)
    except ValueError as exc:
        raise StoreError(f"sessions.store: {redacted(url)!r} is not a Redis URL {exc}") from exc


class Topology:
    """The client of the Redis at ``url`` (:meth:`connect`) and what kind of deployment it is.

    ``timeout`` bounds one connect or one reply (s); ``max_connections`` is the pool size of one
    server, or of each Cluster node. Every client is built with redis-py's own retries off.
    """

    def __init__(self, url: str, *, timeout: float, max_connections: int) -> None:
        self.url, self.where = url, redacted(url)
        self.parts = parse(url)
        self._timeout, self._max = timeout, max_connections
        self._sentinel: Sentinel | None = None

    @property
    def cluster(self) -> bool:
        return self.parts.kind == "cluster"

    def _connection_args(self) -> dict[str, Any]:
        p = self.parts
        return {
            "socket_timeout": self._timeout,
            "socket_connect_timeout": self._timeout,
            "decode_responses": True,
            "username": p.username,
            "password": p.password,
        }

    def connect(self) -> Client:
        """A new client (no I/O yet: it connects on first use)."""
        no_retry = Retry(NoBackoff(), 0)  # retries are the store's: it knows what is safe
        p = self.parts
        if p.kind == "single":
            pool = BlockingConnectionPool.from_url(
                self.url,
                max_connections=self._max,
                timeout=self._timeout,  # the wait for a free connection
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                decode_responses=True,
                retry=no_retry,
            )
            return Redis.from_pool(pool)
        args = self._connection_args()
        if p.kind == "sentinel":
            asking = {
                "socket_timeout": self._timeout,
                "socket_connect_timeout": self._timeout,
                "decode_responses": True,
                "ssl": p.tls,
            }
            self._sentinel = Sentinel(list(p.hosts), sentinel_kwargs=asking)
            client: Redis = self._sentinel.master_for(
                p.master, db=p.db, ssl=p.tls, retry=no_retry, max_connections=self._max, **args
            )
            return client
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in p.hosts],
            ssl=p.tls,
            retry=no_retry,
            max_connections=self._max,
            **args,
        )

    async def close(self, client: Client) -> None:
        """Close ``client`` and, for Sentinel, the connections to the Sentinels."""
        try:
            await client.aclose()
        finally:
            if self._sentinel is not None:
                sentinel, self._sentinel = self._sentinel, None
                await sentinel.aclose()
