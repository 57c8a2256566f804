"""Session stores behind one interface (:class:`~chatd.store.base.Store`).

:func:`open_store` picks the implementation from ``[sessions] store``. It only builds the object:
the worker calls ``await store.open()`` after the fork, in its own event loop. With a Redis
store, :func:`open_notices` gives the notices of stored replies across hosts (pub/sub), and
:func:`open_slot_leases` the client of the fleet's LLM slot pools.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from chatd.config import SessionsConfig
from chatd.errors import StoreError
from chatd.store.base import Appended, Event, EventKind, SessionInfo, Store, StoreStats
from chatd.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from chatd.store.redis_notify import StoredNotices
    from chatd.store.redis_slots import SlotLeases

__all__ = [
    "Appended",
    "Event",
    "EventKind",
    "SessionInfo",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreStats",
    "open_notices",
    "open_slot_leases",
    "open_store",
]

_REDIS = ("redis://", "rediss://", "redis+", "rediss+")


def open_store(cfg: SessionsConfig, writer: tuple[str, str] | None = None) -> Store:
    """Build the (unopened) store named by ``cfg.store``; its ``open()`` is the caller's.

    ``sqlite:///ABS/PATH`` and ``sqlite:rel/path`` give a :class:`SqliteStore` (a relative path
    is relative to the working directory); its writes go through the host writer ``writer``
    (its file and address: :mod:`chatd.store.sqlite_host`) when that writer serves this
    file and ``sqlite_writer`` is on. ``redis://HOST:PORT/DB``, ``redis+sentinel://...``
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
        address = None
        if writer is not None and cfg.sqlite_writer:
            served, address = writer
            if os.path.abspath(served) != os.path.abspath(path):  # a reload moved the file
                address = None
        return SqliteStore(path, cfg.ttl, writer=address)
    if cfg.store.startswith(_REDIS):
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


def open_notices(cfg: SessionsConfig) -> StoredNotices | None:
    """The (unstarted) notices of stored replies across hosts for ``cfg.store``
    (:class:`~chatd.store.redis_notify.StoredNotices`), or None when the store is not Redis
    (SQLite serves one host: its master forwards the notices). Call it after
    :func:`open_store` accepted the URL."""
    if not cfg.store.startswith(_REDIS):
        return None
    from chatd.store.redis_notify import StoredNotices  # lazily, as RedisStore

    return StoredNotices(cfg.store)


def open_slot_leases(cfg: SessionsConfig) -> SlotLeases | None:
    """The (unopened) client of the fleet's LLM slot pools for ``cfg.store``
    (:class:`~chatd.store.redis_slots.SlotLeases`), or None when the store is not Redis (one
    host: its master's cap is the cap). Call it after :func:`open_store` accepted the URL."""
    if not cfg.store.startswith(_REDIS):
        return None
    from chatd.store.redis_slots import SlotLeases  # lazily, as RedisStore

    return SlotLeases(cfg.store)
