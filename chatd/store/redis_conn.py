"""The Redis store's connection: one pool, the Lua scripts loaded, retries (see chatd.store.redis).

One job: talk to one Redis server for :class:`~chatd.store.redis.RedisStore`, which decides what
to send and what the replies mean. :meth:`RedisConn.open` connects, loads the scripts of
:mod:`chatd.store.redis_lua` and warns when Redis may evict keys. :meth:`RedisConn.retrying` runs
an operation again after transient connection errors, with jittered backoff, then raises
StoreError naming the URL (never its password); only idempotent operations may be passed to it.
:meth:`RedisConn.pipeline` sends script calls in one round trip by EVALSHA, and resends the ones
that met NOSCRIPT (Redis restarted, or SCRIPT FLUSH) once after reloading the scripts.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from chatd.errors import StoreError
from chatd.store.redis_lua import SCRIPTS

log = logging.getLogger("chatd.store.redis")  # the store's logger: its lines name the store
T = TypeVar("T")

Call = tuple[str, list[str], list[Any]]
"""One script call: the script's name in :data:`~chatd.store.redis_lua.SCRIPTS`, KEYS, ARGV."""

_FATAL = (rx.AuthenticationError, rx.AuthorizationError)  # ConnectionErrors a retry won't fix
_TRANSIENT = (rx.ConnectionError, rx.TimeoutError, OSError)  # incl. BusyLoadingError (restart)


def _redacted(url: str) -> str:
    """The URL without its password, fit for errors and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


class RedisConn:
    """A connection pool to the Redis at ``url`` (see the module docstring). ``backoff`` are the
    pauses (s) between attempts on a transient connection error (its length is the number of
    retries); ``timeout`` bounds one connect or one reply (s); ``max_connections`` is the pool
    size (callers beyond it wait). ``where`` is the URL fit for errors and logs."""

    def __init__(
        self, url: str, *, backoff: Sequence[float], timeout: float, max_connections: int
    ) -> None:
        self.url, self.where = url, _redacted(url)
        self._backoff = tuple(backoff)
        self._pool_args: dict[str, Any] = {
            "max_connections": max_connections,
            "timeout": timeout,  # the wait for a free connection
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "decode_responses": True,
            "retry": Retry(NoBackoff(), 0),  # retries are ours: they know what is safe to repeat
        }
        self._redis: Redis | None = None
        self._shas: dict[str, str] = {}

    @property
    def is_open(self) -> bool:
        return self._redis is not None

    async def open(self) -> None:
        """Connect and load the scripts; on a StoreError, close again and raise StoreError."""
        self._redis = Redis.from_pool(BlockingConnectionPool.from_url(self.url, **self._pool_args))
        try:
            await self.retrying(self.load_scripts)
            await self._check_eviction()
        except StoreError as exc:
            await self._redis.aclose()
            self._redis = None
            raise StoreError(f"cannot open the session store: {exc}") from exc

    async def close(self) -> None:
        """Close the connections (idempotent)."""
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def load_scripts(self) -> None:
        """(Re)load every script of :data:`~chatd.store.redis_lua.SCRIPTS` (one try)."""
        for name, body in SCRIPTS.items():
            self._shas[name] = await self.client().script_load(body)

    def sha(self, script: str) -> str:
        """The EVALSHA digest of a loaded script."""
        return self._shas[script]

    async def _check_eviction(self) -> None:
        try:
            got = await self.client().config_get("maxmemory-policy")
        except rx.ResponseError:  # CONFIG is often disabled on managed Redis: cannot tell
            return
        if got.get("maxmemory-policy", "noeviction") != "noeviction":
            log.warning(
                "Redis at %s has maxmemory-policy %s: it may evict session keys and lose "
                "stored messages; set maxmemory-policy noeviction",
                *(self.where, got["maxmemory-policy"]),
            )

    def client(self) -> Redis:
        """The client; StoreError when not open."""
        if self._redis is None:  # (the writer still uses it after close() refused new calls)
            raise StoreError("the session store is not open")
        return self._redis

    async def retrying(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``fn()``, retried after transient connection errors; every failure as StoreError.

        Only idempotent operations come here: reads, and the write scripts (see
        :mod:`chatd.store.redis`).
        """
        for delay in (*self._backoff, None):
            try:
                return await fn()
            except StoreError:
                raise
            except (rx.RedisError, OSError) as exc:
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

    async def pipeline(self, calls: Sequence[Call], reload: bool = True) -> list[Any]:
        """One round trip: an EVALSHA per call; per-call errors come back as values.

        Not redis-py's Script objects: in a pipeline they cost a SCRIPT EXISTS round trip on
        every execute. NOSCRIPT means the script did not run, so resending is safe.
        """
        async with self.client().pipeline(transaction=False) as pipe:
            for script, keys, args in calls:
                pipe.evalsha(self._shas[script], len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        lost = [i for i, r in enumerate(replies) if isinstance(r, rx.NoScriptError)]
        if lost and reload:
            await self.load_scripts()
            again = await self.pipeline([calls[i] for i in lost], reload=False)
            for i, reply in zip(lost, again, strict=True):
                replies[i] = reply
        return replies
