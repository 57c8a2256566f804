"""The SQLite store's schema, its migrations and its SQL statements (see chatd.store.sqlite).

Kept apart from the store's batching and threads so each reads on its own. Reads (in the
reader thread) return one JSON value per query (one step, whatever the row count): the sqlite3
module releases the GIL around every step, and a busy event loop can make that thread wait long
to take it back. Writes (on the event loop) handle a whole batch in one statement per kind of
request: a batch passes its rows as parameters (its appends: :func:`insert_rows`) or as one
JSON array (its renewals, its creates), and the file's write lock is held only inside that
statement.
"""

from __future__ import annotations

import functools

SCHEMA_VERSION = 2
"""``PRAGMA user_version`` of the schema; a later version adds its statements to MIGRATIONS."""

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE sessions (
            id         TEXT PRIMARY KEY,
            owner      TEXT NOT NULL,
            last_seq   INTEGER NOT NULL DEFAULT 0,  -- seq assignment reads one row, not MAX()
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX sessions_updated_at ON sessions (updated_at)",
        """CREATE TABLE events (
            session     TEXT NOT NULL,
            seq         INTEGER NOT NULL,
            kind        TEXT NOT NULL CHECK (kind IN ('user', 'reply', 'error')),
            role        TEXT NOT NULL GENERATED ALWAYS AS
                            (CASE kind WHEN 'user' THEN 'user' ELSE 'final' END) VIRTUAL,
            msg_id      TEXT NOT NULL,
            text        TEXT NOT NULL,
            meta        TEXT NOT NULL,      -- a JSON object
            ts          REAL NOT NULL,
            -- The owner lease of an unanswered user message (contract 6): which store
            -- generates it, until when (unix time); 0 once answered (see migration 2).
            lease_owner TEXT NOT NULL DEFAULT '',
            lease_until REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (session, seq),
            UNIQUE (session, msg_id, role)  -- contracts 1 and 2, enforced by the file itself
        )""",
        """CREATE TRIGGER events_seq BEFORE INSERT ON events BEGIN
            SELECT RAISE(ABORT, 'chatd: seq conflict') WHERE NEW.seq IS NOT
                (SELECT last_seq + 1 FROM sessions WHERE id = NEW.session);
        END""",
        """CREATE TRIGGER events_bump AFTER INSERT ON events BEGIN
            UPDATE sessions SET last_seq = NEW.seq, updated_at = NEW.ts WHERE id = NEW.session;
        END""",
        """CREATE TRIGGER sessions_delete AFTER DELETE ON sessions BEGIN
            DELETE FROM events WHERE session = OLD.id;
        END""",
    ),
    # 2: owner leases. Finals release the lease in the file itself (a trigger), so every
    # writer, old or new, keeps "lease_until > 0" meaning "unanswered and leased"; the
    # partial index holds just those rows, so a sweep across all sessions reads only them.
    # Messages left unanswered by version 1 get a lapsed lease: the next claim takes them.
    2: (
        """CREATE INDEX events_lease ON events (lease_until)
            WHERE kind = 'user' AND lease_until > 0""",
        """CREATE TRIGGER events_release AFTER INSERT ON events WHEN NEW.kind != 'user' BEGIN
            UPDATE events SET lease_owner = '', lease_until = 0
            WHERE session = NEW.session AND msg_id = NEW.msg_id AND kind = 'user';
        END""",
        """UPDATE events SET lease_until = 1 WHERE kind = 'user' AND NOT EXISTS
            (SELECT 1 FROM events f WHERE f.session = events.session
             AND f.msg_id = events.msg_id AND f.role = 'final')""",
    ),
}

# Per (session, msg_id, role) of a batch: [index, last_seq, updated_at, seq already stored].
SQL_STATE = """
SELECT json_group_array(json_array(r.key, s.last_seq, s.updated_at, e.seq))
FROM json_each(?) r
LEFT JOIN sessions s ON s.id = json_extract(r.value, '$[0]')
LEFT JOIN events e ON e.session = s.id AND e.msg_id = json_extract(r.value, '$[1]')
    AND e.role = json_extract(r.value, '$[2]')"""
# Expire: the sessions_delete trigger deletes their events in the same statement.
SQL_EXPIRE = "DELETE FROM sessions WHERE updated_at < ?"
SQL_CREATE_ALL = """
INSERT INTO sessions (id, owner, last_seq, created_at, updated_at)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), 0, ?1, ?1 FROM json_each(?2)"""
# Row-at-a-time twins, for a batch that holds a NUL character (json_extract stops at it).
SQL_LOOKUP = """
SELECT s.last_seq, s.updated_at, e.seq FROM sessions s
LEFT JOIN events e ON e.session = s.id AND e.msg_id = ? AND e.role = ? WHERE s.id = ?"""
SQL_INSERT = (
    "INSERT INTO events (session, seq, kind, msg_id, text, meta, lease_owner, lease_until, ts)"
    " VALUES (?,?,?,?,?,?,?,?,?)"
)


@functools.lru_cache(maxsize=512)
def insert_rows(n: int) -> str:
    """One ``INSERT`` of ``n`` events, their 9 values each as parameters in SQL_INSERT's order,
    inserted in that order (the seq trigger checks each against the one before). Parameters,
    not a JSON array through ``json_each``: nothing to parse (a one-row commit measured ~15 %
    cheaper on a scratch file, docs/benchmarks.md), and a NUL in a text needs no other path.
    (``n`` ≤ the store's ``max_batch``, 256: 2,304 parameters, under SQLite's 32,766.)"""
    return SQL_INSERT + ",(?,?,?,?,?,?,?,?,?)" * (n - 1)


# Claim (contract 6): one UPDATE takes the lapsed leases, atomically against every other
# writer (SQLite has one writer at a time). ?1 owner, ?2 new deadline, ?3 now, ?4 session or
# NULL for all sessions, ?5 limit. The inner query walks the partial index events_lease.
SQL_CLAIM = """
UPDATE events SET lease_owner = ?1, lease_until = ?2 WHERE rowid IN (
    SELECT u.rowid FROM events u WHERE u.kind = 'user' AND u.lease_until > 0
    AND u.lease_until < ?3 AND (?4 IS NULL OR u.session = ?4)
    AND NOT EXISTS (SELECT 1 FROM events f WHERE f.session = u.session
                    AND f.msg_id = u.msg_id AND f.role = 'final')
    ORDER BY u.lease_until LIMIT ?5)
RETURNING session, seq, kind, msg_id, text, meta, ts"""
# Renew: ?1 new deadline, ?2 owner, ?3 a JSON array of [session, msg_id] pairs.
SQL_RENEW = """
UPDATE events SET lease_until = ?1 WHERE kind = 'user' AND lease_owner = ?2
AND lease_until > 0 AND (session, msg_id) IN
    (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?3))
RETURNING session, msg_id"""
SQL_RENEW_ONE = """
UPDATE events SET lease_until = ?1 WHERE kind = 'user' AND lease_owner = ?2
AND lease_until > 0 AND session = ?3 AND msg_id = ?4 RETURNING session, msg_id"""
# Release (a dead store's leases lapse now): ?1 owner, ?2 now. Only leases still held (a
# lapsed one is claimable already); lapsed "since 1", as migration 2 leaves unanswered
# messages, so the next claim (ORDER BY lease_until) takes them first. Walks events_lease.
SQL_RELEASE = """
UPDATE events SET lease_until = 1 WHERE kind = 'user' AND lease_until > 0
AND lease_until >= ?2 AND lease_owner = ?1"""
NUL = b"\\u0000"  # how orjson writes a NUL (a literal backslash-u0000 also matches: harmless)


def _ev(t: str) -> str:
    return f"json_array({t}.seq, {t}.kind, {t}.msg_id, {t}.text, json({t}.meta), {t}.ts)"


SQL_EVENTS_AFTER = (
    f"SELECT json_group_array({_ev('e')}) FROM events e WHERE session = ? AND seq > ?"
)
SQL_HISTORY = f"""
SELECT json_group_array(json(pair)) FROM (
    SELECT json_array({_ev("u")}, {_ev("r")}) AS pair FROM events u JOIN events r
        ON r.session = u.session AND r.msg_id = u.msg_id AND r.role = 'final'
    WHERE u.session = ? AND u.role = 'user' AND r.kind = 'reply'
    ORDER BY u.seq DESC LIMIT ?)"""
SQL_UNANSWERED = f"""
SELECT json_group_array({_ev("u")}) FROM events u WHERE u.session = ? AND u.role = 'user'
AND NOT EXISTS (SELECT 1 FROM events f WHERE f.session = u.session AND f.msg_id = u.msg_id
                AND f.role = 'final')"""
