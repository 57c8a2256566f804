"""The Redis store's key layout and its Lua scripts (see :mod:`chatd.store.redis`).

Kept apart from the store's connection and batching so each reads on its own: the data here is
what Redis holds and how it changes, each script atomically. :data:`SCRIPTS` maps a name to a
script's body; each body starts with a comment naming its KEYS, its ARGV and what it returns,
which is the contract its caller in :mod:`chatd.store.redis` follows. :func:`keys` gives a
session's keys, :data:`INDEX` the one global key.

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

A stream, not a list: XADD with an explicit id refuses one not above the top, so Redis itself
guards the seq order (as the SQLite trigger does), and XRANGE finds "seq > N" by id in
O(log n + m) where LRANGE walks an index, O(n), which a trim of the log would also invalidate.
"""

from __future__ import annotations

INDEX = "chatd:leases"
"""The one global key: the lease index, ``"S msg_id"`` scored by the lease's ``until_ms``."""

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

SCRIPTS = {
    "create": _CREATE,
    "append": _APPEND,
    "unanswered": _UNANSWERED,
    "claim": _CLAIM,
    "claim_any": _CLAIM_ANY,
    "renew": _RENEW,
}


def keys(session: str) -> list[str]:
    """meta, log, ids, pending, lease: one hash tag, so one Cluster slot."""
    prefix = f"chatd:s:{{{session}}}:"
    return [prefix + k for k in ("meta", "log", "ids", "pending", "lease")]
