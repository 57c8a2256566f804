"""The Redis session store: one Redis shared by every worker of every host (``redis://``).

A session is four keys sharing the hash tag ``{S}`` (S = the session id), so in a Redis Cluster
they sit on one slot and one Lua script may touch them all:

- ``chatd:s:{S}:meta`` hash: ``owner``, ``seq`` (the last seq given), ``created_at``,
  ``updated_at`` (Redis server time: one clock for all hosts), ``early`` (finals stored before
  their user event: never by the worker; when set, ``history`` scans the whole log);
- ``chatd:s:{S}:log`` stream: one entry per event, its id ``<seq>-0``; fields ``k`` kind,
  ``m`` msg_id, ``t`` text, ``x`` meta (JSON), ``ts``;
- ``chatd:s:{S}:ids`` hash: ``u:<msg_id>`` / ``f:<msg_id>`` -> ``<seq>:<token>`` (the dedupe);
- ``chatd:s:{S}:pending`` sorted set: the unanswered user msg_ids, scored by seq;
- ``chatd:s:{S}:lease`` hash: msg_id -> ``owner:until_ms:fence``, the owner lease of each
  unanswered message (contract 6; ``owner`` is the store's id, ``until_ms`` Redis server time,
  ``fence`` counts the claims). Plus one global key, ``chatd:leases``, a sorted set of
  ``"S msg_id"`` scored by ``until_ms``: the sweep finds lapsed leases across sessions in one
  ZRANGEBYSCORE instead of visiting every session.

Leases: the append script leases a new user message to the appending store and, for a final,
deletes the lease (both key and index, atomically with the append). ``claim`` and ``renew`` are
scripts too, so a lease changes hands atomically. The sweep's claim script reaches the session
keys it finds in ``chatd:leases`` without declaring them: fine on one node (what this store
supports), a Cluster would need one index per slot. Index members of expired or answered
sessions are dropped by the claim that meets them.

Appends: ONE Lua script per append (Centrifugo's ``broker_history_add_stream.lua`` pattern) checks
the session, dedupes, takes the seq with HINCRBY, XADDs, keeps ``ids`` and ``pending`` and
refreshes the TTL of every key, atomically: hosts appending to one session get distinct,
contiguous seqs (contracts 1, 2). Scripts are loaded once and called by EVALSHA (NOSCRIPT after a
restart or SCRIPT FLUSH reloads them). Group commit: one writer task per store sends all queued
appends as ONE pipeline, one round trip; the next batch gathers while it is in flight.

A stream, not a list: XADD with an explicit id refuses one not above the top, so Redis itself
guards the seq order (as the SQLite trigger does), and XRANGE finds "seq > N" by id in
O(log n + m) where LRANGE walks an index, O(n), which a trim of the log would also invalidate.

Retries: transient connection errors are retried with jittered backoff, then raise StoreError
naming the URL. Retrying is safe for reads and for both write scripts: an append is idempotent
per msg_id and carries a per-request token, so a retry after a lost reply finds its own write and
answers as the first attempt would have (``duplicate=False``); a retried create finds its key.

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
import logging
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from chatd.errors import StoreError
from chatd.store.base import (
    LEASE_S,
    Appended,
    Event,
    EventKind,
    SessionInfo,
    StoreStats,
    new_owner_id,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# (script name: "append", "create", "claim", "claim_any" or "renew", KEYS, ARGV, the
# caller's future, the session id)
_Request = tuple[str, list[str], list[str | int], asyncio.Future[Any], str]
_RESERVOIR = 4096  # commit latency samples kept (uniform over all commits since open)
_SESSION = re.compile(r"[A-Za-z0-9_-]{1,64}")  # anything else was not made by create_session
_FATAL = (rx.AuthenticationError, rx.AuthorizationError)  # ConnectionErrors a retry won't fix
_TRANSIENT = (rx.ConnectionError, rx.TimeoutError, OSError)  # incl. BusyLoadingError (restart)

_INDEX = "chatd:leases"
_NOW_MS = "local t = redis.call('TIME') local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)"
_LEASE_OF = """local function lease_of(v)  -- owner, until_ms, fence of a lease value (or nil)
  if not v then return nil, 0, 0 end
  local o, u, f = string.match(v, '^(.*):(%d+):(%d+)$')
  return o, tonumber(u), tonumber(f)
end"""
_NOW = "local t = redis.call('TIME') local now = t[1] .. '.' .. string.format('%06d', t[2])"
_CREATE = f"""-- KEYS: meta. ARGV: owner, ttl
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end  -- a retried create: already done
{_NOW}
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'seq', 0, 'created_at', now, 'updated_at', now)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1"""
_APPEND = f"""-- KEYS: meta, log, ids, pending, lease, the lease index.
-- ARGV: msg_id, kind, text, meta, ttl, token, owner, lease_ms, session.
-- Returns {{seq, duplicate}}; seq 0: the session is unknown or expired.
if redis.call('EXISTS', KEYS[1]) == 0 then return {{0, 0}} end
local user = ARGV[2] == 'user'
local field = (user and 'u:' or 'f:') .. ARGV[1]
local old = redis.call('HGET', KEYS[3], field)
if old then  -- stored already; by this very request if the token matches (a retry)
  local sep = string.find(old, ':', 1, true)
  return {{tonumber(string.sub(old, 1, sep - 1)), string.sub(old, sep + 1) == ARGV[6] and 0 or 1}}
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
{_NOW}
redis.call('XADD', KEYS[2], seq .. '-0', 'k', ARGV[2], 'm', ARGV[1], 't', ARGV[3], 'x', ARGV[4],
           'ts', now)
redis.call('HSET', KEYS[3], field, seq .. ':' .. ARGV[6])
redis.call('HSET', KEYS[1], 'updated_at', now)
local member = ARGV[9] .. ' ' .. ARGV[1]
if user then
  if redis.call('HEXISTS', KEYS[3], 'f:' .. ARGV[1]) == 0 then
    redis.call('ZADD', KEYS[4], seq, ARGV[1])
    {_NOW_MS}
    local untl = now_ms + tonumber(ARGV[8])  -- leased to the appender (contract 6)
    redis.call('HSET', KEYS[5], ARGV[1], ARGV[7] .. ':' .. untl .. ':1')
    redis.call('ZADD', KEYS[6], untl, member)
  end
else
  if redis.call('ZREM', KEYS[4], ARGV[1]) == 0 then  -- no user event yet: a final first
    redis.call('HINCRBY', KEYS[1], 'early', 1)
  end
  redis.call('HDEL', KEYS[5], ARGV[1])  -- answered: the lease ends
  redis.call('ZREM', KEYS[6], member)
end
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
return {{seq, 0}}"""
_UNANSWERED = """-- KEYS: pending, log. Returns the pending user events as XRANGE entries.
local out = {}
local pending = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 2, #pending, 2 do
  local got = redis.call('XRANGE', KEYS[2], pending[i] .. '-0', pending[i] .. '-0')
  if got[1] then out[#out + 1] = got[1] end
end
return out"""
_CLAIM = f"""-- KEYS: meta, log, pending, lease, the lease index.
-- ARGV: owner, lease_ms, limit, session.
-- Claims the lapsed (or missing) leases of the session's unanswered messages; returns their
-- user events as XRANGE entries.
{_LEASE_OF}
if redis.call('EXISTS', KEYS[1]) == 0 then return {{}} end
{_NOW_MS}
local out, limit = {{}}, tonumber(ARGV[3])
local pending = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
for i = 1, #pending, 2 do
  if #out >= limit then break end
  local m = pending[i]
  local _, untl, fence = lease_of(redis.call('HGET', KEYS[4], m))
  if untl < now_ms then
    local got = redis.call('XRANGE', KEYS[2], pending[i + 1] .. '-0', pending[i + 1] .. '-0')
    if got[1] then
      local new = now_ms + tonumber(ARGV[2])
      redis.call('HSET', KEYS[4], m, ARGV[1] .. ':' .. new .. ':' .. (fence + 1))
      redis.call('ZADD', KEYS[5], new, ARGV[4] .. ' ' .. m)
      out[#out + 1] = got[1]
    end
  end
end
return out"""
_CLAIM_ANY = f"""-- KEYS: the lease index. ARGV: owner, lease_ms, limit.
-- The sweep: claims lapsed leases across sessions; returns {{session, XRANGE entry}} pairs.
{_LEASE_OF}
{_NOW_MS}
local out, limit = {{}}, tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms - 1, 'LIMIT', 0, 4 * limit)
for _, member in ipairs(due) do
  if #out >= limit then break end
  local sp = string.find(member, ' ', 1, true)
  local s, m = string.sub(member, 1, sp - 1), string.sub(member, sp + 1)
  local prefix = 'chatd:s:{{' .. s .. '}}:'
  local seq = redis.call('ZSCORE', prefix .. 'pending', m)
  local got = seq and redis.call('XRANGE', prefix .. 'log', seq .. '-0', seq .. '-0') or {{}}
  if not got[1] then
    redis.call('ZREM', KEYS[1], member)  -- answered, or the session expired
  else
    local _, untl, fence = lease_of(redis.call('HGET', prefix .. 'lease', m))
    if untl < now_ms then
      local new = now_ms + tonumber(ARGV[2])
      redis.call('HSET', prefix .. 'lease', m, ARGV[1] .. ':' .. new .. ':' .. (fence + 1))
      redis.call('ZADD', KEYS[1], new, member)
      out[#out + 1] = {{s, got[1]}}
    else
      redis.call('ZADD', KEYS[1], untl, member)  -- the index lagged a renewal: repair it
    end
  end
end
return out"""
_RENEW = f"""-- KEYS: lease, the lease index. ARGV: owner, lease_ms, session, msg_id...
-- Extends the caller's leases; returns the msg_ids it still held.
{_LEASE_OF}
{_NOW_MS}
local out, new = {{}}, now_ms + tonumber(ARGV[2])
for i = 4, #ARGV do
  local owner, _, fence = lease_of(redis.call('HGET', KEYS[1], ARGV[i]))
  if owner == ARGV[1] then
    redis.call('HSET', KEYS[1], ARGV[i], owner .. ':' .. new .. ':' .. fence)
    redis.call('ZADD', KEYS[2], new, ARGV[3] .. ' ' .. ARGV[i])
    out[#out + 1] = ARGV[i]
  end
end
return out"""
_SCRIPTS = {
    "create": _CREATE,
    "append": _APPEND,
    "unanswered": _UNANSWERED,
    "claim": _CLAIM,
    "claim_any": _CLAIM_ANY,
    "renew": _RENEW,
}


def _keys(session: str) -> list[str]:
    """meta, log, ids, pending, lease: one hash tag, so one Cluster slot."""
    prefix = f"chatd:s:{{{session}}}:"
    return [prefix + k for k in ("meta", "log", "ids", "pending", "lease")]


def _short(session: str) -> str:
    # A session id is a capability (it resumes the session): errors and logs show a prefix only.
    return session[:6] + "…"


def _redacted(url: str) -> str:
    """The URL without its password, fit for errors and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


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
        self.url, self.ttl, self._where = url, ttl, _redacted(url)
        self.owner = owner or new_owner_id()
        self._max_batch, self._backoff = max_batch, tuple(backoff)
        self._pool_args: dict[str, Any] = {
            "max_connections": max_connections,
            "timeout": timeout,  # the wait for a free connection
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "decode_responses": True,
            "retry": Retry(NoBackoff(), 0),  # retries are ours: they know what is safe to repeat
        }
        self._redis: Redis | None = None
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._shas: dict[str, str] = {}
        self._tokens = (f"{secrets.token_hex(8)}.{n:x}" for n in itertools.count())
        self._commits = self._rows = self._n_samples = 0
        self._samples: list[float] = []

    async def open(self) -> None:
        """Connect, load the scripts, start the writer task (in the running event loop)."""
        if self._redis is not None or self._closed:
            raise StoreError("the session store was already opened")
        self._redis = Redis.from_pool(BlockingConnectionPool.from_url(self.url, **self._pool_args))
        try:
            await self._retrying(self._load_scripts)
            await self._check_eviction()
        except StoreError as exc:
            await self._redis.aclose()
            self._redis, self._closed = None, True
            raise StoreError(f"cannot open the session store: {exc}") from exc
        self._writer = asyncio.create_task(self._write_loop(), name="chatd-store-write")

    async def close(self) -> None:
        """Send every append queued so far, then stop the writer and close the connections."""
        if self._closed:
            return
        self._closed = True  # new requests are refused from here on, so the sentinel is last
        if self._writer is not None:
            self._queue.put_nowait(None)
            await self._writer
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def _load_scripts(self) -> None:
        for name, body in _SCRIPTS.items():
            self._shas[name] = await self._client().script_load(body)

    async def _check_eviction(self) -> None:
        try:
            got = await self._client().config_get("maxmemory-policy")
        except rx.ResponseError:  # CONFIG is often disabled on managed Redis: cannot tell
            return
        if got.get("maxmemory-policy", "noeviction") != "noeviction":
            log.warning(
                "Redis at %s has maxmemory-policy %s: it may evict session keys and lose "
                "stored messages; set maxmemory-policy noeviction",
                *(self._where, got["maxmemory-policy"]),
            )

    def _client(self) -> Redis:
        if self._redis is None:  # (the writer still uses it after close() refused new calls)
            raise StoreError("the session store is not open")
        return self._redis

    async def _retrying(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``fn()``, retried after transient connection errors; every failure as StoreError.

        Only idempotent operations come here: reads, and the write scripts (module docstring).
        """
        for delay in (*self._backoff, None):
            try:
                return await fn()
            except StoreError:
                raise
            except (rx.RedisError, OSError) as exc:
                if not isinstance(exc, _TRANSIENT) or isinstance(exc, _FATAL):
                    raise StoreError(
                        f"the Redis session store at {self._where} failed: {exc}"
                    ) from exc
                if delay is None:
                    raise StoreError(
                        f"cannot reach the Redis session store at {self._where} ({exc}); "
                        "check that redis-server runs there"
                    ) from exc
            # Jitter: every worker of every host sees the same outage and would retry in step.
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    # -- writes ---------------------------------------------------------------------------

    async def _write(self, script: str, keys: list[str], args: list[Any], session: str) -> Any:
        if self._writer is None or self._closed:
            raise StoreError("the session store is not open")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((script, keys, args, fut, session))
        return await fut

    async def create_session(self, owner: str) -> str:
        """Create an empty session with a new id of 128 random bits (22 URL-safe characters)."""
        if "\0" in owner:  # as the SQLite store: an owner is a token hash, never binary
            raise ValueError("a session owner cannot contain NUL")
        session = secrets.token_urlsafe(16)
        await self._write("create", _keys(session)[:1], [owner, self.ttl], session)
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
            raise StoreError(f"unknown or expired session {_short(session)}")
        # Serialized here, so a bad meta fails its caller at once rather than in the batch.
        blob = orjson.dumps(meta if isinstance(meta, dict) else dict(meta)).decode()
        args = [msg_id, kind, text, blob, self.ttl, next(self._tokens)]
        args += [self.owner, int(lease_s * 1000), session]
        keys = [*_keys(session), _INDEX]
        result: Appended = await self._write("append", keys, args, session)
        return result

    async def claim(self, session: str | None, lease_s: float, limit: int) -> list[Event]:
        """Take up to ``limit`` lapsed leases, in ``session`` or (None) across sessions through
        ``chatd:leases``; one script, so atomic (contract 6)."""
        if limit <= 0:
            return []
        lease_ms = int(lease_s * 1000)
        if session is None:
            got = await self._write("claim_any", [_INDEX], [self.owner, lease_ms, limit], "")
            events = [_event(i, _fields(f), s) for s, (i, f) in got]
        else:
            if not _SESSION.fullmatch(session):
                return []
            k = _keys(session)
            keys = [k[0], k[1], k[3], k[4], _INDEX]
            got = await self._write("claim", keys, [self.owner, lease_ms, limit, session], session)
            events = [_event(i, _fields(f), session) for i, f in got]
        events.sort(key=lambda e: (e.session, e.seq))
        return events

    async def renew(self, session: str, msg_ids: Sequence[str], lease_s: float) -> set[str]:
        """Extend this store's leases (contract 6); renewals queued together share the writer's
        pipeline, one round trip."""
        if not msg_ids or not _SESSION.fullmatch(session):
            return set()
        keys = [_keys(session)[4], _INDEX]
        args = [self.owner, int(lease_s * 1000), session, *msg_ids]
        got = await self._write("renew", keys, args, session)
        return set(got)

    async def expire(self) -> int:
        """Redis deletes idle sessions itself (key TTLs): nothing is left to delete; returns 0."""
        if self._closed or self._redis is None:
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
            replies: list[Any] = await self._retrying(lambda: self._pipeline(batch))
        except Exception as exc:  # StoreError, or a bug: fail the batch, never the writer
            replies = [exc] * len(batch)
        rows = wrote = 0
        for (script, _, _, fut, session), reply in zip(batch, replies, strict=True):
            result: Any
            if isinstance(reply, BaseException):  # one instance per caller: tracebacks differ
                why = reply if isinstance(reply, StoreError) else f"{self._where} failed: {reply}"
                result = StoreError(f"{why}")
                result.__cause__ = reply
            elif script == "create":
                result, wrote = session, 1
            elif script != "append":  # claim, claim_any, renew: the script's reply as it is
                result = reply
            elif reply[0] == 0:
                result = StoreError(f"unknown or expired session {_short(session)}")
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

    async def _pipeline(self, batch: list[_Request], reload: bool = True) -> list[Any]:
        """One round trip: an EVALSHA per request; per-request errors come back as values.

        Not redis-py's Script objects: in a pipeline they cost a SCRIPT EXISTS round trip on
        every execute. NOSCRIPT means the script did not run, so resending is safe.
        """
        async with self._client().pipeline(transaction=False) as pipe:
            for script, keys, args, _, _ in batch:
                pipe.evalsha(self._shas[script], len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        lost = [i for i, r in enumerate(replies) if isinstance(r, rx.NoScriptError)]
        if lost and reload:
            await self._load_scripts()
            again = await self._pipeline([batch[i] for i in lost], reload=False)
            for i, reply in zip(lost, again, strict=True):
                replies[i] = reply
        return replies

    # -- reads ----------------------------------------------------------------------------

    async def _read(self, fn: Callable[[Redis], Awaitable[Any]]) -> Any:
        """``fn(client)``, one round trip, retried on transient errors. Any: redis-py's reply
        types are loose (``bytes | str | None``...); each caller knows its command's reply."""
        if self._closed:
            raise StoreError("the session store is not open")
        redis = self._client()
        return await self._retrying(lambda: fn(redis))

    async def get_session(self, session: str) -> SessionInfo | None:
        """The session, or None if it never existed or its keys expired (idle > ``ttl`` s)."""
        if not _SESSION.fullmatch(session):
            return None
        meta, fields = _keys(session)[0], ["owner", "seq", "updated_at"]
        owner, seq, updated = await self._read(lambda r: r.hmget(meta, fields))
        return None if owner is None else SessionInfo(session, owner, int(seq), float(updated))

    async def events_after(self, session: str, after_seq: int) -> list[Event]:
        """Every event with ``seq > after_seq``, in seq order (one XRANGE from the seq id)."""
        if not _SESSION.fullmatch(session):
            return []
        key, start = _keys(session)[1], f"{max(after_seq, 0) + 1}-0"
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
        meta, key = _keys(session)[:2]
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
        keys = _keys(session)

        async def call(r: Redis) -> Any:
            try:
                return await r.evalsha(self._shas["unanswered"], 2, keys[3], keys[1])
            except rx.NoScriptError:  # Redis restarted or flushed its scripts: it did not run
                await self._load_scripts()
                return await r.evalsha(self._shas["unanswered"], 2, keys[3], keys[1])

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
