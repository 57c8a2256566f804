"""The daemon-wide slot granter, as pure logic: events in, grants out."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.master.slotgrant import Grant, Granter, Output, Queued, Recall, Refused
from chatd.stats import backend_keys

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

_event = st.one_of(
    st.tuples(st.just("acquire"), st.integers(1, 3), st.sets(st.sampled_from(_KEYS), max_size=3)),
    st.tuples(st.just("release"), st.integers(1, 3), st.sampled_from(_KEYS)),
    st.tuples(st.just("cancel"), st.integers(1, 3), st.integers(0, 30)),
    st.tuples(st.just("gone"), st.integers(1, 3), st.none()),
    st.tuples(st.just("health"), st.sampled_from(_KEYS), st.booleans()),
    st.tuples(st.just("tick"), st.none(), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_event, max_size=80), st.integers(0, 4))
def test_invariants_hold_for_any_sequence(events: list[tuple[object, ...]], max_queue: int) -> None:
    """Cap, bookkeeping, one final answer per request, FIFO, nothing grantable left waiting,
    leases only while nobody waits and recalled as soon as someone does."""
    g = Granter(_BACKENDS, max_queue, position_interval=1.0)
    limits = dict(_BACKENDS)
    held: Counter[tuple[int, str]] = Counter()  # what each owner holds, from the grants seen
    open_: dict[tuple[int, int], frozenset[str]] = {}  # waiting requests and their allowed sets
    order: list[tuple[int, int]] = []  # waiting requests, in arrival order
    leasing: set[int] = set()  # owners whose last grant leased, not recalled since
    rid = 0
    now = 0.0
    for kind, a, b in events:
        now += 0.3
        out: list[Output] = []
        if kind == "acquire":
            rid += 1
            assert isinstance(a, int) and isinstance(b, set)
            out = g.acquire(a, rid, b, now)
            assert out[0].rid == rid and not isinstance(out[0], Recall)
            assert all(isinstance(o, Recall) for o in out[1:])
            if isinstance(out[0], Queued):
                open_[a, rid] = frozenset(b)
                order.append((a, rid))
                assert out[0].position == len(order)
        elif kind == "release":
            assert isinstance(a, int) and isinstance(b, str)
            out = g.release(a, b)
            if held[a, b] > 0:
                held[a, b] -= 1
            else:
                assert out == []
        elif kind == "cancel":
            assert isinstance(a, int) and isinstance(b, int)
            out = g.cancel(a, b)
            if (a, b) in open_:
                del open_[a, b]
                order.remove((a, b))
        elif kind == "gone":
            assert isinstance(a, int)
            out = g.owner_gone(a)
            leasing.discard(a)
            for key in [k for k in held if k[0] == a]:
                del held[key]
            for key in [k for k in open_ if k[0] == a]:
                del open_[key]
                order.remove(key)
        elif kind == "health":
            assert isinstance(a, str) and isinstance(b, bool)
            out = g.report_health(a, b)
        else:
            out = g.tick(now)
        for o in out:
            if isinstance(o, Grant):
                if (o.owner, o.rid) in open_:  # an answer to a waiter
                    assert o.backend in open_.pop((o.owner, o.rid))
                    order.remove((o.owner, o.rid))
                held[o.owner, o.backend] += 1
                assert o.lease == (not open_ and max_queue > 0), o  # lease iff nobody waits
                (leasing.add if o.lease else leasing.discard)(o.owner)
            elif isinstance(o, Recall):
                assert o.owner in leasing
                leasing.remove(o.owner)
            elif isinstance(o, Refused) and (o.owner, o.rid) in open_:
                del open_[o.owner, o.rid]
                order.remove((o.owner, o.rid))
            elif isinstance(o, Queued) and kind != "acquire":
                assert (o.owner, o.rid) in open_ and o.position == order.index((o.owner, o.rid)) + 1
        stats = g.statistics()
        by_key = {s.key: s for s in stats.backends}
        for key, limit in limits.items():
            in_flight = sum(n for (_, k), n in held.items() if k == key)
            assert by_key[key].in_flight == in_flight <= limit  # the cap, and exact counts
        assert stats.queue_depth == len(open_) <= max(max_queue, 0)
        assert all(g.leasing(owner) == (owner in leasing) for owner in (1, 2, 3))
        if open_:
            assert not leasing, "someone waits while an owner may still keep idle slots"
        # Nothing left waiting could be granted now (the granting pass is complete).
        for allowed in open_.values():
            assert not any(
                k in allowed and by_key[k].healthy is not False and by_key[k].in_flight < limits[k]
                for k in _KEYS
            )
            assert any(k in allowed and by_key[k].healthy is not False for k in _KEYS)


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
