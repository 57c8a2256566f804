"""The Redis session store: one Redis shared by every worker of every host (``redis://``).

Each session is a few keys under one hash tag, changed only by Lua scripts, atomically: the key
layout and the scripts are :mod:`chatd.store.redis_lua`, the connection, its retries and the
script loading :mod:`chatd.store.redis_conn`. This module is the
:class:`~chatd.store.base.Store` on top of them: what each call sends, the group commit, and
what the replies mean.

Appends: ONE Lua script per append (Centrifugo's ``broker_history_add_stream.lua`` pattern) checks
the session, dedupes, takes the seq with HINCRBY, XADDs, keeps ``ids`` and ``pending`` and
refreshes the TTL of every key, atomically: hosts appending to one session get distinct,
contiguous seqs (contracts 1, 2). Scripts are loaded once and called by EVALSHA (NOSCRIPT after a
restart or SCRIPT FLUSH reloads them). Group commit: one writer task per store sends all queued
appends as ONE pipeline, one round trip; the next batch gathers while it is in flight.

Retries (in :class:`~chatd.store.redis_conn.RedisConn`): transient connection errors are
retried with jittered backoff, then raise StoreError naming the URL. Retrying is safe for reads
and for both write scripts: an append is idempotent per msg_id and carries a per-request token,
so a retry after a lost reply finds its own write and answers as the first attempt would have
(``duplicate=False``); a retried create finds its key.

Expiry is Redis's: each new append (not a duplicate) sets every key's TTL to ``ttl``. An expired
session vanishes at once (``get_session`` gives None, appends fail, reads give ``[]``), so
:meth:`RedisStore.expire` has nothing left to delete and returns 0.

Durability is Redis's persistence: with ``appendonly yes`` and ``appendfsync everysec`` (usual)
acknowledged appends survive a crash of Redis, but a host crash or power loss can lose about the
last second of them; ``appendfsync always`` loses none and is slower; RDB snapshots alone can lose
minutes. A script's writes reach the AOF as one MULTI/EXEC: a replay never holds half an append.
Redis must not evict keys (``maxmemory-policy noeviction``; :meth:`RedisStore.open` warns).
Needs Redis >= 5 (streams); one node (the hash tags only prepare for a Cluster).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
from redis import exceptions as rx
from redis.asyncio import Redis

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
from chatd.store.redis_conn import RedisConn

# (script name: "append", "create", "claim", "claim_any" or "renew", KEYS, ARGV, the
# caller's future, the session id)
_Request = tuple[str, list[str], list[str | int], asyncio.Future[Any], str]
_RESERVOIR = 4096  # commit latency samples kept (uniform over all commits since open)
_SESSION = re.compile(r"[A-Za-z0-9_-]{1,64}")  # anything else was not made by create_session


def _short(session: str) -> str:
    # A session id is a capability (it resumes the session): errors and logs show a prefix only.
    return session[:6] + "…"


def _event(entry_id: str, f: Mapping[str, Any], session: str = "") -> Event:
    seq, kind = int(entry_id.partition("-")[0]), f["k"]  # the kind was checked when stored
    return Event(seq, kind, f["m"], f["t"], orjson.loads(f["x"]), float(f["ts"]), session)


def _fields(flat: Sequence[str]) -> dict[str, str]:
    """A stream entry's fields as a script returns them (a flat list) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class RedisStore:
    """The :class:`~chatd.store.base.Store` on a Redis server (see the module docstring).

    ``max_batch`` caps the appends per pipeline; ``backoff`` are the pauses (s) between attempts
    on a transient connection error (its length is the number of retries); ``timeout`` bounds
    one connect or one reply (s); ``max_connections`` is the pool size (callers beyond it wait).
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
    ) -> None:
        self.url, self.ttl = url, ttl
        self.owner = owner or new_owner_id()
        self._max_batch = max_batch
        self._conn = RedisConn(
            url, backoff=backoff, timeout=timeout, max_connections=max_connections
        )
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._tokens = (f"{secrets.token_hex(8)}.{n:x}" for n in itertools.count())
        self._commits = self._rows = self._n_samples = 0
        self._samples: list[float] = []
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
        self._writer = asyncio.create_task(self._write_loop(), name="chatd-store-write")

    async def close(self) -> None:
        """Send every append queued so far, then stop the writer and close the connections."""
        if self._closed:
            return
        self._closed = True  # new requests are refused from here on, so the sentinel is last
        if self._writer is not None:
            self._queue.put_nowait(None)
            await self._writer
        await self._conn.close()

    # -- writes ---------------------------------------------------------------------------

    async def _write(self, script: str, keys: list[str], args: list[Any], session: str) -> Any:
        if self._writer is None or self._closed:
            raise StoreError("the session store is not open")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((script, keys, args, fut, session))
        try:
            result = await fut
        except StoreError as exc:
            self.health.failed(exc)
            raise
        self.health.ok()
        return result

    async def create_session(self, owner: str) -> str:
        """Create an empty session with a new id of 128 random bits (22 URL-safe characters)."""
        if "\0" in owner:  # as the SQLite store: an owner is a token hash, never binary
            raise ValueError("a session owner cannot contain NUL")
        session = secrets.token_urlsafe(16)
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
        if not _SESSION.fullmatch(session):
            raise SessionGone(f"unknown or expired session {_short(session)}")
        # Serialized here, so a bad meta fails its caller at once rather than in the batch.
        blob = orjson.dumps(meta if isinstance(meta, dict) else dict(meta)).decode()
        args = [msg_id, kind, text, blob, self.ttl, next(self._tokens)]
        args += [self.owner, int(lease_s * 1000), session]
        keys = [*lua.keys(session), lua.INDEX]
        result: Appended = await self._write("append", keys, args, session)
        return result

    async def claim(self, session: str | None, lease_s: float, limit: int) -> list[Event]:
        """Take up to ``limit`` lapsed leases, in ``session`` or (None) across sessions through
        ``chatd:leases``; one script, so atomic (contract 6)."""
        if limit <= 0:
            return []
        lease_ms = int(lease_s * 1000)
        if session is None:
            got = await self._write("claim_any", [lua.INDEX], [self.owner, lease_ms, limit], "")
            events = [_event(i, _fields(f), s) for s, (i, f) in got]
        else:
            if not _SESSION.fullmatch(session):
                return []
            k = lua.keys(session)
            keys = [k[0], k[1], k[3], k[4], lua.INDEX]
            got = await self._write("claim", keys, [self.owner, lease_ms, limit, session], session)
            events = [_event(i, _fields(f), session) for i, f in got]
        events.sort(key=lambda e: (e.session, e.seq))
        return events

    async def renew(self, session: str, msg_ids: Sequence[str], lease_s: float) -> set[str]:
        """Extend this store's leases (contract 6); renewals queued together share the writer's
        pipeline, one round trip."""
        if not msg_ids or not _SESSION.fullmatch(session):
            return set()
        keys = [lua.keys(session)[4], lua.INDEX]
        args = [self.owner, int(lease_s * 1000), session, *msg_ids]
        got = await self._write("renew", keys, args, session)
        return set(got)

    async def probe(self) -> None:
        """See :meth:`chatd.store.base.Store.probe`: a key of this store's own, with a TTL, so
        a Redis that refuses writes (down, read-only replica, out of memory, a failed AOF
        write) fails it."""
        key = f"chatd:probe:{self.owner}"
        await self._read(lambda r: r.set(key, str(time.time()), ex=60))
        self.health.recovered()

    async def expire(self) -> int:
        """Redis deletes idle sessions itself (key TTLs): nothing is left to delete; returns 0."""
        if self._closed or not self._conn.is_open:
            raise StoreError("the session store is not open")
        return 0

    async def _write_loop(self) -> None:
        """The writer task: take every queued request (up to ``max_batch``), send them as one
        pipeline, resolve their futures; until the sentinel. A lone request goes at once."""
        running = True
        while running:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                if (item := self._queue.get_nowait()) is None:
                    running = False
                    break
                batch.append(item)
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Request]) -> None:
        start = time.monotonic()
        try:
            calls = [(script, keys, args) for script, keys, args, _, _ in batch]
            replies = await self._conn.retrying(lambda: self._conn.pipeline(calls))
        except Exception as exc:  # StoreError, or a bug: fail the batch, never the writer
            replies = [exc] * len(batch)
        rows = wrote = 0
        where = self._conn.where
        for (script, _, _, fut, session), reply in zip(batch, replies, strict=True):
            result: Any
            if isinstance(reply, BaseException):  # one instance per caller: tracebacks differ
                why = reply if isinstance(reply, StoreError) else f"{where} failed: {reply}"
                result = StoreError(f"{why}")
                result.__cause__ = reply
            elif script == "create":
                result, wrote = session, 1
            elif script != "append":  # claim, claim_any, renew: the script's reply as it is
                result = reply
            elif reply[0] == 0:
                result = SessionGone(f"unknown or expired session {_short(session)}")
            else:
                result = Appended(int(reply[0]), bool(reply[1]))
                rows += not result.duplicate
            if fut.done():  # the caller was cancelled; its write may still have committed
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
        self._record((time.monotonic() - start) * 1000.0, rows, bool(rows or wrote))

    # -- reads ----------------------------------------------------------------------------

    async def _read(self, fn: Callable[[Redis], Awaitable[Any]]) -> Any:
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
        if not _SESSION.fullmatch(session):
            return None
        meta, fields = lua.keys(session)[0], ["owner", "seq", "updated_at"]
        owner, seq, updated = await self._read(lambda r: r.hmget(meta, fields))
        return None if owner is None else SessionInfo(session, owner, int(seq), float(updated))

    async def events_after(self, session: str, after_seq: int) -> list[Event]:
        """Every event with ``seq > after_seq``, in seq order (one XRANGE from the seq id)."""
        if not _SESSION.fullmatch(session):
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
        if turns <= 0 or not _SESSION.fullmatch(session):
            return []
        meta, key = lua.keys(session)[:2]
        count, top = 4 * turns, "+"

        async def first(r: Redis) -> Any:  # the flag and the first page: one round trip
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
        if not _SESSION.fullmatch(session):
            return []
        keys = lua.keys(session)

        async def call(r: Redis) -> Any:
            try:
                return await r.evalsha(self._conn.sha("unanswered"), 2, keys[3], keys[1])
            except rx.NoScriptError:  # Redis restarted or flushed its scripts: it did not run
                await self._conn.load_scripts()
                return await r.evalsha(self._conn.sha("unanswered"), 2, keys[3], keys[1])

        entries = await self._read(call)
        return [_event(i, dict(zip(f[::2], f[1::2], strict=True))) for i, f in entries]

    # -- statistics -----------------------------------------------------------------------

    def _record(self, elapsed_ms: float, rows: int, wrote: bool) -> None:
        self._rows += rows
        self._commits += wrote
        self._n_samples += 1
        if len(self._samples) < _RESERVOIR:
            self._samples.append(elapsed_ms)
        elif (j := random.randrange(self._n_samples)) < _RESERVOIR:  # reservoir sampling (R)
            self._samples[j] = elapsed_ms

    def statistics(self) -> StoreStats:
        """Write round trips that stored something, event rows stored (duplicates excluded),
        round-trip latency (retries included), and ``busy_retries`` 0 (Redis has no lock)."""
        samples = sorted(self._samples)

        def pct(q: float) -> float:
            return samples[min(len(samples) - 1, int(q * len(samples)))] if samples else 0.0

        return StoreStats(self._commits, self._rows, pct(0.50), pct(0.99), 0)
