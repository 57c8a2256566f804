"""Session stores behind one interface (:class:`~chatd.store.base.Store`).

:func:`open_store` picks the implementation from ``[sessions] store``. It only builds the object:
the worker calls ``await store.open()`` after the fork, in its own event loop.
"""

from __future__ import annotations

from chatd.config import SessionsConfig
from chatd.errors import StoreError
from chatd.store.base import Appended, Event, EventKind, SessionInfo, Store, StoreStats
from chatd.store.sqlite import SqliteStore

__all__ = [
    "Appended",
    "Event",
    "EventKind",
    "SessionInfo",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreStats",
    "open_store",
]


def open_store(cfg: SessionsConfig) -> Store:
    """Build the (unopened) store named by ``cfg.store``; its ``open()`` is the caller's.

    ``sqlite:///ABS/PATH`` and ``sqlite:rel/path`` give a :class:`SqliteStore` (a relative path
    is relative to the working directory). ``redis://HOST:PORT/DB``, ``redis+sentinel://...``
    and ``redis+cluster://...`` (``rediss`` for TLS) give a
    :class:`~chatd.store.redis.RedisStore`, with ``min_replicas_acks``.

    Raises:
        StoreError: the URL names a store this build does not provide, or asks SQLite for
            replicas (``min_replicas_acks``).
    """
    path = cfg.sqlite_path
    if path is not None:
        if not path:
            raise StoreError(f"sessions.store: {cfg.store!r} names no SQLite file")
        if cfg.min_replicas_acks:  # the config check says it too; --store may bypass it
            raise StoreError("sessions.min_replicas_acks needs a Redis store")
        return SqliteStore(path, cfg.ttl)
    if cfg.store.startswith(("redis://", "rediss://", "redis+", "rediss+")):
        # Imported here, lazily: the ``redis`` client library is needed only by those using it.
        try:
            from chatd.store.redis import RedisStore
        except ImportError as exc:
            raise StoreError(
                f"sessions.store: {cfg.store!r} needs the redis package ({exc}): "
                "pip install 'redis>=5'"
            ) from exc
        return RedisStore(
            cfg.store,
            cfg.ttl,
            min_replicas_acks=cfg.min_replicas_acks,
            min_replicas_timeout=cfg.min_replicas_timeout,
        )
    raise StoreError(f"sessions.store: unsupported store URL {cfg.store!r}")
