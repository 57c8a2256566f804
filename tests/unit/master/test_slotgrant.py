"""The daemon-wide slot granter, as pure logic: events in, grants out."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.master.slotgrant import Grant, Granter, Output, Queued, Recall, Refused
from chatd.stats import KeyLoad, backend_keys

A, B = "http://a", "http://b"


def grants(out: list[Output]) -> list[tuple[int, int, str]]:
    return [(o.owner, o.rid, o.backend) for o in out if isinstance(o, Grant)]


def plain(out: list[Output]) -> list[Output]:
    """The answers to requests, leases aside (those have tests of their own below)."""
    return [
        dataclasses.replace(o, lease=False) if isinstance(o, Grant) else o
        for o in out
        if not isinstance(o, Recall)
    ]


def test_grants_least_loaded_backend_then_first_on_a_tie() -> None:
    g = Granter([(A, 2), (B, 4)], max_queue=10)
    both = (A, B)
    assert plain(g.acquire(1, 1, both, 0.0)) == [Grant(1, 1, A)]  # tie at 0: the first
    assert plain(g.acquire(1, 2, both, 0.0)) == [Grant(1, 2, B)]  # A at 1/2, B at 0/4
    assert plain(g.acquire(1, 3, both, 0.0)) == [Grant(1, 3, B)]  # A at 1/2, B at 1/4
    assert plain(g.acquire(1, 4, both, 0.0)) == [Grant(1, 4, A)]  # A 1/2 = B 2/4: the first
    stats = g.statistics()
    assert [b.in_flight for b in stats.backends] == [2, 2]
    assert stats.granted_total == 4


def test_cap_holds_across_owners_then_fifo_queue() -> None:
    g = Granter([(A, 2)], max_queue=10)
    assert grants(g.acquire(1, 1, [A], 0.0)) == [(1, 1, A)]
    assert grants(g.acquire(2, 1, [A], 0.0)) == [(2, 1, A)]
    assert plain(g.acquire(1, 2, [A], 0.0)) == [Queued(1, 2, 1)]
    assert plain(g.acquire(2, 2, [A], 0.0)) == [Queued(2, 2, 2)]
    assert plain(g.acquire(3, 1, [A], 0.0)) == [Queued(3, 1, 3)]
    assert g.statistics().backends[0].in_flight == 2
    assert plain(g.release(2, A)) == [Grant(1, 2, A)]  # first in, first out, across owners
    assert plain(g.release(1, A)) == [Grant(2, 2, A)]
    assert plain(g.release(1, A)) == [Grant(3, 1, A)]
    assert g.queue_depth == 0
    assert g.held(1) == {} and g.held(2) == {A: 1} and g.held(3) == {A: 1}


def test_full_queue_refuses_busy_at_once() -> None:
    g = Granter([(A, 1)], max_queue=2)
    g.acquire(1, 1, [A], 0.0)
    assert isinstance(g.acquire(1, 2, [A], 0.0)[0], Queued)
    assert isinstance(g.acquire(1, 3, [A], 0.0)[0], Queued)
    assert plain(g.acquire(1, 4, [A], 0.0)) == [Refused(1, 4, "busy")]
    assert g.statistics().refused_busy_total == 1
    g.cancel(1, 2)
    assert isinstance(g.acquire(1, 5, [A], 0.0)[0], Queued)  # a place came free


def test_max_queue_zero_refuses_every_wait() -> None:
    g = Granter([(A, 1)], max_queue=0)
    assert grants(g.acquire(1, 1, [A], 0.0))
    assert plain(g.acquire(1, 2, [A], 0.0)) == [Refused(1, 2, "busy")]


def test_allowed_sets_skip_a_waiter_without_blocking_the_ones_behind() -> None:
    g = Granter([(A, 1), (B, 1)], max_queue=10)
    g.acquire(1, 1, [A], 0.0)
    g.acquire(1, 2, [B], 0.0)
    assert plain(g.acquire(2, 1, [A], 0.0)) == [Queued(2, 1, 1)]  # only A: waits
    assert plain(g.acquire(2, 2, [B], 0.0)) == [Queued(2, 2, 2)]
    assert plain(g.release(1, B)) == [Grant(2, 2, B)]  # the first waiter cannot use B
    assert plain(g.release(1, A)) == [Grant(2, 1, A)]


def test_new_request_takes_a_free_slot_no_waiter_can_use() -> None:
    g = Granter([(A, 1), (B, 1)], max_queue=10)
    g.acquire(1, 1, [A], 0.0)
    g.acquire(1, 2, [A], 0.0)  # waits for A; B is free but not allowed for it
    assert plain(g.acquire(2, 1, [A, B], 0.0)) == [Grant(2, 1, B)]  # not jumping the queue


def test_release_of_a_slot_not_held_is_ignored() -> None:
    g = Granter([(A, 1)], max_queue=10)
    g.acquire(1, 1, [A], 0.0)
    g.acquire(2, 1, [A], 0.0)
    assert plain(g.release(2, A)) == []  # owner 2 holds nothing
    assert plain(g.release(1, "http://unknown")) == []
    assert g.statistics().backends[0].in_flight == 1


def test_cancel_drops_the_waiter_and_unknown_rids_are_ignored() -> None:
    g = Granter([(A, 1)], max_queue=10)
    g.acquire(1, 1, [A], 0.0)
    g.acquire(2, 1, [A], 0.0)
    g.acquire(3, 1, [A], 0.0)
    assert plain(g.cancel(2, 1)) == []
    assert plain(g.cancel(2, 99)) == []
    assert plain(g.release(1, A)) == [Grant(3, 1, A)]


def test_dead_owner_gives_back_its_slots_and_loses_its_waiters() -> None:
    g = Granter([(A, 2)], max_queue=10)
    g.acquire(1, 1, [A], 0.0)
    g.acquire(1, 2, [A], 0.0)
    g.acquire(1, 3, [A], 0.0)  # queued: dropped with its owner
    g.acquire(2, 1, [A], 0.0)
    g.acquire(2, 2, [A], 0.0)
    assert plain(g.owner_gone(1)) == [Grant(2, 1, A), Grant(2, 2, A)]
    assert g.held(1) == {} and g.queue_depth == 0
    assert g.statistics().backends[0].in_flight == 2
    assert plain(g.owner_gone(1)) == []  # twice is harmless


def test_unhealthy_backend_gets_no_slots_until_it_recovers() -> None:
    g = Granter([(A, 2), (B, 2)], max_queue=10)
    assert g.statistics().backends[0].healthy is None  # unknown counts as usable
    assert plain(g.report_health(A, False)) == []
    assert grants(g.acquire(1, 1, [A, B], 0.0)) == [(1, 1, B)]
    assert plain(g.acquire(1, 2, [A], 0.0)) == [Refused(1, 2, "unavailable")]
    g.acquire(1, 3, [A, B], 0.0)
    assert plain(g.acquire(1, 4, [A, B], 0.0)) == [Queued(1, 4, 1)]  # B full, A down: wait
    assert plain(g.report_health(A, True)) == [Grant(1, 4, A)]
    assert g.statistics().refused_unavailable_total == 1


def test_waiters_left_without_a_healthy_backend_are_refused() -> None:
    g = Granter([(A, 1), (B, 1)], max_queue=10)
    g.acquire(1, 1, [A], 0.0)
    g.acquire(1, 2, [B], 0.0)
    g.acquire(2, 1, [A], 0.0)
    g.acquire(2, 2, [A, B], 0.0)
    assert plain(g.report_health(A, False)) == [Refused(2, 1, "unavailable")]  # 2/2 may use B
    assert g.queue_depth == 1
    assert plain(g.release(1, A)) == []  # the slot of an unhealthy backend is not granted again
    assert g.statistics().backends[0].in_flight == 0
    assert plain(g.report_health(A, False)) == []  # no change: nothing to do


def test_latest_report_wins() -> None:
    g = Granter([(A, 1)], max_queue=10)
    g.report_health(A, False)
    g.report_health(A, True)
    assert g.statistics().backends[0].healthy is True
    assert grants(g.acquire(1, 1, [A], 0.0))


def test_positions_are_sent_on_change_at_most_once_per_interval() -> None:
    g = Granter([(A, 1)], max_queue=10, position_interval=1.0)
    g.acquire(1, 1, [A], 0.0)
    for rid in range(2, 6):
        g.acquire(1, rid, [A], 0.0)  # positions 1..4, sent at t=0
    assert g.next_due() is None  # each waiter was told its position when it arrived
    assert plain(g.tick(0.0)) == []
    g.release(1, A)  # rid 2 granted: 3, 4, 5 move up, but were told their place at t=0
    assert plain(g.tick(0.5)) == []
    assert g.next_due() == 1.0
    assert plain(g.tick(1.0)) == [Queued(1, 3, 1), Queued(1, 4, 2), Queued(1, 5, 3)]
    assert g.next_due() is None
    g.cancel(1, 3)
    g.release(1, A)  # rid 4 granted
    assert plain(g.tick(1.5)) == []  # changed, but told at t=1.0
    assert plain(g.tick(2.0)) == [Queued(1, 5, 1)]
    assert plain(g.tick(5.0)) == []  # unchanged: nothing


def test_reconfigure_keeps_counts_and_retires_dropped_backends() -> None:
    g = Granter([(A, 1), (B, 1)], max_queue=10)
    g.acquire(1, 1, [A], 0.0)
    g.acquire(1, 2, [B], 0.0)
    g.acquire(2, 1, [B], 0.0)  # waits for B
    g.report_health(A, False)
    out = g.reconfigure([(A, 3)], max_queue=5)  # B dropped, A grows (but is unhealthy)
    assert out == [Refused(2, 1, "unavailable")]
    st_ = {b.key: b for b in g.statistics().backends}
    assert st_[A].max_parallel == 3 and st_[A].in_flight == 1 and st_[A].healthy is False
    assert st_[B].configured is False and st_[B].in_flight == 1
    assert plain(g.acquire(2, 2, [B], 0.0)) == [Refused(2, 2, "unavailable")]
    g.release(1, B)
    assert B not in {b.key for b in g.statistics().backends}  # forgotten once idle
    assert g.statistics().max_queue == 5
    with pytest.raises(ValueError):
        g.reconfigure([(A, 1), (A, 2)], 1)


def test_lower_max_parallel_applies_as_slots_come_back() -> None:
    g = Granter([(A, 3)], max_queue=10)
    for rid in range(3):
        g.acquire(1, rid, [A], 0.0)
    g.acquire(2, 1, [A], 0.0)
    g.reconfigure([(A, 1)], 10)
    assert plain(g.release(1, A)) == [] and g.release(1, A) == []
    assert plain(g.release(1, A)) == [Grant(2, 1, A)]


def test_backend_keys_name_repeats_apart() -> None:
    assert backend_keys(["http://a/", "http://b", "http://a"]) == (
        "http://a",
        "http://b",
        "http://a#2",
    )


# -- properties over random event sequences ------------------------------------------------------

_BACKENDS = [("b0", 1), ("b1", 2), ("b2", 3)]
_KEYS = [k for k, _ in _BACKENDS]
_CLIENTS = ["", "x", "y"]

_acquire = st.tuples(
    st.just("acquire"),
    st.tuples(st.integers(1, 3), st.sampled_from(_CLIENTS)),
    # Mostly every backend (as a first attempt asks), sometimes fewer (a retry), rarely none.
    st.one_of(st.just(set(_KEYS)), st.sets(st.sampled_from(_KEYS), max_size=3)),
)
# A slot some owner holds (the n-th, named by the first integer), given back naming a key it
# holds slots for if any, as a worker does; or, when the boolean says so, anything at all.
_release = st.tuples(st.just("release"), st.integers(0, 99), st.booleans())
# Weighted so that queues form and the keys take turns: acquires and releases often, a dead
# owner and a backend going down seldom (each refuses or drops many waiters at once).
_by_kind: dict[str, st.SearchStrategy[tuple[object, ...]]] = {
    "acquire": _acquire,
    "release": _release,
    "cancel": st.tuples(st.just("cancel"), st.integers(1, 3), st.integers(0, 30)),
    "gone": st.tuples(st.just("gone"), st.integers(1, 3), st.none()),
    "health": st.tuples(
        st.just("health"), st.sampled_from(_KEYS), st.sampled_from([True, True, False])
    ),
    "tick": st.tuples(st.just("tick"), st.none(), st.none()),
}
_event = st.sampled_from(
    ["acquire"] * 8 + ["release"] * 5 + ["cancel", "gone", "health", "tick", "tick"]
).flatmap(_by_kind.__getitem__)


def _rr_order(ring: list[str], fifo: dict[str, list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """The waiters in the order the round robin serves them if nothing is skipped."""
    order = []
    for r in range(max((len(q) for q in fifo.values()), default=0)):
        order += [fifo[k][r] for k in ring if len(fifo[k]) > r]
    return order


@settings(max_examples=400, deadline=None)
@given(
    st.lists(_event, min_size=20, max_size=100),
    st.integers(0, 6),
    st.integers(0, 3),
    st.integers(0, 3),
)
def test_invariants_hold_for_any_sequence(
    events: list[tuple[object, ...]], max_queue: int, per_key_queue: int, per_key_flight: int
) -> None:
    """Cap, bookkeeping, one final answer per request, round robin across keys (each grant to a
    waiter goes to the first key in ring order that can take a slot, and its first waiter that
    can), the per-key bounds, positions (the round-robin serving order), nothing grantable
    left waiting, leases only while nobody waits and recalled as soon as someone does."""
    g = Granter(
        _BACKENDS,
        max_queue,
        position_interval=1.0,
        max_queued_per_key=per_key_queue,
        max_in_flight_per_key=per_key_flight,
    )
    limits = dict(_BACKENDS)
    held: Counter[tuple[int, str]] = Counter()  # what each owner holds, from the grants seen
    keyed: Counter[tuple[int, str]] = Counter()  # (owner, client) -> slots counted against it
    open_: dict[tuple[int, int], tuple[str, frozenset[str]]] = {}  # waiting: client, allowed
    ring: list[str] = []  # clients with waiters, the next one to serve first
    fifo: dict[str, list[tuple[int, int]]] = {}  # client -> its waiters, in arrival order
    healthy = dict.fromkeys(_KEYS, True)
    leasing: set[int] = set()  # owners whose last grant leased, not recalled since
    rid = 0
    now = 0.0

    def in_flight(backend: str) -> int:
        return sum(n for (_, b), n in held.items() if b == backend)

    def client_flight(client: str) -> int:
        return sum(n for (_, c), n in keyed.items() if c == client)

    def client_may_grow(client: str) -> bool:
        return per_key_flight == 0 or client_flight(client) < per_key_flight

    def usable(allowed: frozenset[str]) -> bool:
        return any(healthy[k] and in_flight(k) < limits[k] for k in allowed)

    def leave(wid: tuple[int, int]) -> None:
        client, _ = open_.pop(wid)
        fifo[client].remove(wid)
        if not fifo[client]:
            ring.remove(client)

    for kind, a, b in events:
        now += 0.3
        out: list[Output] = []
        if kind == "acquire":
            rid += 1
            assert isinstance(a, tuple) and isinstance(b, set)
            owner, client = a
            waiting = len(open_)
            out = g.acquire(owner, rid, b, now, client)
            first = out[0]
            assert first.rid == rid and not isinstance(first, Recall)
            assert all(isinstance(o, Recall) for o in out[1:])
            can = client_may_grow(client) and usable(frozenset(b))
            if isinstance(first, Grant):
                assert can
            elif isinstance(first, Queued):
                assert not can and len(fifo.get(client, ())) < (per_key_queue or 99)
                assert waiting < max_queue
                open_[owner, rid] = (client, frozenset(b))
                if client not in fifo or not fifo[client]:
                    ring.append(client)
                fifo.setdefault(client, []).append((owner, rid))
                assert first.position == _rr_order(ring, fifo).index((owner, rid)) + 1
            elif first.reason == "key_busy":
                assert not can and 0 < per_key_queue <= len(fifo.get(client, ()))
            elif first.reason == "busy":
                assert not can and waiting >= max_queue
                assert per_key_queue == 0 or len(fifo.get(client, ())) < per_key_queue
            out = out[1:] if not isinstance(first, Grant) else out
        elif kind == "release":
            assert isinstance(a, int) and isinstance(b, bool)
            holdings = sorted(k for k, n in held.items() if n > 0)
            if b or not holdings:  # anything: maybe a slot not held, maybe a key not counted
                owner, backend = a % 3 + 1, _KEYS[a % 5 % 3]
                client = [None, *_CLIENTS][a % 4]
            else:
                owner, backend = holdings[a % len(holdings)]
                clients = sorted(c for (o, c), n in keyed.items() if o == owner and n > 0)
                client = clients[a % len(clients)] if clients and a % 5 else None
            out = g.release(owner, backend, 1, client)
            if held[owner, backend] > 0:
                held[owner, backend] -= 1
                if client is not None and keyed[owner, client] > 0:
                    keyed[owner, client] -= 1
            else:
                assert out == []
        elif kind == "cancel":
            assert isinstance(a, int) and isinstance(b, int)
            out = g.cancel(a, b)
            if (a, b) in open_:
                leave((a, b))
        elif kind == "gone":
            assert isinstance(a, int)
            out = g.owner_gone(a)
            leasing.discard(a)
            for key in [k for k in held if k[0] == a]:
                del held[key]
            for key in [k for k in keyed if k[0] == a]:
                del keyed[key]
            for key in [k for k in open_ if k[0] == a]:
                leave(key)
        elif kind == "health":
            assert isinstance(a, str) and isinstance(b, bool)
            healthy[a] = b
            out = g.report_health(a, b)
        else:
            out = g.tick(now)
        for o in out:
            if isinstance(o, Grant):
                wid = (o.owner, o.rid)
                client = ""
                if wid in open_:  # an answer to a waiter: the round robin's choice
                    client, allowed = open_[wid]
                    assert o.backend in allowed and healthy[o.backend]
                    expected = next(
                        w
                        for k in ring
                        if client_may_grow(k)
                        for w in fifo[k]
                        if usable(open_[w][1])
                    )
                    assert wid == expected, (wid, expected, ring, fifo)
                    leave(wid)
                    ring[:] = [k for k in ring if k != client] + ([client] if fifo[client] else [])
                elif isinstance(a, tuple):  # the answer to the new request
                    client = a[1]
                assert in_flight(o.backend) < limits[o.backend]
                held[o.owner, o.backend] += 1
                lease = not open_ and max_queue > 0 and per_key_flight == 0
                assert o.lease == lease, o  # lease iff nobody waits (and no per-key bound)
                (leasing.add if o.lease else leasing.discard)(o.owner)
                if not o.lease:
                    keyed[o.owner, client] += 1
            elif isinstance(o, Recall):
                assert o.owner in leasing
                leasing.remove(o.owner)
            elif isinstance(o, Refused):
                assert (o.owner, o.rid) in open_ and o.reason == "unavailable"
                leave((o.owner, o.rid))
            elif isinstance(o, Queued):
                assert kind == "tick" and (o.owner, o.rid) in open_
                assert o.position == _rr_order(ring, fifo).index((o.owner, o.rid)) + 1
        stats = g.statistics()
        by_key = {s.key: s for s in stats.backends}
        for key, limit in limits.items():
            assert by_key[key].in_flight == in_flight(key) <= limit  # the cap, and exact counts
        assert stats.queue_depth == len(open_) <= max(max_queue, 0)
        for client in _CLIENTS:
            assert g.key_in_flight(client) == client_flight(client)
            assert per_key_flight == 0 or client_flight(client) <= per_key_flight
            assert per_key_queue == 0 or len(fifo.get(client, ())) <= per_key_queue
        assert all(g.leasing(owner) == (owner in leasing) for owner in (1, 2, 3))
        if open_:
            assert not leasing, "someone waits while an owner may still keep idle slots"
        # Nothing left waiting could be granted now (the granting pass is complete).
        for client, allowed in open_.values():
            assert not (client_may_grow(client) and usable(allowed))
            assert any(k in allowed and healthy[k] for k in _KEYS)


# -- leases ----------------------------------------------------------------------------------


def test_grants_lease_while_nobody_waits_and_a_waiter_recalls_them() -> None:
    g = Granter([(A, 2)], max_queue=10)
    assert g.acquire(1, 1, [A], 0.0) == [Grant(1, 1, A, lease=True)]
    assert g.acquire(2, 1, [A], 0.0) == [Grant(2, 1, A, lease=True)]
    assert g.leasing(1) and g.leasing(2)
    # Full: the next one waits, and every leasing owner must give back what it keeps idle.
    assert g.acquire(3, 1, [A], 0.0) == [Queued(3, 1, 1), Recall(1), Recall(2)]
    assert not g.leasing(1) and not g.leasing(2)
    assert g.acquire(3, 2, [A], 0.0) == [Queued(3, 2, 2)]  # recalled already: once
    # Owner 1 was keeping its slot idle: it gives it back, the waiter gets it, not leased
    # (someone still waits); the last waiter's grant leases again.
    assert g.release(1, A) == [Grant(3, 1, A, lease=False)]
    assert g.release(2, A) == [Grant(3, 2, A, lease=True)]
    assert g.leasing(3) and g.held(3) == {A: 2}


def test_release_of_several_slots_at_once() -> None:
    g = Granter([(A, 3)], max_queue=10)
    for rid in range(3):
        g.acquire(1, rid, [A], 0.0)
    assert g.release(1, A, count=5) == []  # only what it holds
    assert g.held(1) == {} and g.statistics().backends[0].in_flight == 0


def test_backend_down_and_reconfigure_recall_leases() -> None:
    g = Granter([(A, 2), (B, 2)], max_queue=10)
    g.acquire(1, 1, [A], 0.0)
    assert g.report_health(B, False) == [Recall(1)]
    g.acquire(1, 2, [A], 0.0)
    assert g.reconfigure([(A, 2), (B, 2)], 10) == [Recall(1)]


def test_no_leases_without_a_queue() -> None:
    g = Granter([(A, 2)], max_queue=0)
    assert g.acquire(1, 1, [A], 0.0) == [Grant(1, 1, A, lease=False)]
    assert not g.leasing(1)


# -- fairness across keys ------------------------------------------------------------------------

F, L1, L2, L3 = "flood", "light1", "light2", "light3"


class Clients:
    """Requests of named keys on one backend A of one slot, and who holds the slot."""

    def __init__(self, g: Granter) -> None:
        self.g = g
        self.key_of: dict[tuple[int, int], str] = {}
        self.holder: Grant | None = None
        self.rid = 0

    def ask(self, owner: int, key: str) -> Output:
        self.rid += 1
        self.key_of[owner, self.rid] = key
        (first, *_) = self.g.acquire(owner, self.rid, [A], 0.0, key)
        if isinstance(first, Grant):
            self.holder = first
        return first

    def served(self, rounds: int) -> list[str]:
        """The request holding the slot ends ``rounds`` times in a row (giving the slot back
        naming its key unless it was leased); the keys of the grants that follow."""
        order = []
        for _ in range(rounds):
            h = self.holder
            assert h is not None
            key = None if h.lease else self.key_of[h.owner, h.rid]
            (self.holder,) = [o for o in self.g.release(h.owner, A, 1, key) if isinstance(o, Grant)]
            order.append(self.key_of[self.holder.owner, self.holder.rid])
        return order


def test_round_robin_a_flooder_delays_a_light_key_by_one_request() -> None:
    """One slot; a flooder with 50 waiting; 3 light keys with one each: each slot that frees
    goes to the next key in turn, and the flooder gets every slot nobody else wants."""
    c = Clients(Granter([(A, 1)], max_queue=100))
    assert isinstance(c.ask(1, F), Grant)
    assert all(isinstance(c.ask(1, F), Queued) for _ in range(50))
    positions = [c.ask(2, key) for key in (L1, L2, L3)]
    # The ring is flood, light1, light2, light3: a light key waits for one flooder request.
    assert [p.position for p in positions if isinstance(p, Queued)] == [2, 3, 4]
    assert c.served(10) == [F, L1, L2, L3, F, F, F, F, F, F]
    # A light key arriving now waits behind one flooder request again, not 43.
    assert plain([c.ask(3, L1)]) == [Queued(3, c.rid, 2)]
    assert c.served(4) == [F, L1, F, F]
    assert c.g.queue_depth == 50 - 7 - 3
    assert c.g.statistics().keys[0] == KeyLoad(F, 40, 1)


def test_per_key_queue_bound_refuses_key_busy_before_the_global_room() -> None:
    """max_queued_per_key < max_queue: the flooder is refused with key_busy at its own bound
    and cannot fill the global queue; a full global queue is busy for everyone."""
    g = Granter([(A, 1)], max_queue=4, max_queued_per_key=2)
    g.acquire(1, 0, [A], 0.0, F)
    assert isinstance(g.acquire(1, 1, [A], 0.0, F)[0], Queued)
    assert isinstance(g.acquire(1, 2, [A], 0.0, F)[0], Queued)
    assert plain(g.acquire(1, 3, [A], 0.0, F)) == [Refused(1, 3, "key_busy")]  # at once
    assert isinstance(g.acquire(2, 1, [A], 0.0, L1)[0], Queued)  # room left for the others
    assert isinstance(g.acquire(2, 2, [A], 0.0, L2)[0], Queued)
    assert plain(g.acquire(2, 3, [A], 0.0, L3)) == [Refused(2, 3, "busy")]  # global: full
    assert plain(g.acquire(1, 4, [A], 0.0, F)) == [Refused(1, 4, "key_busy")]  # its own first
    stats = g.statistics()
    assert (stats.refused_key_busy_total, stats.refused_busy_total) == (2, 1)
    g.cancel(1, 1)
    assert isinstance(g.acquire(1, 5, [A], 0.0, F)[0], Queued)  # a place of its own came free


def test_per_key_in_flight_bound_skips_the_key_until_its_slot_comes_back() -> None:
    g = Granter([(A, 3)], max_queue=10, max_in_flight_per_key=1)
    assert g.acquire(1, 1, [A], 0.0, F) == [Grant(1, 1, A, lease=False)]  # never leased
    assert plain(g.acquire(1, 2, [A], 0.0, F)) == [Queued(1, 2, 1)]  # a slot is free, but no
    assert plain(g.acquire(2, 1, [A], 0.0, L1)) == [Grant(2, 1, A)]  # it blocks nobody
    assert g.key_in_flight(F) == 1 and g.key_in_flight(L1) == 1
    assert plain(g.release(2, A, 1, L1)) == []  # a slot back, but not one of the flooder's
    assert plain(g.release(2, A, 1, F)) == []  # owner 2 holds nothing any more: ignored
    assert g.key_in_flight(F) == 1
    assert plain(g.release(1, A, 1, F)) == [Grant(1, 2, A)]  # its own slot back: its turn
    assert g.key_in_flight(F) == 1 and g.queue_depth == 0


def test_leased_slots_count_against_no_key() -> None:
    g = Granter([(A, 2)], max_queue=10)
    assert g.acquire(1, 1, [A], 0.0, F) == [Grant(1, 1, A, lease=True)]
    assert g.key_in_flight(F) == 0  # the owner may reuse it for any client, unseen
    g.acquire(1, 2, [A], 0.0, F)
    assert g.acquire(1, 3, [A], 0.0, F)[1:] == [Recall(1)]
    g.acquire(1, 4, [A], 0.0, L1)
    assert g.release(1, A) == [Grant(1, 3, A, lease=False)]  # someone still waits: counted
    assert g.key_in_flight(F) == 1 and g.statistics().keys == (KeyLoad(F, 0, 1), KeyLoad(L1, 1, 0))
    assert g.release(1, A) == [Grant(1, 4, A, lease=True)]  # the last waiter: leased
    assert g.key_in_flight(L1) == 0


def test_positions_follow_the_round_robin_and_never_grow_without_arrivals() -> None:
    g = Granter([(A, 1)], max_queue=20, position_interval=0.0)
    g.acquire(1, 0, [A], 0.0, F)
    told: dict[int, int] = {}

    def position(out: list[Output]) -> int:
        assert isinstance(out[0], Queued)
        return out[0].position

    for rid in range(1, 5):
        told[rid] = position(g.acquire(1, rid, [A], 0.0, F))
    assert told == {1: 1, 2: 2, 3: 3, 4: 4}
    # A light key pushes in at its round: after the flooder's head, before its second.
    told[10] = position(g.acquire(2, 10, [A], 0.0, L1))
    assert told[10] == 2
    now = 1.0
    for out in g.tick(now):
        assert isinstance(out, Queued)
        told[out.rid] = out.position
    assert told == {1: 1, 10: 2, 2: 3, 3: 4, 4: 5}
    last = dict(told)
    granted = []
    holder = 1
    while g.queue_depth:
        out = g.release(holder, A)
        (grant,) = [o for o in out if isinstance(o, Grant)]
        holder = grant.owner
        granted.append(grant.rid)
        told.pop(grant.rid)
        now += 1.0
        for o in g.tick(now):
            assert isinstance(o, Queued)
            told[o.rid] = o.position
        assert all(told[rid] <= last[rid] for rid in told)  # never more
        assert sorted(told.values()) == list(range(1, len(told) + 1))  # exact: 1..n
        last = dict(told)
    assert granted == [1, 10, 2, 3, 4]


def test_owner_death_gives_back_its_keys_slots() -> None:
    g = Granter([(A, 2)], max_queue=10, max_in_flight_per_key=1)
    g.acquire(1, 1, [A], 0.0, F)  # owner 1 holds the flooder's one slot
    g.acquire(2, 1, [A], 0.0, F)  # owner 2's flooder request: the key is full, it waits
    g.acquire(1, 2, [A], 0.0, L1)
    assert g.queue_depth == 1 and g.key_in_flight(F) == 1
    assert plain(g.owner_gone(1)) == [Grant(2, 1, A)]
    assert g.key_in_flight(F) == 1 and g.key_in_flight(L1) == 0 and g.held(2) == {A: 1}


def test_reconfigure_changes_the_per_key_bounds() -> None:
    g = Granter([(A, 4)], max_queue=10)
    g.acquire(1, 1, [A], 0.0, F)  # leased: nobody waits, no per-key bound
    assert g.leasing(1)
    assert g.reconfigure([(A, 4)], 10, max_queued_per_key=1, max_in_flight_per_key=1) == [Recall(1)]
    assert g.acquire(1, 2, [A], 0.0, F) == [Grant(1, 2, A, lease=False)]  # counted from now
    assert plain(g.acquire(1, 3, [A], 0.0, F)) == [Queued(1, 3, 1)]
    assert plain(g.acquire(1, 4, [A], 0.0, F)) == [Refused(1, 4, "key_busy")]
    g.acquire(2, 1, [A], 0.0, L1)
    # A lower queue bound keeps the waiters it promised a place; a higher in-flight bound
    # serves the ones it held back at once.
    assert plain(g.reconfigure([(A, 4)], 10, 0, 2)) == [Grant(1, 3, A)]
    assert g.key_in_flight(F) == 2 and g.max_queued_per_key == 0


def test_statistics_list_the_busiest_keys_and_sum_the_rest() -> None:
    g = Granter([(A, 1)], max_queue=100)
    g.acquire(1, 0, [A], 0.0, "k00")
    for n in range(1, 13):
        for rid in range(n if n < 12 else 1):
            g.acquire(1, n * 100 + rid, [A], 0.0, f"k{n:02d}")
    stats = g.statistics()
    assert [k.key for k in stats.keys] == [f"k{n:02d}" for n in range(11, 1, -1)]
    assert stats.keys[0] == KeyLoad("k11", 11, 0)
    assert stats.other_keys == KeyLoad("", 1 + 1, 0)  # k01 and k12 have one each
