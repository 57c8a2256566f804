"""The per-key round-robin queue of the slot granter, as a pure data structure."""

from __future__ import annotations

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.master.fairqueue import FairQueue, KeyCounts, busiest


def always(_: object) -> bool:
    return True


def drain(q: FairQueue[str, str]) -> list[str]:
    """Every waiter in the order the queue serves them when nothing is ever skipped."""
    order = []
    while (w := q.take(always, always)) is not None:
        order.append(w)
    return order


def filled(*waiters: str) -> FairQueue[str, str]:
    """A queue of waiters named ``<key><n>`` (``a1`` is key ``a``), pushed in that order."""
    q: FairQueue[str, str] = FairQueue()
    for w in waiters:
        q.push(w[0], w, w)
    return q


def test_keys_take_turns_whatever_their_number_of_waiters() -> None:
    q = filled("a1", "a2", "a3", "a4", "b1", "c1", "c2")
    assert (len(q), q.queued("a"), q.queued("z"), "b1" in q) == (7, 4, 0, True)
    assert q.counts() == {"a": 4, "b": 1, "c": 2}
    assert drain(q) == ["a1", "b1", "c1", "a2", "c2", "a3", "a4"]
    assert len(q) == 0 and q.counts() == {} and list(q.positions()) == []


def test_a_new_key_joins_the_ring_at_the_end() -> None:
    q = filled("a1", "a2", "a3", "b1")
    assert q.take(always, always) == "a1"  # ring: b, a
    assert q.push("c", "c1", "c1") == 3  # after b1 and a2
    assert drain(q) == ["b1", "a2", "c1", "a3"]


def test_skipped_keys_and_waiters_keep_their_place() -> None:
    q = filled("a1", "a2", "b1", "b2", "c1")
    # Key a cannot be served now (say it holds its max_in_flight_per_key): b goes first.
    assert q.take(lambda k: k != "a", always) == "b1"
    # a kept its turn at the head; b1's turn used, b went to the end: ring a, c, b.
    assert q.take(always, lambda w: w != "a1") == "a2"  # a1 skipped: a2 takes a's turn
    assert q.take(always, always) == "c1"
    assert drain(q) == ["b2", "a1"]
    assert q.take(always, always) is None


def test_positions_are_the_serving_order() -> None:
    q = filled("a1", "a2", "a3", "b1", "c1", "c2")
    expected = {w: i for i, w in enumerate(drain(copy.deepcopy(q)), 1)}
    assert dict(q.positions()) == expected == {"a1": 1, "b1": 2, "c1": 3, "a2": 4, "c2": 5, "a3": 6}


def test_remove_and_remove_if() -> None:
    q = filled("a1", "a2", "b1", "c1")
    assert q.remove("a1") == "a1" and q.remove("a1") is None
    assert q.remove("b1") == "b1" and "b" not in q.counts()  # its key leaves the ring
    assert q.remove_if(lambda w: w.startswith("c")) == ["c1"]
    assert list(q.items()) == [("a2", "a2")]


def test_a_repeated_id_replaces_the_older_waiter() -> None:
    q = filled("a1", "b1")
    assert q.push("c", "a1", "again") == 2
    assert len(q) == 2 and list(q.items()) == [("b1", "b1"), ("a1", "again")]


def test_key_counts_per_owner() -> None:
    c = KeyCounts()
    c.add(1, "x")
    c.add(1, "x")
    c.add(2, "x")
    c.add(2, "y")
    assert (c.get("x"), c.get("y"), c.get("z")) == (3, 1, 0)
    c.remove(1, "x", 5)  # at most what owner 1 holds for x
    assert c.get("x") == 1
    c.remove(1, "y", 1)  # owner 1 holds none for y: nothing
    assert c.get("y") == 1
    c.drop_owner(2)
    assert c.total == {}


def test_busiest_keys_and_the_rest() -> None:
    queued = {"a": 5, "b": 1, "c": 1}
    in_flight = {"b": 1, "d": 3}
    assert busiest(queued, in_flight, 2) == ([("a", 5, 0), ("d", 0, 3)], (2, 1))
    assert busiest({}, {}, 10) == ([], (0, 0))


# -- properties ---------------------------------------------------------------------------------

_KEYS = "abcd"
_op = st.one_of(
    st.tuples(st.just("push"), st.sampled_from(_KEYS)),
    st.tuples(st.just("take"), st.none()),
    st.tuples(st.just("take_skipping"), st.sampled_from(_KEYS)),  # that key cannot be served
    st.tuples(st.just("remove"), st.integers(0, 40)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=60))
def test_positions_are_exact_and_only_new_arrivals_push_waiters_back(
    ops: list[tuple[str, str | int | None]],
) -> None:
    """After any sequence: positions are 1..n and the order in which the queue would serve its
    waiters; serving (skipping whole keys or not) and removing never increase a position; a
    push increases by one exactly the positions of the waiters it is served before."""
    q: FairQueue[str, str] = FairQueue()
    n = 0
    for kind, arg in ops:
        before = dict(q.positions())
        if kind == "push":
            assert isinstance(arg, str)
            n += 1
            new = f"{arg}{n}"
            position = q.push(arg, new, new)
            after = dict(q.positions())
            assert after[new] == position
            for w, p in before.items():
                assert after[w] == p + (1 if p >= position else 0), (w, p, after[w])
            continue
        if kind == "take":
            q.take(always, always)
        elif kind == "take_skipping":
            q.take(lambda k, skip=arg: k != skip, always)
        else:
            assert isinstance(arg, int)
            ids = [wid for wid, _ in q.items()]
            if ids and arg % 4:
                assert q.remove(ids[arg % len(ids)]) is not None
            elif ids:  # every waiter of one key (a dead owner's, say)
                victim = ids[arg % len(ids)][0]
                assert q.remove_if(lambda w, k=victim: w[0] == k)
        after = dict(q.positions())
        assert all(after[w] <= before[w] for w in after)
        assert sorted(after.values()) == list(range(1, len(q) + 1))
        assert after == {w: i for i, w in enumerate(drain(copy.deepcopy(q)), 1)}
