"""Notices of stored replies across hosts, over Redis pub/sub: the cross-host live handoff.

Within a host the master forwards a worker's ``stored {session, seq}`` to the workers that
watch the session (:mod:`chatd.worker.handoff`). Hosts sharing a Redis store have no master in
common, so with a Redis store the notice travels through Redis as well, as one
:class:`StoredNotices` per worker:

- :meth:`StoredNotices.publish`: a worker that stored a final event of a session with no client
  of its own PUBLISHes the event's ``seq`` on the session's channel ``chatd:stored:{S}``. Queued,
  never blocking the caller; one task sends what is queued in one round trip (retried on
  transient errors). A notice whose publish keeps failing is dropped and counted
  (``lost_total``): its client gets the reply at its next resume (the client's stall fallback).
- :meth:`StoredNotices.watch`: a worker whose client resumed a session whose reply is generated
  elsewhere SUBSCRIBEs to its channel, and returns once Redis *confirmed* the subscription. The
  watcher reads the log after that, so no final is missed: one stored before the confirmation
  is in that read; one stored after it is published after it (the publisher publishes only once
  its append returned), hence delivered to this subscription.
- :meth:`StoredNotices.unwatch`: its last client of the session left: UNSUBSCRIBE.
- Each message calls ``on_notice(session, seq)``, the same path as the master's forward
  (:meth:`chatd.worker.handoff.Listeners.on_stored`): the watcher reads the log after its
  clients' floors and their outboxes deliver each event once, in seq order, whichever of the two
  notices (the master's, Redis's) comes first, or both.

One pub/sub connection per worker holds its subscriptions; publishes go through a small pool.
When the pub/sub connection fails (Redis restarted, a Sentinel failover, a Cluster node gone) or
stops answering (a PING after PING_S s of silence unanswered for PING_WAIT s: a host gone
without a reset), a new one is made (Sentinel: to the master the Sentinels name), every watched
channel subscribed again, and each confirmation calls ``on_notice(session, 0)``: what was
published meanwhile is read from the log then. A notice is late by an outage, never lost for
good while its session is watched.

Cluster: plain PUBLISH/SUBSCRIBE, the subscriptions on any one node (the next after a failure).
A Cluster takes each PUBLISH to every node: one cluster-bus message per node per notice. Notices
are rare (a final stored while no client of its session is on the worker that generated it: a
client that left mid-reply, a takeover), so that is cheap, and it keeps one connection per
worker whatever the number of masters. Sharded pub/sub (SPUBLISH stays on the slot's shard; the
channel has the session's hash tag, so that of its keys) would need a connection to every
master holding a watched session, and re-subscribing after every slot migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from chatd.store.redis_batch import short
from chatd.store.redis_topology import Client, Topology

log = logging.getLogger("chatd.store.redis")  # the store's logger: its lines name the store

PREFIX = "chatd:stored:"
PING_S = 5.0  # seconds of silence on the pub/sub connection before it is PINGed
PING_WAIT = 5.0  # seconds the PING's answer may take before the connection counts as dead
MAX_QUEUED = 10_000  # notices waiting for their publish (an outage); beyond, the oldest are lost
_ERRORS = (rx.RedisError, rx.RedisClusterException, OSError)

Notice = Callable[[str, int], None]
"""``on_notice(session, seq)``: a final of ``session`` was stored with ``seq``; 0: maybe some
were (a subscription made again after an outage: read the log)."""


def channel(session: str) -> str:
    """The channel of ``session``'s notices, with the session's hash tag (its keys' slot)."""
    return f"{PREFIX}{{{session}}}"


def session_of(name: object) -> str | None:
    """The session of a notice channel's name; None for any other channel."""
    if isinstance(name, str) and name.startswith(PREFIX + "{") and name.endswith("}"):
        return name[len(PREFIX) + 1 : -1] or None
    return None


class StoredNotices:
    """The notices of one worker (see the module docstring). Use from its event loop.

    ``timeout`` bounds one connect or one reply (s); ``backoff`` are the pauses (s) between the
    attempts of a publish (its length is the number of retries); ``reconnect`` the pauses
    between two attempts to make the pub/sub connection again (the last one repeats). The
    counters: ``published_total`` notices published, ``received_total`` received for a watched
    session, ``lost_total`` given up (publish failed, or too many queued).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        backoff: Sequence[float] = (0.05, 0.2, 0.5),
        reconnect: Sequence[float] = (0.1, 0.5, 1.0, 2.0),
    ) -> None:
        self.topology = Topology(url, timeout=timeout, max_connections=4)
        self.where = self.topology.where
        self._timeout = timeout
        self._backoff, self._reconnect = tuple(backoff), tuple(reconnect)
        self._client: Client | None = None
        self._on_notice: Notice = lambda _session, _seq: None
        self._wanted: set[str] = set()  # the sessions watched here
        self._sent: set[str] = set()  # ... whose SUBSCRIBE was sent on the current connection
        self._confirmed: set[str] = set()  # ... and confirmed by Redis
        # UNSUBSCRIBEs sent on the current connection and not confirmed yet, by session: a
        # subscribe confirmation before theirs answers a SUBSCRIBE sent before them.
        self._leaving: dict[str, int] = {}
        self._waiting: dict[str, list[asyncio.Future[bool]]] = {}  # watch() calls, by session
        self._pubsub: PubSub | None = None  # the current pub/sub connection, while it works
        self._listener: asyncio.Task[None] | None = None
        self._syncing: asyncio.Task[None] | None = None
        self._resync = False  # the subscriptions changed while being sent: send again
        self._outgoing: list[tuple[str, int]] = []
        self._publishing: asyncio.Task[None] | None = None
        self._down_since = 0.0  # monotonic(), while the pub/sub connection is lost
        self._node = 0  # Cluster: the node the next pub/sub connection goes to
        self.published_total = 0
        self.received_total = 0
        self.lost_total = 0

    def start(self, on_notice: Notice) -> None:
        """Start listening (in the running loop); ``on_notice`` is called for each notice of a
        watched session (never for another). Connects in the background."""
        if self._client is not None:
            raise RuntimeError("the notices were already started")
        self._on_notice = on_notice
        self._client = self.topology.connect()
        self._listener = asyncio.create_task(self._listen())

    async def close(self) -> None:
        """Publish what is queued (within ``timeout``), then stop and close the connections."""
        if self._client is None:
            return
        if self._publishing is not None:
            with contextlib.suppress(TimeoutError):  # a drain's last notices: worth a wait
                await asyncio.wait_for(asyncio.shield(self._publishing), self._timeout)
        tasks = [t for t in (self._listener, self._syncing, self._publishing) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for fut in [f for waiters in self._waiting.values() for f in waiters]:
            if not fut.done():
                fut.set_result(False)
        client, self._client = self._client, None
        with contextlib.suppress(*_ERRORS):
            await self.topology.close(client)

    # -- publishing -----------------------------------------------------------------------

    def publish(self, session: str, seq: int) -> None:
        """Tell the watchers of ``session`` (on any host) that a final was stored with ``seq``:
        queued and sent by a task, so it never blocks; call it once the append returned."""
        if self._client is None:
            return
        self._outgoing.append((session, seq))
        if len(self._outgoing) > MAX_QUEUED:  # Redis is away: the store fails meanwhile too
            del self._outgoing[0]
            self.lost_total += 1
        if self._publishing is None:
            self._publishing = asyncio.create_task(self._publish_queued())

    async def _publish_queued(self) -> None:
        try:
            while self._outgoing:
                batch, self._outgoing = self._outgoing, []
                try:
                    await self._retrying(lambda: self._send(batch))  # noqa: B023
                except _ERRORS as exc:
                    self.lost_total += len(batch)
                    log.warning(
                        "%d notices of stored replies not published to the Redis at %s (%s): "
                        "their clients on other workers get them when they resume",
                        *(len(batch), self.where, exc),
                    )
                else:
                    self.published_total += len(batch)
        finally:
            self._publishing = None

    async def _send(self, batch: Sequence[tuple[str, int]]) -> None:
        """One PUBLISH per notice: in one pipeline (one server), or in turn (a Cluster, whose
        client routes a PUBLISH to any node: the cluster bus takes it to every other)."""
        client = self._client
        if client is None:
            raise rx.ConnectionError("the notices are closed")
        if isinstance(client, RedisCluster):
            # One after the other: the Cluster client's connection pool raises rather than
            # waits when a burst of concurrent calls exceeds it (notices are rare).
            for s, q in batch:
                await client.publish(channel(s), str(q))
            return
        async with client.pipeline(transaction=False) as pipe:
            for session, seq in batch:
                pipe.publish(channel(session), str(seq))
            await pipe.execute()

    async def _retrying(self, fn: Callable[[], Awaitable[None]]) -> None:
        for delay in (*self._backoff, None):
            try:
                await fn()
                return
            except _ERRORS:
                if delay is None:
                    raise
            # Jitter: every worker of every host sees the same outage (as the store's retries).
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))

    # -- watching -------------------------------------------------------------------------

    async def watch(self, session: str, within: float) -> bool:
        """Subscribe to the notices of ``session``; True once Redis confirmed it (from then on
        every notice published reaches ``on_notice``), False if not within ``within`` s or
        unwatched meanwhile. The session stays watched either way until :meth:`unwatch`: a
        late confirmation calls ``on_notice(session, 0)``."""
        if self._client is None:
            return False
        self._wanted.add(session)
        if session in self._confirmed:
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(session, []).append(fut)
        self._kick()
        try:
            async with asyncio.timeout(within):
                return await fut
        except TimeoutError:
            return False
        finally:
            waiters = self._waiting.get(session)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiting[session]

    def unwatch(self, session: str) -> None:
        """Stop the notices of ``session`` (UNSUBSCRIBE, in the background)."""
        self._wanted.discard(session)
        for fut in self._waiting.pop(session, ()):
            if not fut.done():
                fut.set_result(False)
        if session in self._sent:
            self._kick()

    @property
    def watched(self) -> frozenset[str]:
        """The sessions watched here."""
        return frozenset(self._wanted)

    def _kick(self) -> None:
        """The subscriptions wanted changed: send them (one task at a time)."""
        if self._syncing is None:
            self._syncing = asyncio.create_task(self._sync())
        else:
            self._resync = True

    async def _sync(self) -> None:
        """SUBSCRIBE what is wanted and not sent, UNSUBSCRIBE what is sent and not wanted, on
        the current connection, until nothing changed meanwhile. Without a connection, or when
        it breaks, the listener sends them all once it has a new one."""
        try:
            while True:
                self._resync = False
                pubsub = self._pubsub
                if pubsub is None:
                    return
                add = sorted(self._wanted - self._sent)
                drop = sorted(self._sent - self._wanted)
                try:
                    if add:
                        self._sent.update(add)
                        await pubsub.subscribe(*map(channel, add))
                    if drop:
                        self._sent.difference_update(drop)
                        self._confirmed.difference_update(drop)
                        for session in drop:
                            self._leaving[session] = self._leaving.get(session, 0) + 1
                        await pubsub.unsubscribe(*map(channel, drop))
                except _ERRORS:
                    if pubsub is self._pubsub:  # still the broken one: the listener starts over
                        return
                    self._resync = True
                if not self._resync:
                    return
        finally:
            self._syncing = None

    # -- listening ------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Keep one pub/sub connection, subscribed to every watched channel, and hand each
        message over, until cancelled; a connection lost is made again (after a pause)."""
        failures = 0
        while True:
            pubsub: PubSub | None = None
            node: Redis | None = None
            try:
                pubsub, node = await self._connect()
                self._pubsub = pubsub
                self._sent.clear()
                self._confirmed.clear()
                self._leaving.clear()
                self._kick()  # every watched channel again
                if self._down_since:
                    log.warning(
                        "notices of stored replies: pub/sub connection to the Redis at %s "
                        "made again after %.1fs",
                        *(self.where, time.monotonic() - self._down_since),
                    )
                    self._down_since = 0.0
                failures = 0
                await self._read(pubsub)
            except Exception as exc:  # redis' errors; anything else is a bug, said as one
                if not isinstance(exc, _ERRORS):
                    log.exception("notices of stored replies: the listener failed")
                if not self._down_since:
                    self._down_since = time.monotonic()
                    log.warning(
                        "notices of stored replies: pub/sub connection to the Redis at %s lost "
                        "(%s); replies stored on other hosts reach the clients resumed here "
                        "once it is back",
                        *(self.where, exc),
                    )
            finally:
                self._pubsub = None
                for closing in (pubsub, node):
                    if closing is not None:
                        with contextlib.suppress(Exception):
                            await closing.aclose()
            delay = self._reconnect[min(failures, len(self._reconnect) - 1)]
            failures += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))

    async def _connect(self) -> tuple[PubSub, Redis | None]:
        """A connected pub/sub connection, and (Cluster) the node client to close with it."""
        client = self._client
        if client is None:
            raise rx.ConnectionError("the notices are closed")
        if not isinstance(client, RedisCluster):
            pubsub = client.pubsub()
            await pubsub.connect()  # type: ignore[no-untyped-call]  # (redis-py's)
            return pubsub, None
        await client.initialize()  # the node list (a no-op once known)
        nodes = client.get_nodes()
        where = nodes[self._node % len(nodes)]
        self._node += 1  # the next attempt, after a failure, tries another node
        p = self.topology.parts
        node = Redis(
            host=where.host,
            port=int(where.port),
            username=p.username,
            password=p.password,
            ssl=p.tls,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),  # the reconnects are the listener's
        )
        pubsub = node.pubsub()
        try:
            await pubsub.connect()  # type: ignore[no-untyped-call]  # (redis-py's)
        except BaseException:
            await node.aclose()
            raise
        return pubsub, node

    async def _read(self, pubsub: PubSub) -> None:
        """Hand the messages over until the connection fails (raises); PING it after PING_S
        of silence, and count it dead when the answer takes over PING_WAIT."""
        heard = time.monotonic()
        pinged = 0.0
        while True:
            msg = await pubsub.get_message(timeout=PING_S)
            now = time.monotonic()
            if msg is not None:
                heard, pinged = now, 0.0
                self._handle(msg)
            elif pinged:
                if now - pinged >= PING_WAIT:
                    raise rx.ConnectionError(f"no answer to a PING within {PING_WAIT:g}s")
            elif now - heard >= PING_S:
                await pubsub.ping()
                pinged = now

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        session = session_of(msg.get("channel"))
        if session is None:
            return  # a PONG
        if kind == "unsubscribe":
            left = self._leaving.pop(session, 0) - 1
            if left > 0:
                self._leaving[session] = left
            return
        if session not in self._wanted:
            return  # a late message of a channel unwatched meanwhile
        if kind == "message":
            self.received_total += 1
            data = msg.get("data")
            self._notify(session, int(data) if isinstance(data, str) and data.isdigit() else 0)
        elif kind == "subscribe" and session not in self._leaving:
            self._confirmed.add(session)
            waiters = self._waiting.pop(session, None)
            if waiters:
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(True)  # the watcher reads the log itself now
            else:  # subscribed again (a new connection, or a watch that timed out)
                self._notify(session, 0)

    def _notify(self, session: str, seq: int) -> None:
        try:
            self._on_notice(session, seq)
        except Exception:  # a bug of the callback must not end the listener
            log.exception("notice of %s (seq %d) failed", short(session), seq)
