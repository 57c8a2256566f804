"""chatd.client.backoff: the reconnect delays and the server's Retry-After."""

from __future__ import annotations

import email.utils
import time

from chatd.client.backoff import next_delay, parse_retry_after


def test_retry_after_seconds_dates_and_garbage() -> None:
    assert parse_retry_after(None) == 0.0 and parse_retry_after("") == 0.0
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("999999") == 3600.0  # capped: a server cannot park a client for days
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25.0 <= parse_retry_after(later) <= 30.0
    assert parse_retry_after("tomorrow-ish") == 0.0


def test_exponential_with_jitter_and_a_cap() -> None:
    for attempt in range(40):
        base = min(10.0, 0.5 * 2.0**attempt)
        for _ in range(20):
            d = next_delay(attempt, 0.5, 10.0, False, 0.0)
            assert base * 0.5 <= d <= base


def test_going_away_comes_back_within_initial_and_retry_after_wins() -> None:
    for _ in range(50):
        assert 0.0 <= next_delay(9, 0.5, 10.0, True, 0.0) <= 0.5
        assert 4.0 <= next_delay(0, 0.5, 10.0, False, 4.0) <= 4.8
