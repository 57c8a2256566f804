"""The store's health: an outage (a full disk, Redis gone) is seen, and so is the recovery.

Every read and write ends in ``Health.ok`` or ``Health.failed``; an unknown session is an
answer, not a failure; ``probe()`` is a write that touches no session, so a worker can watch
an unavailable store come back without client traffic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from chatd.errors import SessionGone, StoreError
from chatd.store.redis import RedisStore
from chatd.store.sqlite import SqliteStore
from tests.conftest import RedisServer, fill


def test_sqlite_full_disk_is_unavailable_until_space_returns(small_disk: Path) -> None:
    async def main() -> None:
        store = SqliteStore(str(small_disk / "sessions.db"), ttl=3600)
        await store.open()
        try:
            session = await store.create_session("")
            await store.append_user(session, "m0", "before", "m")
            assert store.health.healthy and store.health.failures_total == 0
            with pytest.raises(SessionGone):
                await store.append_user("no-such-session", "x", "y", "m")
            assert store.health.healthy  # an answer, not a failure
            filler = fill(small_disk)
            with pytest.raises(StoreError):  # the disk fills up within a few writes
                for i in range(1, 2000):
                    await store.append_user(session, f"m{i}", "x" * 2000, "m")
            assert not store.health.healthy
            assert store.health.failures_total >= 1
            assert "full" in store.health.last_error.lower()
            filler.unlink()
            await store.probe()
            assert store.health.healthy
            await store.append_user(session, "after", "after", "m")  # writes again
        finally:
            await store.close()

    asyncio.run(main())


def test_redis_down_is_unavailable_and_the_probe_sees_it_back(
    start_redis: Callable[..., RedisServer],
) -> None:
    server = start_redis()

    async def main() -> None:
        store = RedisStore(server.url, ttl=3600, backoff=(0.05,), timeout=1.0)
        await store.open()
        try:
            session = await store.create_session("")
            await store.append_user(session, "m0", "before", "m")
            await store.probe()
            assert store.health.healthy
            server.kill()
            with pytest.raises(StoreError):
                await store.append_user(session, "m1", "during", "m")
            assert not store.health.healthy and store.health.failures_total >= 1
            with pytest.raises(StoreError):
                await store.probe()
            server.start()
            await store.probe()
            assert store.health.healthy
            # Writes again (what the SIGKILLed server had not yet written to its AOF may be
            # gone: appendfsync everysec; the session itself was created long before).
            assert not (await store.append_user(session, "m1", "during", "m")).duplicate
        finally:
            await store.close()

    asyncio.run(main())
