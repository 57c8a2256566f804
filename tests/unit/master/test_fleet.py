"""The fleet's slots, the master's rules (chatd.master.fleet.FleetPools) over real granters.

The pool's answers are written by hand here (the Redis side has tests of its own:
tests/component/store/test_redis_slots.py); what is checked is what the master does with
them: nothing granted before the first answer, a limit that rises only with an answer, what a
sync asks (``hold`` never below what the granter may fill meanwhile), when the next sync is
due, the give-back once a lowered limit's slots come back, the leases recalled while another
host is short, every limit at 0 once no sync was answered for the TTL, a dropped backend's
holding given back, and the granters' own caps again when the store stops being Redis.
"""

from __future__ import annotations

import pytest

from chatd.master.fleet import _answers
from chatd.master.fleetpools import MIN_GAP, POLL, RENEW, TTL, FleetPools
from chatd.master.slotgrant import Grant, Granter, Queued, Recall
from chatd.proto import control as proto

A, B = "http://a", "http://b"
CHAT, EMBED = proto.SLOT_CLASS_CHAT, proto.SLOT_CLASS_EMBED


def granters(max_parallel: int = 4) -> dict[str, Granter]:
    return {
        CHAT: Granter([(A, max_parallel)], max_queue=10),
        EMBED: Granter([(A, 2)], max_queue=10),
    }


def answer(count: int, allowed: int, hungry: int = 0) -> tuple[int, int, int, int, int, int]:
    return (count, allowed, count, 0, 1, hungry)


def test_nothing_is_granted_before_the_first_answer_and_the_limit_rises_with_it() -> None:
    g = granters()
    fleet = FleetPools(g)
    assert g[CHAT].acquire(1, 1, [A], 0.0) == [Queued(1, 1, 1)]
    assert fleet.due() == float("-inf")  # never synced: at once
    asks = fleet.asks(0.0)
    # chat: max 4, want 1 (a waiter), hold 0, busy 0; embed: nothing needed.
    assert sorted(asks) == [(CHAT, A, 4, 1, 0, 0), (EMBED, A, 2, 0, 0, 0)]
    assert fleet.due() == 1.0  # under way: its answer's deadline
    chat_first = [answer(2, 2) if a[0] == CHAT else answer(1, 1) for a in asks]
    out = fleet.answered(asks, chat_first)
    assert [(o.rid, o.backend) for o in out[CHAT] if isinstance(o, Grant)] == [(1, A)]
    assert fleet.pools[(CHAT, A)].valid_until == TTL  # from when the sync was sent
    # The granter now grants 2 in all (its limit), then queues.
    assert isinstance(g[CHAT].acquire(1, 2, [A], 0.0)[0], Grant)
    assert g[CHAT].acquire(1, 3, [A], 0.0)[0] == Queued(1, 3, 1)


def test_a_sync_holds_what_the_granter_may_fill_meanwhile() -> None:
    g = granters()
    fleet = FleetPools(g)
    asks = fleet.asks(0.0)
    fleet.answered(asks, [answer(3, 3)] * len(asks))
    g[CHAT].acquire(1, 1, [A], 0.0)  # one in flight, limit 3
    chat = next(a for a in fleet.asks(1.0) if a[0] == CHAT)
    assert chat == (CHAT, A, 4, 1, 3, 1)  # hold = the limit (3), not what is in use (1)


def test_when_the_next_sync_is_due() -> None:
    g = granters()
    fleet = FleetPools(g)
    asks = fleet.asks(0.0)
    fleet.answered(asks, [answer(1, 1)] * len(asks))
    assert fleet.due() == RENEW  # nothing needed: a renewal
    g[CHAT].acquire(1, 1, [A], 0.1)  # granted: the spare
    g[CHAT].acquire(1, 2, [A], 0.1)  # waits: the need (2) grew past the limit (1)
    assert fleet.due() == MIN_GAP
    asks = fleet.asks(0.1)
    fleet.answered(asks, [answer(1, 1, hungry=0)] * len(asks))  # no more for us: short
    assert fleet.due() == pytest.approx(0.1 + POLL)


def test_a_lowered_limit_gives_back_once_its_slots_come_back() -> None:
    g = granters()
    fleet = FleetPools(g)
    asks = fleet.asks(0.0)
    fleet.answered(asks, [answer(4, 4)] * len(asks))
    for rid in range(4):
        g[CHAT].acquire(1, rid, [A], 0.0)
    assert g[CHAT].needs()[A] == (4, 4, 0, True)
    asks = fleet.asks(0.1)
    # Another host needs slots: this host may use 2, still holds its 4 (in use).
    out = fleet.answered(
        asks, [answer(4, 2, hungry=1) if a[0] == CHAT else answer(1, 1) for a in asks]
    )
    assert any(isinstance(o, Recall) for o in out[CHAT])  # the leases: idle ones come back
    assert fleet.due() == pytest.approx(0.1 + POLL)  # nothing to give back yet (4 in use)
    g[CHAT].release(1, A, 1)
    assert fleet.due() == pytest.approx(0.1 + MIN_GAP)  # one to give back: soon
    chat = next(a for a in fleet.asks(0.15) if a[0] == CHAT)
    assert chat[4] == 3  # hold: the 3 still in use (above the limit of 2)
    g[CHAT].release(1, A, 1)
    assert g[CHAT].acquire(1, 9, [A], 0.2) == [Queued(1, 9, 1)]  # 2 in use = the limit


def test_a_limit_drops_to_zero_when_its_pool_is_not_renewed_for_the_ttl() -> None:
    g = granters()
    fleet = FleetPools(g)
    asks = fleet.asks(0.0)
    fleet.answered(asks, [answer(2, 2)] * len(asks))
    assert fleet.lapsed(TTL - 0.01) == {}
    assert fleet.next_event(0.1) == RENEW
    asks = fleet.asks(RENEW)
    # Only the chat pool answers (the embed pool's Cluster node is down, say).
    fleet.answered(asks, [answer(2, 2) if a[0] == CHAT else None for a in asks])
    assert fleet.next_event(RENEW + 0.01) == 2 * RENEW  # the renewal first, then TTL
    out = fleet.lapsed(TTL)
    assert list(out) == [EMBED]  # the chat pool was renewed at RENEW: it keeps its limit
    assert g[EMBED].acquire(1, 1, [A], TTL)[0] == Queued(1, 1, 1)
    assert isinstance(g[CHAT].acquire(1, 2, [A], TTL)[0], Grant)
    assert fleet.lapsed(TTL + 0.1) == {}  # once
    fleet.asks(TTL + 0.1)
    fleet.failed()  # then Redis is down: no answer at all
    assert list(fleet.lapsed(RENEW + TTL)) == [CHAT]
    assert fleet.next_event(RENEW + TTL) < RENEW + TTL + 1  # a sync, no lapsed timer left


def test_what_is_due_is_worked_out_again_only_after_an_event() -> None:
    """The master's loop asks every turn: the answer is cached until a granter or the syncs
    change, and then follows at once (a waiter makes a sync due MIN_GAP after the last)."""
    g = granters()
    fleet = FleetPools(g)
    asks = fleet.asks(0.0)
    fleet.answered(asks, [answer(1, 1)] * len(asks))
    assert fleet.next_event(0.001) == RENEW
    calls = 0
    needs = g[CHAT].needs

    def counted() -> dict[str, tuple[int, int, int, bool]]:
        nonlocal calls
        calls += 1
        return needs()

    g[CHAT].needs = counted  # type: ignore[method-assign]
    for _ in range(100):
        assert fleet.next_event(0.002) == RENEW
    assert calls == 0
    g[CHAT].acquire(1, 1, [A], 0.003)  # the spare
    g[CHAT].acquire(1, 2, [A], 0.003)  # waits: the need grew past the limit
    assert fleet.next_event(0.003) == MIN_GAP
    assert calls == 1


def test_requests_refused_busy_count_as_need() -> None:
    """With max_queue = 0 nothing waits: the requests refused busy since the last sync are
    the need the queue does not show, and make a sync due at once."""
    g = {CHAT: Granter([(A, 4)], max_queue=0), EMBED: Granter([(A, 2)], max_queue=0)}
    fleet = FleetPools(g)
    asks = fleet.asks(0.0)
    fleet.answered(asks, [answer(1, 1)] * len(asks))
    assert isinstance(g[CHAT].acquire(1, 1, [A], 0.1)[0], Grant)
    assert g[CHAT].acquire(1, 2, [A], 0.1)[0].reason == "busy"  # type: ignore[union-attr]
    assert g[CHAT].acquire(1, 3, [A], 0.1)[0].reason == "busy"  # type: ignore[union-attr]
    assert fleet.due() == MIN_GAP
    fleet.postpone(0.1)  # no worker to ask: the need waits for the next sync
    assert fleet.due() == 0.1 + MIN_GAP
    chat = next(a for a in fleet.asks(0.12) if a[0] == CHAT)
    assert chat[3] == 3  # want: 1 in flight + 2 refused
    fleet.answered([chat], [answer(3, 3)])
    assert next(a for a in fleet.asks(0.7) if a[0] == CHAT)[3] == 1  # counted once


def test_a_backend_dropped_and_added_again_gets_its_limit_back() -> None:
    g = granters()
    fleet = FleetPools(g)
    asks = fleet.asks(0.0)
    fleet.answered(asks, [answer(2, 2)] * len(asks))
    g[CHAT].reconfigure([], 10)  # A dropped (nothing in flight: forgotten)...
    g[CHAT].reconfigure([(A, 4)], 10)  # ...and back, at limit 0, before any refresh
    assert g[CHAT].acquire(1, 1, [A], 0.1)[0] == Queued(1, 1, 1)
    asks = fleet.asks(0.1)
    out = fleet.answered(asks, [answer(2, 2)] * len(asks))  # the same answer as before
    assert [(o.rid, o.backend) for o in out[CHAT] if isinstance(o, Grant)] == [(1, A)]


def test_a_dropped_backend_gives_its_holding_back_then_is_forgotten() -> None:
    g = granters()
    fleet = FleetPools(g)
    asks = fleet.asks(0.0)
    fleet.answered(asks, [answer(2, 2)] * len(asks))
    for granter in g.values():
        granter.reconfigure([(B, 4)], 10)  # A dropped (nothing in flight: forgotten)
    asks = fleet.asks(1.0)
    assert (CHAT, A, 0, 0, 0, 0) in asks and (CHAT, B, 4, 0, 0, 0) in asks
    fleet.answered(asks, [answer(0, 0) if a[1] == A else answer(1, 1) for a in asks])
    fleet.due()
    assert {key for _, key in fleet.pools} == {B}


def test_the_granters_caps_come_back_when_the_store_is_no_longer_redis() -> None:
    g = granters(max_parallel=2)
    fleet = FleetPools(g)
    assert g[CHAT].acquire(1, 1, [A], 0.0) == [Queued(1, 1, 1)]
    out = fleet.release_all()
    assert [(o.rid, o.backend) for o in out[CHAT] if isinstance(o, Grant)] == [(1, A)]
    assert isinstance(g[CHAT].acquire(1, 2, [A], 0.0)[0], Grant)
    assert g[CHAT].acquire(1, 3, [A], 0.0)[0] == Queued(1, 3, 1)  # its own max_parallel


def test_malformed_answers_are_refused() -> None:
    assert _answers([[1, 1, 1, 0, 1, 0]], 1) == [(1, 1, 1, 0, 1, 0)]
    assert _answers([[1, 1, 1, 0, 1]], 1) is None
    assert _answers([[1, 1, 1, 0, 1, "x"]], 1) is None
    assert _answers([[1, 1, 1, 0, 1, True]], 1) is None
    assert _answers([], 1) is None
    assert _answers(None, 0) is None


def test_the_fleet_is_on_with_a_redis_store_only_and_its_log_line_hides_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On with a Redis store (its limits 0 until an answer), its password never in the
    journal; off again (a reload to SQLite): the granters' own caps, the waiters granted."""
    from chatd.master.fleet import Fleet
    from tests.unit.master.test_discovery import FakeWorkers

    g = granters(max_parallel=2)
    sent: list[tuple[str, list[object]]] = []
    caplog.set_level("INFO", logger="chatd.master")
    fleet = Fleet(
        "redis://:sekrit@10.0.0.5:6379/0",
        FakeWorkers(),  # type: ignore[arg-type]
        g,
        lambda out, kind: sent.append((kind, list(out))),
    )
    assert fleet.status() is not None
    assert "redis://:***@10.0.0.5:6379/0" in caplog.text and "sekrit" not in caplog.text
    assert g[CHAT].acquire(1, 1, [A], 0.0) == [Queued(1, 1, 1)]  # nothing before an answer
    fleet.configure("sqlite:///var/lib/chatd/sessions.db")
    assert fleet.status() is None
    assert [(k, o.rid) for k, out in sent for o in out if isinstance(o, Grant)] == [(CHAT, 1)]
