"""The client's seq bookkeeping: resume from the contiguous end, hand each event over once."""

from __future__ import annotations

from chatd.client.session import SessionState


def session(last_seq: int = 0) -> SessionState:
    return SessionState(None, last_seq, None, True, False, 1.0, 10.0, 30.0)


def test_in_order_seqs_advance_last_seq() -> None:
    """1, 2, 3 arrive in order: each handed over, last_seq 3, nothing pending."""
    s = session()
    assert [s._stored(n) for n in (1, 2, 3)] == [True, True, True]
    assert s._last_seq == 3 and s._gap_since is None


def test_a_gap_holds_last_seq_until_it_is_filled() -> None:
    """2 is stored elsewhere and not heard of: last_seq stays 1 while 3, 4 arrive, so a resume
    asks for everything after 1; the replay's 3 and 4 are dropped, 2 is handed over."""
    s = session()
    assert s._stored(1)
    assert s._stored(3) and s._stored(4)
    assert s._last_seq == 1 and s._gap_since is not None
    # the replay after a resume from last_seq 1
    assert s._stored(2) is True
    assert s._stored(3) is False and s._stored(4) is False
    assert s._last_seq == 4 and s._gap_since is None
    assert s._stats.duplicates_dropped == 2


def test_seqs_at_or_below_last_seq_are_duplicates() -> None:
    """A resumed client (last_seq 5) drops a replayed 5 and hands over 6."""
    s = session(5)
    assert s._stored(5) is False and s._stored(6) is True and s._last_seq == 6
