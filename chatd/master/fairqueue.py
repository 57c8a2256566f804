"""Waiters in one FIFO per key, served round robin across the keys: pure data structure.

The key is the client a request comes from (:mod:`chatd.master.slotgrant` says which). The
queue is deficit round robin with a quantum of one request: the keys that have waiters form a
*ring*, the next key to serve first; serving a key takes the first waiter of its FIFO that
the caller can serve and moves the key to the end of the ring (or out of it, once its FIFO is
empty); a key that gets its first waiter joins the ring at the end. So with keys ``a``, ``b``,
``c`` waiting, grants go ``a, b, c, a, b, c, ...`` whatever the number of waiters of each,
and a single backlogged key gets every grant (work-conserving).

A key or a waiter the caller cannot serve right now (see :meth:`FairQueue.take`) is skipped
and keeps its place: a key skipped keeps its turn, at the head of the ring, for the next
grant it can use.

Positions
---------
The position of a waiter is 1 + the number of waiters that the round robin serves before it
if nothing new arrives and every key takes its turn when it comes: with the ring
``k_1, k_2, ...`` and the waiter at index ``i`` (0-based) of ``k_r``'s FIFO, it is served in
round ``i``, after the ``i`` waiters before it in its own FIFO, ``min(len_j, i + 1)`` of every
key ``j`` before ``k_r`` in the ring and ``min(len_j, i)`` of every key after it. Equivalently,
``1 + S(i) + B_r(i)`` with ``S(i) = sum_j min(len_j, i)`` over every key and ``B_r(i)`` the keys
before ``k_r`` whose FIFO is longer than ``i``: :meth:`FairQueue.positions` computes all of them
in O(waiters + keys). Properties: positions are 1..n, a permutation, 1 being the next waiter
served; serving, cancelling or dropping waiters never increases another waiter's position,
with one exception: when a key's turn goes to a later waiter of its FIFO because the ones
before could not be served (the caller's ``waiter_ok``), those earlier ones move a round back
(their key's turn was used). A new waiter increases the positions of the waiters it is
served before (and only of those: it pushes in at its round).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Generic, TypeVar

I = TypeVar("I", bound=Hashable)  # noqa: E741 - a waiter's id
W = TypeVar("W")  # a waiter


class FairQueue(Generic[I, W]):
    """Waiters ``W`` named by ids ``I``, one FIFO per key (a string), served round robin."""

    def __init__(self) -> None:
        # The ring: keys with waiters, in the order they are served next; each key's FIFO is
        # an insertion-ordered dict, so a waiter leaves it in O(1) (a cancel, a dead owner).
        self._ring: OrderedDict[str, dict[I, W]] = OrderedDict()
        self._key_of: dict[I, str] = {}

    def __len__(self) -> int:
        return len(self._key_of)

    def __contains__(self, wid: object) -> bool:
        return wid in self._key_of

    def queued(self, key: str) -> int:
        """How many waiters ``key`` has."""
        fifo = self._ring.get(key)
        return len(fifo) if fifo is not None else 0

    def counts(self) -> dict[str, int]:
        """Waiters per key, for the keys that have any (in ring order)."""
        return {key: len(fifo) for key, fifo in self._ring.items()}

    def push(self, key: str, wid: I, waiter: W) -> int:
        """Add ``waiter`` at the end of ``key``'s FIFO (a key new to the ring joins it at the
        end) and return its position. A ``wid`` already queued is replaced (the older waiter
        leaves the queue first)."""
        self.remove(wid)
        fifo = self._ring.get(key)
        if fifo is None:
            fifo = self._ring[key] = {}
        fifo[wid] = waiter
        self._key_of[wid] = key
        i = len(fifo) - 1
        position = 1
        before = True  # walking the keys before ``key`` in the ring
        for other, queue in self._ring.items():
            if other == key:
                before = False
                position += i
            else:
                position += min(len(queue), i + 1 if before else i)
        return position

    def remove(self, wid: I) -> W | None:
        """Take ``wid`` out of the queue (None if it is not queued)."""
        key = self._key_of.pop(wid, None)
        if key is None:
            return None
        fifo = self._ring[key]
        waiter = fifo.pop(wid)
        if not fifo:
            del self._ring[key]
        return waiter

    def remove_if(self, drop: Callable[[W], bool]) -> list[W]:
        """Take out every waiter for which ``drop`` holds; return them in serving order."""
        gone = [(wid, w) for wid, w in self.items() if drop(w)]
        for wid, _ in gone:
            self.remove(wid)
        return [w for _, w in gone]

    def items(self) -> Iterator[tuple[I, W]]:
        """Every waiter with its id: key by key in ring order, each key's in FIFO order (not
        the serving order across keys: see :meth:`positions`)."""
        for fifo in self._ring.values():
            yield from fifo.items()

    def take(self, key_ok: Callable[[str], bool], waiter_ok: Callable[[W], bool]) -> W | None:
        """Serve one waiter: the first one for which ``waiter_ok`` holds in the FIFO of the
        first key of the ring for which ``key_ok`` holds; it leaves the queue, and its key
        moves to the end of the ring. None (and nothing changes) when there is none.

        O(keys + waiters skipped).
        """
        for key, fifo in self._ring.items():
            if not key_ok(key):
                continue
            found = next(((wid, w) for wid, w in fifo.items() if waiter_ok(w)), None)
            if found is None:
                continue
            wid, waiter = found
            del fifo[wid], self._key_of[wid]
            if fifo:
                self._ring.move_to_end(key)
            else:
                del self._ring[key]
            return waiter
        return None

    def positions(self) -> Iterator[tuple[W, int]]:
        """Every waiter with its position (module docstring), in O(waiters + keys)."""
        if not self._ring:
            return
        longest = max(len(fifo) for fifo in self._ring.values())
        # longer[i]: keys whose FIFO is longer than i; s[i] = sum over keys of min(len, i).
        longer = [0] * longest
        for fifo in self._ring.values():
            for i in range(len(fifo)):
                longer[i] += 1
        s = [0] * longest
        for i in range(1, longest):
            s[i] = s[i - 1] + longer[i - 1]
        before = [0] * longest  # like ``longer``, over the keys walked so far
        for fifo in self._ring.values():
            for i, waiter in enumerate(fifo.values()):
                yield waiter, 1 + s[i] + before[i]
            for i in range(len(fifo)):
                before[i] += 1


class KeyCounts:
    """Slots counted against each key, and by which owner (so a dead owner's come back)."""

    def __init__(self) -> None:
        self.total: dict[str, int] = {}  # key -> slots counted, all owners
        self._by_owner: dict[int, dict[str, int]] = {}

    def get(self, key: str) -> int:
        return self.total.get(key, 0)

    def add(self, owner: int, key: str) -> None:
        mine = self._by_owner.setdefault(owner, {})
        mine[key] = mine.get(key, 0) + 1
        self.total[key] = self.total.get(key, 0) + 1

    def remove(self, owner: int, key: str, count: int) -> None:
        """``count`` of ``owner``'s slots for ``key`` come back (at most those it holds)."""
        mine = self._by_owner.get(owner, {})
        count = min(count, mine.get(key, 0))
        if count <= 0:
            return
        for counts, name in ((mine, key), (self.total, key)):
            counts[name] -= count
            if not counts[name]:
                del counts[name]
        if not mine:
            del self._by_owner[owner]

    def drop_owner(self, owner: int) -> None:
        for key, count in list(self._by_owner.get(owner, {}).items()):
            self.remove(owner, key, count)


def busiest(
    queued: Mapping[str, int], in_flight: Mapping[str, int], top: int
) -> tuple[list[tuple[str, int, int]], tuple[int, int]]:
    """The ``top`` keys by ``queued + in_flight`` (then by key), as ``(key, queued,
    in_flight)``, and ``(queued, in_flight)`` summed over the other keys."""
    loads = [(k, queued.get(k, 0), in_flight.get(k, 0)) for k in queued.keys() | in_flight.keys()]
    loads.sort(key=lambda load: (-(load[1] + load[2]), load[0]))
    rest = loads[top:]
    return loads[:top], (sum(q for _, q, _ in rest), sum(f for _, _, f in rest))
