"""When the client tries again: jittered exponential backoff, and the server's Retry-After.

Pure functions (the randomness aside), so the policy is readable in one place and testable.
"""

from __future__ import annotations

import email.utils
import random
import time


def parse_retry_after(value: str | None) -> float:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); 0 if absent."""
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return 0.0
    return min(max(seconds, 0.0), 3600.0)


def next_delay(
    attempt: int, initial: float, max_delay: float, immediate: bool, retry_after: float
) -> float:
    """Seconds to wait before connection attempt ``attempt + 1`` (``attempt`` 0 is the first
    retry).

    ``immediate`` (the server said it is going away, 1001): a random moment within ``initial``,
    which spreads a herd of clients without keeping them away. Else full-range jitter on
    ``initial * 2**attempt``, capped at ``max_delay``: between half of it and all of it. Never
    less than the server's ``retry_after``, itself jittered up by at most 20 %.
    """
    if immediate:
        delay = random.uniform(0.0, initial)
    else:
        base = min(max_delay, initial * 2.0 ** min(attempt, 32))
        delay = base * random.uniform(0.5, 1.0)
    return max(delay, retry_after * random.uniform(1.0, 1.2))
