"""The Redis session store: one Redis deployment shared by every worker of every host.

``[sessions] store`` names it (:mod:`chatd.store.redis_topology`): ``redis://`` one server,
``redis+sentinel://`` a master that Sentinels fail over to a replica, ``redis+cluster://`` a
Redis Cluster. Each session is a few keys under one hash tag (one Cluster slot), changed only
by Lua scripts that declare every key they touch, atomically: the key layout and the scripts
are :mod:`chatd.store.redis_lua`, the connection, retries, script loading and WAIT
:mod:`chatd.store.redis_conn`, the group commit :mod:`chatd.store.redis_batch`. This module is
the :class:`~chatd.store.base.Store` on top of them: what each call sends and reads.

Appends: ONE Lua script per append (Centrifugo's ``broker_history_add_stream.lua`` pattern) checks
the session, dedupes, takes the seq with HINCRBY, XADDs, keeps ``ids`` and ``pending`` and
refreshes the TTL of every key, atomically: hosts appending to one session get distinct,
contiguous seqs (contracts 1, 2). Scripts are loaded once and called by EVALSHA (NOSCRIPT after a
restart, a failover or SCRIPT FLUSH reloads them). Group commit: one writer task per store sends
all queued writes as ONE pipeline, one round trip (one per master in a Cluster).

Retries (in :class:`~chatd.store.redis_conn.RedisConn`): transient errors are retried with
jittered backoff, then raise StoreError naming the URL (a retryable error: the client resends).
Retrying is safe for reads and for the write scripts: an append is idempotent per msg_id and
carries a per-request token, so a retry after a lost reply finds its own write and answers as the
first attempt would have (``duplicate=False``); a retried create finds its key. The store also
keeps the token of an append that raised StoreError, and a resend of that message through this
store (the client's, after ``store_unavailable``) reuses it: if the failed attempt was stored
after all (its reply lost, or its WAIT short of replicas), the resend answers ``duplicate=False``
as the first attempt would have, and the worker generates the reply at once instead of after the
lease the first attempt took lapsed.

Expiry is Redis's: each new append (not a duplicate) sets every key's TTL to ``ttl``. An expired
session vanishes at once (``get_session`` gives None, appends fail, reads give ``[]``), so
:meth:`RedisStore.expire` has nothing left to delete and returns 0.

Durability: an append is acknowledged once the master has it, or, with ``min_replicas_acks``
N > 0, once N replicas confirmed it too (``WAIT``; fewer within ``min_replicas_timeout``: a
StoreError, not acknowledged). Replication is asynchronous, so with N = 0 a failover (Sentinel,
Cluster) loses the acknowledged appends the replica had not received yet; with N >= 1 it loses
none as long as the promoted replica is one that confirmed: Sentinel promotes the most
up-to-date replica (for equal ``replica-priority``), which has them; a Cluster's election only
favours it (N = every replica of a master makes it certain). Fewer than N live replicas: no
write is acknowledged (unavailable rather than unsafe). Persistence on each node is Redis's:
with ``appendonly yes`` and ``appendfsync everysec`` (usual) a host crash or power loss loses
about the last second, and so may a Redis process crash (SIGKILL, OOM kill) on a busy disk:
while the last second's fsync is still running Redis holds its AOF writes back (up to 2 s) and
answers meanwhile; ``appendfsync always`` loses none, slower; RDB snapshots alone minutes.
A script's writes reach the AOF and the replicas as one MULTI/EXEC: a replay never holds half
an append. Redis must not evict keys (``maxmemory-policy noeviction``;
:meth:`RedisStore.open` warns). Needs Redis >= 5 (streams); tested with Redis 7.0 (one server,
Sentinel, Cluster) and redis-py 8.2.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
from redis import exceptions as rx

from chatd.errors import SessionGone, StoreError
from chatd.store import redis_lua as lua
from chatd.store.base import (
    LEASE_S,
    Appended,
    Event,
    EventKind,
    Health,
    SessionInfo,
    StoreStats,
    new_owner_id,
)
from chatd.store.redis_batch import Batcher, short
from chatd.store.redis_conn import RedisConn
from chatd.store.redis_topology import Client

_REMEMBERED = 4096  # tokens of failed appends kept for a resend (oldest dropped first)
_HELD_MAX = 1_000_000  # leased messages one release reads per index, at most (~40 MB)


def _event(entry_id: str, f: Mapping[str, Any], session: str = "") -> Event:
    seq, kind = int(entry_id.partition("-")[0]), f["k"]  # the kind was checked when stored
    return Event(seq, kind, f["m"], f["t"], orjson.loads(f["x"]), float(f["ts"]), session)


def _fields(flat: Sequence[str]) -> dict[str, str]:
    """A stream entry's fields as a script returns them (a flat list) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisStore:
    """The :class:`~chatd.store.base.Store` on Redis (see the module docstring).

    ``max_batch`` caps the writes per pipeline; ``backoff`` are the pauses (s) between attempts
    on a transient error (its length is the number of retries); ``timeout`` bounds one connect
    or one reply (s); ``max_connections`` bounds the operations at once (callers beyond wait);
    ``min_replicas_acks``/``min_replicas_timeout`` as in ``[sessions]``.
    """

    def __init__(
        self,
        url: str,
        ttl: int,
        *,
        max_batch: int = 256,
        backoff: Sequence[float] = (0.05, 0.2, 0.5),
        timeout: float = 5.0,
        max_connections: int = 16,
        owner: str | None = None,
        min_replicas_acks: int = 0,
        min_replicas_timeout: float = 1.0,
    ) -> None:
        self.url, self.ttl = url, ttl
        self.owner = owner or new_owner_id()
        self._conn = RedisConn(
            url,
            backoff=backoff,
            timeout=timeout,
            max_connections=max_connections,
            acks=min_replicas_acks,
            acks_timeout=min_replicas_timeout,
        )
        self._layout = lua.Layout(cluster=self._conn.cluster)
        self._batch = Batcher(self._conn, max_batch)
        self._closed = False
        self._tokens = (f"{secrets.token_hex(8)}.{n:x}" for n in itertools.count())
        self._failed: dict[tuple[str, str, bool], str] = {}  # (session, msg_id, user): token
        self.health = Health()

    async def open(self) -> None:
        """Connect, load the scripts, start the writer task (in the running event loop)."""
        if self._conn.is_open or self._closed:
            raise StoreError("the session store was already opened")
        try:
            await self._conn.open()
        except StoreError:
            self._closed = True
            raise
        self._batch.start()

    async def close(self) -> None:
        """Send every write queued so far, then stop the writer and close the connections."""
        if self._closed:
            return
        self._closed = True  # new requests are refused from here on, so the sentinel is last
        await self._batch.stop()
        await self._conn.close()

    # -- writes ---------------------------------------------------------------------------

    async def _write(self, script: str, keys: list[str], args: list[Any], session: str) -> Any:
        if not self._batch.running or self._closed:
            raise StoreError("the session store is not open")
        try:
            result = await self._batch.write(script, keys, args, session)
        except StoreError as exc:
            self.health.failed(exc)
            raise
        self.health.ok()
        return result

    async def create_session(self, owner: str) -> str:
        """Create an empty session with a new id of 128 random bits or more (URL-safe)."""
        if "\0" in owner:  # as the SQLite store: an owner is a token hash, never binary
            raise ValueError("a session owner cannot contain NUL")
        session = self._layout.new_session()
        await self._write("create", lua.keys(session)[:1], [owner, self.ttl], session)
        return session

    async def append_user(
        self, session: str, msg_id: str, text: str, model: str, lease_s: float = LEASE_S
    ) -> Appended:
        """Append a user message leased to this store for ``lease_s`` s; a repeated ``msg_id``
        returns the original seq and changes nothing (contracts 1, 6)."""
        return await self._append(session, msg_id, "user", text, {"model": model}, lease_s)

    async def append_final(
        self, session: str, msg_id: str, kind: EventKind, text: str, meta: Mapping[str, Any]
    ) -> Appended:
        """Append the one reply or final error of ``msg_id`` (contract 2)."""
        if kind not in ("reply", "error"):
            raise ValueError(f"append_final takes 'reply' or 'error', not {kind!r}")
        return await self._append(session, msg_id, kind, text, meta, 0.0)

    async def _append(
        self,
        session: str,
        msg_id: str,
        kind: str,
        text: str,
        meta: Mapping[str, Any],
        lease_s: float,
    ) -> Appended:
        if not self._layout.valid(session):
            raise SessionGone(f"unknown or expired session {short(session)}")
        # Serialized here, so a bad meta fails its caller at once rather than in the batch.
        blob = orjson.dumps(meta if isinstance(meta, dict) else dict(meta)).decode()
        failed = (session, msg_id, kind == "user")
        token = self._failed.pop(failed, None) or next(self._tokens)  # see the module doc
        args = [msg_id, kind, text, blob, self.ttl, token, self.owner, int(lease_s * 1000)]
        keys = [*lua.keys(session), self._layout.index(session)]
        try:
            result: Appended = await self._write("append", keys, [*args, session], session)
        except SessionGone:
            raise
        except StoreError:
            if len(self._failed) >= _REMEMBERED:
                del self._failed[next(iter(self._failed))]
            self._failed[failed] = token
            raise
        return result

    async def claim(self, session: str | None, lease_s: float, limit: int) -> list[Event]:
        """Take up to ``limit`` lapsed leases, in ``session`` or (None) across sessions: the
        lapsed members of every lease index (``due``, read only), then one ``claim`` per
        session found; each claim is one script, so atomic (contract 6)."""
        if limit <= 0:
            return []
        lease_ms = int(lease_s * 1000)
        if session is not None:
            if not self._layout.valid(session):
                return []
            args = [self.owner, lease_ms, limit, session]
            got = await self._write("claim", self._claim_keys(session), args, session)
            events = [_event(i, _fields(f), session) for i, f in got]
        else:
            events = await self._sweep(lease_ms, limit)
        events.sort(key=lambda e: (e.session, e.seq))
        return events

    def _claim_keys(self, session: str) -> list[str]:
        k = lua.keys(session)
        return [k[0], k[1], k[3], k[4], self._layout.index(session)]

    async def _sweep(self, lease_ms: int, limit: int) -> list[Event]:
        calls = [("due", [index], [limit]) for index in self._layout.indexes()]
        dues = await self._read(lambda _r: self._conn.pipeline(calls))
        wanted: dict[str, list[str]] = {}  # session: its candidates, `limit` at most in all
        room = limit
        for due in dues:
            if isinstance(due, Exception):  # one master refused: the others are swept still
                continue
            for member in due[:room]:
                s, _, m = member.partition(" ")  # (only appends of valid sessions index)
                wanted.setdefault(s, []).append(m)
                room -= 1
        claims = [
            self._write("claim", self._claim_keys(s), [self.owner, lease_ms, len(ms), s, *ms], s)
            for s, ms in wanted.items()
        ]
        got = await asyncio.gather(*claims)
        return [
            _event(i, _fields(f), s)
            for s, entries in zip(wanted, got, strict=True)
            for i, f in entries
        ]

    async def renew(self, session: str, msg_ids: Sequence[str], lease_s: float) -> set[str]:
        """Extend this store's leases (contract 6); renewals queued together share the writer's
        pipeline, one round trip."""
        if not msg_ids or not self._layout.valid(session):
            return set()
        keys = [lua.keys(session)[4], self._layout.index(session)]
        args = [self.owner, int(lease_s * 1000), session, *msg_ids]
        got = await self._write("renew", keys, args, session)
        return set(got)

    async def release(self, owner: str) -> int:
        """Make ``owner``'s held leases lapse now (:meth:`chatd.store.base.Store.release`): the
        held members of every lease index (``held``, read only: the index names no owners),
        then one ``release`` per session found, which changes only ``owner``'s leases. Costs
        a call per session with a leased message, whoever's: for a death, not a routine."""
        calls = [("held", [index], [_HELD_MAX]) for index in self._layout.indexes()]
        helds = await self._read(lambda _r: self._conn.pipeline(calls))
        found: dict[str, list[str]] = {}
        for held in helds:
            if isinstance(held, Exception):  # a master refused: the lease there just lapses
                continue
            for member in held:
                s, _, m = member.partition(" ")
                found.setdefault(s, []).append(m)
        releases = [
            self._write("release", [lua.keys(s)[4], self._layout.index(s)], [owner, s, *ms], s)
            for s, ms in found.items()
        ]
        return sum(int(n) for n in await asyncio.gather(*releases))

    async def probe(self) -> None:
        """See :meth:`chatd.store.base.Store.probe`: a key of this store's own on every master
        that holds sessions, with a TTL, through the writer (so WAIT too), so a Redis that
        refuses writes (down, read-only replica, out of memory, a failed AOF write, replicas
        short of ``min_replicas_acks``) fails it."""
        if self._closed:
            raise StoreError("the session store is not open")
        keys = self._layout.probes(self.owner)
        if self._conn.cluster:
            keys = self._one_per_master(keys)
        value = str(time.time())
        await asyncio.gather(*(self._write("probe", [k], [value], "") for k in keys))
        self.health.recovered()

    def _one_per_master(self, keys: list[str]) -> list[str]:
        cluster: Any = self._conn.client()
        try:
            nodes = {cluster.get_node_from_key(k).name: k for k in reversed(keys)}
        except (rx.RedisError, rx.RedisClusterException):  # no slot map: the writes will say
            return keys
        return list(nodes.values())

    async def expire(self) -> int:
        """Redis deletes idle sessions itself (key TTLs): nothing is left to delete; returns 0."""
        if self._closed or not self._conn.is_open:
            raise StoreError("the session store is not open")
        return 0

    # -- reads ----------------------------------------------------------------------------

    async def _read(self, fn: Callable[[Client], Awaitable[Any]]) -> Any:
        """``fn(client)``, one round trip, retried on transient errors. Any: redis-py's reply
        types are loose (``bytes | str | None``...); each caller knows its command's reply."""
        if self._closed:
            raise StoreError("the session store is not open")
        redis = self._conn.client()
        try:
            result = await self._conn.retrying(lambda: fn(redis))
        except StoreError as exc:
            self.health.failed(exc)
            raise
        self.health.ok()
        return result

    async def get_session(self, session: str) -> SessionInfo | None:
        """The session, or None if it never existed or its keys expired (idle > ``ttl`` s)."""
        if not self._layout.valid(session):
            return None
        meta, fields = lua.keys(session)[0], ["owner", "seq", "updated_at"]
        owner, seq, updated = await self._read(lambda r: r.hmget(meta, fields))
        return None if owner is None else SessionInfo(session, owner, int(seq), float(updated))

    async def events_after(self, session: str, after_seq: int) -> list[Event]:
        """Every event with ``seq > after_seq``, in seq order (one XRANGE from the seq id)."""
        if not self._layout.valid(session):
            return []
        key, start = lua.keys(session)[1], f"{max(after_seq, 0) + 1}-0"
        return [_event(i, f) for i, f in await self._read(lambda r: r.xrange(key, start, "+"))]

    async def history(self, session: str, turns: int) -> list[Event]:
        """The last ``turns`` answered user messages, each followed by its reply.

        Reads the log backwards in pages (4 events per turn, then doubling) and pairs in Python:
        a reply follows its user event, so the scan knows whether a user event is answered when
        it reaches it, and stops at ``turns`` pairs. Cost: the events scanned, about the last
        ``turns`` turns plus the errored and unanswered messages among them. A final stored
        before its user event (``early``) makes it scan the whole log, to pair as SQLite does.
        """
        if turns <= 0 or not self._layout.valid(session):
            return []
        meta, key = lua.keys(session)[:2]
        count, top = 4 * turns, "+"

        async def first(r: Client) -> Any:  # the flag and the first page: one round trip
            async with r.pipeline(transaction=False) as pipe:
                pipe.hget(meta, "early")
                pipe.xrevrange(key, top, "-", count)
                return await pipe.execute()

        early, page = await self._read(first)
        replies: dict[str, Event] = {}
        waiting: dict[str, Event] = {}  # users seen before their reply (only when early)
        pairs: list[tuple[Event, Event]] = []
        while True:
            for entry_id, fields in page:
                ev = _event(entry_id, fields)
                if ev.kind == "user":
                    if (reply := replies.get(ev.msg_id)) is not None:
                        pairs.append((ev, reply))
                    else:
                        waiting[ev.msg_id] = ev
                elif ev.kind == "reply":
                    replies[ev.msg_id] = ev
                    if early and (user := waiting.pop(ev.msg_id, None)) is not None:
                        pairs.append((user, ev))
            last = int(page[-1][0].partition("-")[0]) if page else 1
            if len(page) < count or last <= 1 or (not early and len(pairs) >= turns):
                break
            top, count = f"{last - 1}-0", min(count * 2, 4096)
            page = await self._read(lambda r: r.xrevrange(key, top, "-", count))  # noqa: B023
        pairs.sort(key=lambda p: p[0].seq)
        return [ev for pair in pairs[-turns:] for ev in pair]

    async def unanswered(self, session: str) -> list[Event]:
        """The user events that have neither a reply nor a final error yet, in seq order."""
        if not self._layout.valid(session):
            return []
        keys = lua.keys(session)

        async def call(_r: Client) -> Any:
            [entries] = await self._conn.pipeline([("unanswered", [keys[3], keys[1]], [])])
            if isinstance(entries, Exception):  # in the retry, so it ends as a StoreError
                raise entries
            return entries

        return [_event(i, _fields(f)) for i, f in await self._read(call)]

    def statistics(self) -> StoreStats:
        """See :meth:`chatd.store.redis_batch.Batcher.statistics`."""
        return self._batch.statistics()
