"""Counters and latency histograms that merge across workers.

A :class:`Histogram` counts observations in fixed log-spaced buckets (about 4.5% wide, from
10 µs to ~20 min), so merging two is adding their counts and a percentile is accurate to
a bucket's width whatever the number of observations. Workers send ``Histogram.counts``
to the master in their ``stats`` message; the master merges them for ``chatctl status`` and
``/metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_BASE = 0.01  # ms: the lower edge of bucket 0
_GROWTH = 1.045
_LOG_GROWTH = math.log(_GROWTH)
_BUCKETS = 420  # _BASE * _GROWTH**420 ~ 1.1e6 ms


def bucket_of(ms: float) -> int:
    """The index of the bucket holding ``ms`` (clamped to the first and last bucket)."""
    if ms <= _BASE:
        return 0
    return min(_BUCKETS - 1, int(math.log(ms / _BASE) / _LOG_GROWTH) + 1)


def bucket_upper_ms(index: int) -> float:
    """The upper edge of bucket ``index`` in milliseconds."""
    return _BASE * _GROWTH**index


class Histogram:
    """A mergeable latency histogram in milliseconds."""

    __slots__ = ("count", "counts", "total_ms")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total_ms = 0.0

    def observe(self, ms: float) -> None:
        """Count one observation of ``ms`` milliseconds."""
        b = bucket_of(ms)
        self.counts[b] = self.counts.get(b, 0) + 1
        self.count += 1
        self.total_ms += ms

    def merge(self, counts: Mapping[int, int], total_ms: float = 0.0) -> None:
        """Add another histogram's bucket counts (as sent over the control channel)."""
        for b, n in counts.items():
            self.counts[int(b)] = self.counts.get(int(b), 0) + n
            self.count += n
        self.total_ms += total_ms

    def percentile(self, p: float) -> float:
        """The upper edge of the bucket holding the ``p``-th percentile (0 when empty)."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(self.count * p / 100.0))
        seen = 0
        for b in sorted(self.counts):
            seen += self.counts[b]
            if seen >= rank:
                return round(bucket_upper_ms(b), 3)
        return round(bucket_upper_ms(max(self.counts)), 3)  # pragma: no cover - unreachable

    def summary(self) -> dict[str, float]:
        """``{"p50", "p95", "p99", "avg"}`` in milliseconds."""
        avg = self.total_ms / self.count if self.count else 0.0
        return {
            "p50": self.percentile(50),
            "p95": self.percentile(95),
            "p99": self.percentile(99),
            "avg": round(avg, 3),
        }

    def cumulative(self, bounds_ms: Iterable[float]) -> list[tuple[float, int]]:
        """Counts of observations <= each bound (bucket resolution), for Prometheus ``le``."""
        out = []
        ordered = sorted(self.counts.items())
        for bound in bounds_ms:
            out.append((bound, sum(n for b, n in ordered if bucket_upper_ms(b) <= bound * _GROWTH)))
        return out


def backend_keys(urls: Iterable[str]) -> tuple[str, ...]:
    """The granter's names for backends given by URL: the URL without a trailing slash, and
    ``#2``, ``#3``... appended to repeats (two tables for one server are two slot pools)."""
    keys: list[str] = []
    for url in urls:
        base = key = url.rstrip("/")
        n = 1
        while key in keys:
            n += 1
            key = f"{base}#{n}"
        keys.append(key)
    return tuple(keys)


@dataclass(frozen=True, slots=True)
class BackendSlots:
    """One backend as the granter sees it."""

    key: str
    max_parallel: int
    in_flight: int
    healthy: bool | None  # None: no worker has reported it yet
    configured: bool  # False: dropped by a reload, waiting for its last slots to come back


@dataclass(frozen=True, slots=True)
class GranterStats:
    """A snapshot for ``chatctl status`` and ``/metrics``."""

    backends: tuple[BackendSlots, ...]
    queue_depth: int
    max_queue: int
    granted_total: int
    queued_total: int
    refused_busy_total: int
    refused_unavailable_total: int
