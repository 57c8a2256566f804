"""The granter with backends from DNS: each address a backend of its own, an address that
disappears drained (its slots in flight finish, no new one), and waiters allowed the new
addresses their worker learns of (Granter.allow)."""

from __future__ import annotations

from chatd.master.slotgrant import Grant, Granter, Output, Queued, Recall, Refused

A, B, C = "http://10.0.0.5:11434", "http://10.0.0.6:11434", "http://10.0.0.7:11434"


def grants(out: list[Output]) -> list[tuple[int, int, str]]:
    return [(o.owner, o.rid, o.backend) for o in out if isinstance(o, Grant)]


def test_a_gone_address_is_drained_then_forgotten() -> None:
    g = Granter([(A, 2), (B, 2)], max_queue=10)
    for rid in range(4):
        g.acquire(1, rid, [A, B], 0.0)
    assert g.held(1) == {A: 2, B: 2}
    out = g.reconfigure([(B, 2)], 10)  # A's address disappeared
    assert not grants(out)
    rows = {b.key: (b.in_flight, b.configured) for b in g.statistics().backends}
    assert rows == {A: (2, False), B: (2, True)}  # A drains: shown, not configured
    assert [o for o in g.acquire(2, 1, [A, B], 0.0) if not isinstance(o, Recall)] == [
        Queued(2, 1, 1)
    ]  # A's freed capacity is not granted: A is full as far as anyone knows, B too
    assert not grants(g.release(1, A))  # A's request ends: no new request for A
    assert grants(g.release(1, B)) == [(2, 1, B)]
    g.release(1, A)
    assert [b.key for b in g.statistics().backends] == [B]  # drained: forgotten
    # The requests in flight to A were never more than its cap, and never revoked.


def test_waiters_of_a_worker_may_use_the_addresses_it_learns_of() -> None:
    """A queued request allowed only A waits; its worker learns of C (allow), the master
    configures C: the waiter gets C at once, before any slot of A frees."""
    g = Granter([(A, 1)], max_queue=10)
    g.acquire(1, 1, [A], 0.0)
    assert [o for o in g.acquire(1, 2, [A], 0.0) if isinstance(o, Queued)] == [Queued(1, 2, 1)]
    assert g.acquire(2, 1, [A], 0.0)[0] == Queued(2, 1, 2)
    assert g.allow(1, [C]) == []  # C is not configured yet: nothing to grant
    assert grants(g.reconfigure([(A, 1), (C, 1)], 10)) == [(1, 2, C)]
    assert g.queue_depth == 1  # owner 2 did not learn of C (yet): it waits for A


def test_an_address_replaced_by_another_strands_no_waiter() -> None:
    """A pod restarted with a new address: the set goes from {A} to {B}. The worker learns
    of B before the master drops A, so its waiter is granted B, not refused."""
    g = Granter([(A, 1)], max_queue=10)
    g.acquire(1, 1, [A], 0.0)
    g.acquire(1, 2, [A], 0.0)
    g.allow(1, [B])
    out = g.reconfigure([(B, 1)], 10)
    assert grants(out) == [(1, 2, B)] and not [o for o in out if isinstance(o, Refused)]


def test_no_address_left_refuses_the_waiters_unavailable() -> None:
    g = Granter([(A, 1)], max_queue=10)
    g.acquire(1, 1, [A], 0.0)
    g.acquire(1, 2, [A], 0.0)
    out = g.reconfigure([], 10)
    assert [o for o in out if isinstance(o, Refused)] == [Refused(1, 2, "unavailable")]
    assert [o for o in g.acquire(1, 3, [A], 0.0)] == [Refused(1, 3, "unavailable")]
    assert g.held(1) == {A: 1}  # the request in flight goes on
