"""The Redis store's key layout and its Lua scripts (see :mod:`chatd.store.redis`).

Kept apart from the store's connection and batching so each reads on its own: the data here is
what Redis holds and how it changes, each script atomically. :data:`SCRIPTS` maps a name to a
script's body; each body starts with a comment naming its KEYS, its ARGV and what it returns,
which is the contract its caller in :mod:`chatd.store.redis` follows. :func:`keys` gives a
session's keys, :class:`Layout` where its lease index lives and which session ids are valid.

A session is five keys sharing the hash tag ``{S}`` (S = the session id), so in a Redis Cluster
they sit on one slot and one Lua script may touch them all:

- ``chatd:s:{S}:meta`` hash: ``owner``, ``seq`` (the last seq given), ``created_at``,
  ``updated_at`` (Redis server time: one clock for all hosts), ``early`` (finals stored before
  their user event: never by the worker; when set, ``history`` scans the whole log), ``again``
  (requests answered "done already": a retried create, a duplicate append);
- ``chatd:s:{S}:log`` stream: one entry per event, its id ``<seq>-0``; fields ``k`` kind,
  ``m`` msg_id, ``t`` text, ``x`` meta (JSON), ``ts``;
- ``chatd:s:{S}:ids`` hash: ``u:<msg_id>`` / ``f:<msg_id>`` -> ``<seq>:<token>`` (the dedupe);
- ``chatd:s:{S}:pending`` sorted set: the unanswered user msg_ids, scored by seq;
- ``chatd:s:{S}:lease`` hash: msg_id -> ``owner:until_ms:fence``, the owner lease of each
  unanswered message (contract 6; ``owner`` is the store's id, ``until_ms`` Redis server time,
  ``fence`` counts the claims).

Plus the **lease index**: sorted sets of ``"S msg_id"`` scored by ``until_ms``, so the sweep
finds lapsed leases across sessions with a ZRANGEBYSCORE instead of visiting every session.
Every script that changes a lease changes its index member in the same script, so the index
must sit on the session's slot. On one node (a single server, or Sentinel's master) there is
one index, ``chatd:leases``, and any session id. In a Cluster there are :data:`BUCKETS` index
keys ``chatd:leases:{k}`` (k = 0..BUCKETS-1, each on the slot of the string ``k``), and
``create`` only makes session ids whose slot is one of theirs (drawn again until it is: 136
random bits, ~128 draws, ~0.2 ms), so each session's index is on its slot; the sweep asks
every bucket. The sessions then use at most BUCKETS of the 16384 slots: enough to spread over
dozens of masters, and resharding moves whole buckets.

Every script declares every key it touches (Cluster-safe): the sweep is two steps, ``due``
(read only: the lapsed members of one index) then ``claim`` of the sessions it found, with
their keys; so is a ``release`` of a dead store's leases: ``held`` (read only: the members
still leased, by anyone, since the index does not name owners) then ``release`` of the
sessions found, which changes only the dead owner's leases. Index members of expired or
answered sessions are dropped by the claim that meets them.

Every write script that answers "done already" (a retried ``create``, a duplicate append)
still writes (it counts ``again``; the TTLs stay: a duplicate is no activity), so a ``WAIT``
after it covers the original write, which is earlier in the replication stream: a resend is
never acknowledged on the strength of a write no replica has seen (``min_replicas_acks``).

A stream, not a list: XADD with an explicit id refuses one not above the top, so Redis itself
guards the seq order (as the SQLite trigger does), and XRANGE finds "seq > N" by id in
O(log n + m) where LRANGE walks an index, O(n), which a trim of the log would also invalidate.
"""

from __future__ import annotations

import re
import secrets

from redis.crc import key_slot

INDEX = "chatd:leases"
"""The lease index on one node: ``"S msg_id"`` scored by the lease's ``until_ms``."""
BUCKETS = 128
"""Lease index keys of a Cluster (see the module docstring)."""
_SESSION = re.compile(r"[A-Za-z0-9_-]{1,64}")  # anything else was not made by a create

_NOW_MS = "local t = redis.call('TIME') local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)"
_LEASE_OF = """local function lease_of(v)  -- owner, until_ms, fence of a lease value (or nil)
  if not v then return nil, 0, 0 end
  local o, u, f = string.match(v, '^(.*):(%d+):(%d+)$')
  return o, tonumber(u), tonumber(f)
end"""
_NOW = "local t = redis.call('TIME') local now = t[1] .. '.' .. string.format('%06d', t[2])"
_CREATE = f"""-- KEYS: meta. ARGV: owner, ttl. Returns 1, or 0 for a retry (created already).
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'again', 1)  -- a write: a WAIT after it covers the create
  return 0
end
{_NOW}
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'seq', 0, 'created_at', now, 'updated_at', now)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1"""
_APPEND = f"""-- KEYS: meta, log, ids, pending, lease, the session's lease index.
-- ARGV: msg_id, kind, text, meta, ttl, token, owner, lease_ms, session.
-- Returns {{seq, duplicate}}; seq 0: the session is unknown or expired.
if redis.call('EXISTS', KEYS[1]) == 0 then return {{0, 0}} end
local user = ARGV[2] == 'user'
local field = (user and 'u:' or 'f:') .. ARGV[1]
local old = redis.call('HGET', KEYS[3], field)
if old then  -- stored already; by this very request if the token matches (a retry)
  redis.call('HINCRBY', KEYS[1], 'again', 1)  -- a write: a WAIT after it covers the stored one
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
_CLAIM = f"""-- KEYS: meta, log, pending, lease, the session's lease index.
-- ARGV: owner, lease_ms, limit, session, then the msg_ids to look at (the sweep's candidates
-- from the index), or none: every unanswered message of the session (a resume).
-- Claims the lapsed (or missing) leases among them; returns their user events as XRANGE
-- entries. A candidate no longer pending (answered, or the session expired) leaves the index;
-- a held one is scored at its lease's end (the index lagged a renewal).
{_LEASE_OF}
{_NOW_MS}
local out, limit, prefix = {{}}, tonumber(ARGV[3]), ARGV[4] .. ' '
local alive = redis.call('EXISTS', KEYS[1]) == 1
local todo = {{}}
if #ARGV > 4 then
  for i = 5, #ARGV do
    local seq = alive and redis.call('ZSCORE', KEYS[3], ARGV[i])
    if seq then
      todo[#todo + 1] = {{ARGV[i], seq}}
    else
      redis.call('ZREM', KEYS[5], prefix .. ARGV[i])
    end
  end
elseif alive then
  local pending = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
  for i = 1, #pending, 2 do todo[#todo + 1] = {{pending[i], pending[i + 1]}} end
end
for _, t in ipairs(todo) do
  if #out >= limit then break end
  local m, seq = t[1], t[2]
  local _, untl, fence = lease_of(redis.call('HGET', KEYS[4], m))
  if untl < now_ms then
    local got = redis.call('XRANGE', KEYS[2], seq .. '-0', seq .. '-0')
    if got[1] then
      local new = now_ms + tonumber(ARGV[2])
      redis.call('HSET', KEYS[4], m, ARGV[1] .. ':' .. new .. ':' .. (fence + 1))
      redis.call('ZADD', KEYS[5], new, prefix .. m)
      out[#out + 1] = got[1]
    end
  elseif #ARGV > 4 then
    redis.call('ZADD', KEYS[5], untl, prefix .. m)
  end
end
return out"""
_DUE = f"""-- KEYS: a lease index. ARGV: limit. Reads only.
-- Returns up to limit members ("S msg_id") whose lease lapsed, the earliest first.
{_NOW_MS}
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms - 1, 'LIMIT', 0, tonumber(ARGV[1]))"""
_RENEW = f"""-- KEYS: lease, the session's lease index. ARGV: owner, lease_ms, session, msg_id...
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
_HELD = f"""-- KEYS: a lease index. ARGV: limit. Reads only.
-- Returns up to limit members ("S msg_id") whose lease is still held, whoever holds it.
{_NOW_MS}
return redis.call('ZRANGEBYSCORE', KEYS[1], now_ms, '+inf', 'LIMIT', 0, tonumber(ARGV[1]))"""
_RELEASE = f"""-- KEYS: lease, the session's lease index. ARGV: owner, session, msg_id...
-- The owner's leases among them lapse now (the owner's process is dead); returns how many.
{_LEASE_OF}
{_NOW_MS}
local n = 0
for i = 3, #ARGV do
  local owner, untl, fence = lease_of(redis.call('HGET', KEYS[1], ARGV[i]))
  if owner == ARGV[1] and untl >= now_ms then
    redis.call('HSET', KEYS[1], ARGV[i], owner .. ':' .. (now_ms - 1) .. ':' .. fence)
    redis.call('ZADD', KEYS[2], now_ms - 1, ARGV[2] .. ' ' .. ARGV[i])
    n = n + 1
  end
end
return n"""
_SLOTS = f"""-- KEYS: a slot pool's hash. ARGV: host, ttl_ms, max, want, hold, busy, seq, rotate_ms.
-- The fleet's LLM slots of one backend and class (chatd.store.redis_slots). The hash has per
-- host 'h:HOST' the slots it holds, 'w:HOST' those its requests need, 'b:HOST' those in use,
-- 'l:HOST' its lease end (Redis time, ms), 's:HOST' the seq of its last sync. A host whose
-- lease lapsed (or that has none) is dropped: it holds nothing. A sync older than the host's
-- last one changes nothing (its master sent a newer one: it answers allowed -1).
-- The slots are shared max-min fairly over the hosts' needs, one at a time per host in turn
-- (the turn starts at another host every rotate_ms, so a remainder rotates), plus spares
-- (half its need, at least one) for a host while some are left that no host needs nor holds,
-- which it gives back as soon as another host needs them. A host keeps what it cannot
-- give back (min(hold, held), and what is in use), and never takes more than max minus the
-- others' holdings.
-- Returns {{count (held now), allowed (may use), fleet held, fleet busy, hosts, hungry}}.
{_NOW_MS}
local host, ttl, max = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local want, hold, busy = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local seq, rotate = tonumber(ARGV[7]), tonumber(ARGV[8])
local f = {{}}  -- host -> {{h =, w =, b =, l =, s =}}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local kind, who = string.sub(flat[i], 1, 1), string.sub(flat[i], 3)
  f[who] = f[who] or {{}}
  f[who][kind] = tonumber(flat[i + 1])
end
local me = f[host] or {{}}
if (me.s or 0) > seq then return {{me.h or 0, -1, 0, 0, 0, 0}} end
local mine = (me.l or 0) >= now_ms and (me.h or 0) or 0
local names, others, fleet_busy = {{host}}, 0, busy
for who, v in pairs(f) do
  if who ~= host then
    if (v.l or 0) < now_ms then
      redis.call('HDEL', KEYS[1], 'h:' .. who, 'w:' .. who, 'b:' .. who, 'l:' .. who, 's:' .. who)
      f[who] = nil
    else
      names[#names + 1] = who
      others = others + (v.h or 0)
      fleet_busy = fleet_busy + (v.b or 0)
    end
  end
end
table.sort(names)
local function need(n) if n == host then return want end return f[n].w or 0 end
local alloc, left, more, k = {{}}, max, true, #names
for _, n in ipairs(names) do alloc[n] = 0 end
local first = math.floor(now_ms / rotate) % k
while left > 0 and more do  -- water-filling, one slot per host per round
  more = false
  for j = 0, k - 1 do
    local n = names[(first + j) % k + 1]
    if left > 0 and alloc[n] < need(n) then
      alloc[n], left, more = alloc[n] + 1, left - 1, true
    end
  end
end
local hungry, spares = 0, 0  -- hosts short of their share; slots held beyond a share
for _, n in ipairs(names) do
  if n ~= host then
    local h = f[n].h or 0
    if h < alloc[n] then hungry = hungry + 1 end
    if h > alloc[n] then spares = spares + h - alloc[n] end
  end
end
local target = alloc[host]
if left > spares then  -- spares: new requests start without waiting for a sync
  target = target + math.min(left - spares, math.max(1, math.ceil(want / 2)))
end
local allowed = math.max(0, math.min(target, max - others))
local count = math.max(allowed, math.min(hold, mine), busy)
redis.call('HSET', KEYS[1], 'h:' .. host, count, 'w:' .. host, want, 'b:' .. host, busy,
           'l:' .. host, now_ms + ttl, 's:' .. host, seq)
redis.call('PEXPIRE', KEYS[1], ttl + 1000)
return {{count, allowed, others + count, fleet_busy, k, hungry}}"""
_PROBE = """-- KEYS: a probe key. ARGV: a value. A write that changes no session, gone after 60 s.
redis.call('SET', KEYS[1], ARGV[1], 'EX', 60)
return 1"""

SCRIPTS = {
    "create": _CREATE,
    "append": _APPEND,
    "unanswered": _UNANSWERED,
    "claim": _CLAIM,
    "due": _DUE,
    "renew": _RENEW,
    "held": _HELD,
    "release": _RELEASE,
    "probe": _PROBE,
    "slots": _SLOTS,
}
READS = frozenset({"unanswered", "due", "held"})
"""The scripts that write nothing (no WAIT after them)."""


def keys(session: str) -> list[str]:
    """meta, log, ids, pending, lease: one hash tag, so one Cluster slot."""
    prefix = f"chatd:s:{{{session}}}:"
    return [prefix + k for k in ("meta", "log", "ids", "pending", "lease")]


class Layout:
    """Where the lease index of a session lives, and which session ids are valid: on one node
    (``cluster`` False: one index, any id) or in a Cluster (:data:`BUCKETS` indexes, each on
    the slot of its sessions; see the module docstring)."""

    __slots__ = ("_bucket_of_slot", "cluster")

    def __init__(self, cluster: bool) -> None:
        self.cluster = cluster
        self._bucket_of_slot: dict[int, int] = {}
        if cluster:  # two buckets whose names share a slot: the first serves it
            for k in range(BUCKETS):
                self._bucket_of_slot.setdefault(key_slot(str(k).encode()), k)

    def valid(self, session: str) -> bool:
        """Whether ``session`` can name a session here (else it is unknown, not an error)."""
        if not _SESSION.fullmatch(session):
            return False
        return not self.cluster or key_slot(session.encode()) in self._bucket_of_slot

    def new_session(self) -> str:
        """A new session id: 128 random bits or more, URL-safe; in a Cluster, on a bucket's
        slot (136 random bits drawn until it is: what is left is still over 128 bits)."""
        if not self.cluster:
            return secrets.token_urlsafe(16)
        while True:
            session = secrets.token_urlsafe(17)
            if key_slot(session.encode()) in self._bucket_of_slot:
                return session

    def index(self, session: str) -> str:
        """The lease index key of ``session`` (a valid one): on its slot in a Cluster."""
        if not self.cluster:
            return INDEX
        return f"{INDEX}:{{{self._bucket_of_slot[key_slot(session.encode())]}}}"

    def indexes(self) -> list[str]:
        """Every lease index key, for the sweep."""
        if not self.cluster:
            return [INDEX]
        return [f"{INDEX}:{{{k}}}" for k in sorted(set(self._bucket_of_slot.values()))]

    def probes(self, owner: str) -> list[str]:
        """Keys a probe may write, one per index (the caller keeps one per node)."""
        if not self.cluster:
            return [f"chatd:probe:{owner}"]
        return [f"chatd:probe:{{{k}}}:{owner}" for k in sorted(set(self._bucket_of_slot.values()))]
