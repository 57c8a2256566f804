"""The history cache: the recent turns of the sessions a worker serves, as model messages.

A message's request to the model carries the session's last ``history_turns`` turns. Reading
them from the store for every message would put a store read on the hot path (DESIGN.md,
"history cache"); a worker keeps them in memory instead, per session, for at most
``CACHE_SESSIONS`` sessions (least recently used dropped first), and reads the store only on
a miss.

The cache is exact or absent: an entry knows the last ``seq`` it accounts for, and is used
only for the next user message of its session (``seq == last_seq + 1``). An event appended
by another worker (a resume elsewhere, a takeover) shows as a gap, and the entry is dropped
and read again from the store. An error ends no turn: the entry is dropped too.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from chatd.store.base import Store

CACHE_SESSIONS = 10000  # sessions whose history a worker keeps in memory

Messages = list[dict[str, str]]


@dataclass(slots=True)
class _Turns:
    """A session's recent turns as model messages (at most ``limit``, oldest dropped first),
    and the last seq they account for. A list, not a ``deque(maxlen=…)``: an empty deque
    costs ~600 bytes, and every open session has one of these."""

    messages: Messages
    last_seq: int
    limit: int

    def add(self, role: str, text: str) -> None:
        self.messages.append({"role": role, "content": text})
        if len(self.messages) > self.limit:
            del self.messages[0]


class History:
    """The model context of each new user message: from memory, or from ``store``.

    ``turns``: how many past turns (a user message and its reply) a request carries;
    ``system``: the system prompt put first ("" for none).
    """

    def __init__(self, store: Store, turns: int, system: str) -> None:
        self._store = store
        self._turns = turns
        self._limit = max(1, 2 * turns)
        self._system = system
        self._cache: OrderedDict[str, _Turns] = OrderedDict()

    def new_session(self, session: str) -> None:
        """A session this worker just created: its (empty) history needs no store read."""
        self._put(session, _Turns([], 0, self._limit))

    def cached(self, session: str, seq: int, text: str) -> Messages | None:
        """The model messages for the user message ``seq`` (``text``) from the cache, or None
        on a miss (then :meth:`load`). A hit needs the entry to account for every event up to
        ``seq - 1``; otherwise another worker wrote to the session and the entry is dropped.
        """
        turns = self._cache.get(session)
        if turns is None or turns.last_seq != seq - 1:
            self._cache.pop(session, None)
            return None
        self._cache.move_to_end(session)
        turns.add("user", text)
        turns.last_seq = seq
        return self._with_system(turns.messages)

    async def load(self, session: str, seq: int, text: str) -> Messages:
        """The model messages for the user message ``seq`` (``text``), read from the store
        (and cached). Raises StoreError."""
        events = await self._store.history(session, self._turns)
        turns = _Turns([], seq, self._limit)
        for ev in events:
            if ev.seq < seq:
                turns.add("user" if ev.kind == "user" else "assistant", ev.text)
        turns.add("user", text)
        self._put(session, turns)
        return self._with_system(turns.messages)

    def reply(self, session: str, seq: int, text: str) -> None:
        """The reply ``text`` was stored with ``seq``: it becomes part of the context."""
        turns = self._cache.get(session)
        if turns is None:
            return
        if turns.last_seq == seq - 1:
            turns.add("assistant", text)
            turns.last_seq = seq
        else:
            del self._cache[session]  # interleaved with other writers: reload next time

    def forget(self, session: str) -> None:
        """Drop the session's entry (a final error was stored: it is no turn)."""
        self._cache.pop(session, None)

    def _put(self, session: str, turns: _Turns) -> None:
        self._cache[session] = turns
        if len(self._cache) > CACHE_SESSIONS:
            self._cache.popitem(last=False)

    def _with_system(self, messages: Messages) -> Messages:
        head = [{"role": "system", "content": self._system}] if self._system else []
        return head + list(messages)
