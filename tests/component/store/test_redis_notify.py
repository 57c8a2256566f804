"""The notices of stored replies across hosts (chatd.store.redis_notify), on real Redis servers.

Two :class:`StoredNotices`, as two workers of two hosts would have: one publishes, the other
watches. Checked: a watch returns once Redis confirmed the subscription, so a notice published
after it is received; nothing arrives for a session not watched (or no longer); on one server,
a Sentinel's master and a 3-master Cluster (a PUBLISH on one node reaches a subscriber on any);
and after Redis restarts, the subscriptions are made again and each watched session gets a
notice with seq 0 (read the log: what was published meanwhile was missed), while the
publishes made while it was down are counted lost.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any

import pytest

from chatd.store.redis_notify import StoredNotices, channel, session_of

pytestmark = pytest.mark.timeout(60)


class Heard:
    """The ``on_notice`` calls of one StoredNotices, awaitable."""

    def __init__(self) -> None:
        self.notices: list[tuple[str, int]] = []
        self._changed = asyncio.Event()

    def __call__(self, session: str, seq: int) -> None:
        self.notices.append((session, seq))
        self._changed.set()

    async def until(self, pred: Callable[[list[tuple[str, int]]], bool], within: float) -> None:
        async with asyncio.timeout(within):
            while not pred(self.notices):
                self._changed.clear()
                await self._changed.wait()


def _session() -> str:
    return secrets.token_urlsafe(18)


def test_channel_names_carry_the_session_hash_tag() -> None:
    assert channel("abc") == "chatd:stored:{abc}"
    assert session_of(channel("abc")) == "abc"
    assert session_of("chatd:stored:{}") is None and session_of("other") is None
    assert session_of(None) is None


@pytest.mark.parametrize("kind", ["redis", "redis-cluster", "redis-sentinel"])
def test_a_watcher_gets_the_notices_published_after_its_watch(
    kind: str, request: pytest.FixtureRequest
) -> None:
    fixture = {"redis": "redis_url", "redis-cluster": "redis_cluster_url"}
    url = request.getfixturevalue(fixture.get(kind, "redis_sentinel_url"))

    async def main() -> None:
        publisher, watcher, heard = StoredNotices(url), StoredNotices(url), Heard()
        publisher.start(lambda _s, _q: None)
        watcher.start(heard)
        try:
            # Several sessions: in a Cluster their channels hash to different masters.
            sessions = [_session() for _ in range(6)]
            for s in sessions:
                assert await watcher.watch(s, 5.0)
            other = _session()  # not watched: never heard of
            publisher.publish(other, 1)
            for i, s in enumerate(sessions):
                publisher.publish(s, i + 2)
            # A notice is a hint (the log read after it dedupes): one may come twice (a
            # Cluster broadcasts), none may be missing, none of a session not watched.
            expected = {(s, i + 2) for i, s in enumerate(sessions)}
            await heard.until(lambda got: set(got) >= expected, 5.0)
            assert set(heard.notices) == expected
            # Unwatched: a later notice of it is not handed over.
            watcher.unwatch(sessions[0])
            await asyncio.sleep(0.1)  # the UNSUBSCRIBE goes out
            publisher.publish(sessions[0], 20)
            publisher.publish(sessions[1], 21)
            await heard.until(lambda got: (sessions[1], 21) in got, 5.0)
            await asyncio.sleep(0.2)
            assert (sessions[0], 20) not in heard.notices
            assert publisher.published_total == len(sessions) + 3
            assert watcher.received_total == len(sessions) + 1
            assert publisher.lost_total == 0 and watcher.watched == frozenset(sessions[1:])
        finally:
            await publisher.close()
            await watcher.close()

    asyncio.run(main())


def test_watched_again_at_once_after_an_unwatch(redis_url: str) -> None:
    """unwatch then watch before the UNSUBSCRIBE's answer: the watch returns on the
    confirmation of its own SUBSCRIBE, and a notice published after it is received."""

    async def main() -> None:
        publisher, watcher, heard = StoredNotices(redis_url), StoredNotices(redis_url), Heard()
        publisher.start(lambda _s, _q: None)
        watcher.start(heard)
        try:
            session = _session()
            for seq in range(1, 6):
                assert await watcher.watch(session, 5.0)
                watcher.unwatch(session)
                await asyncio.sleep(0)  # the UNSUBSCRIBE is being sent
                assert await watcher.watch(session, 5.0)
                publisher.publish(session, seq)
                await heard.until(lambda got, seq=seq: (session, seq) in got, 5.0)
                watcher.unwatch(session)
        finally:
            await publisher.close()
            await watcher.close()

    asyncio.run(main())


def test_subscriptions_are_made_again_after_redis_restarts(
    start_redis: Callable[..., Any],
) -> None:
    server = start_redis()

    async def main() -> None:
        publisher = StoredNotices(server.url, backoff=(0.05,))
        watcher = StoredNotices(server.url, timeout=1.0, reconnect=(0.05, 0.1))
        heard = Heard()
        publisher.start(lambda _s, _q: None)
        watcher.start(heard)
        try:
            first, second = _session(), _session()
            assert await watcher.watch(first, 5.0)
            server.kill()
            # Down: a publish is lost (after its retries), a watch is not confirmed in time.
            publisher.publish(first, 3)
            assert not await watcher.watch(second, 0.3)
            await asyncio.sleep(0.5)
            assert publisher.lost_total == 1 and publisher.published_total == 0
            server.start()
            # Back: both sessions subscribed again, each told to read its log (seq 0).
            await heard.until(lambda got: {(first, 0), (second, 0)} <= set(got), 10.0)
            publisher.publish(second, 4)
            await heard.until(lambda got: (second, 4) in got, 5.0)
            assert (first, 3) not in heard.notices
        finally:
            await publisher.close()
            await watcher.close()

    asyncio.run(main())
