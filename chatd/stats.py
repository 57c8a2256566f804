"""Counters and latency histograms that merge across workers.

A :class:`Histogram` counts observations in fixed log-spaced buckets (at most 4.5% wide, from
10 µs to ~20 min), so merging two is adding their counts and a percentile is accurate to
a bucket's width whatever the number of observations. Workers send ``Histogram.counts``
to the master in their ``stats`` message; the master merges them for ``chatctl status`` and
``/metrics``.

The ``le`` bounds that ``/metrics`` exports (:data:`EXACT_EDGES_MS`) are bucket edges
themselves, so their cumulative counts are exact (see :data:`_EDGES` for why).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

_BASE = 0.01  # ms: the upper edge of bucket 0
_GROWTH = 1.045
_LOG_BUCKETS = 420  # _BASE * _GROWTH**419 ~ 1.0e6 ms

EXACT_EDGES_MS: tuple[float, ...] = (
    *(0.1, 0.25, 0.5, 1.0, 2.5),  # below Prometheus' defaults: the stages and the loop's lag
    *(5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0),
    *(1000.0, 2500.0, 5000.0, 10_000.0, 30_000.0, 60_000.0, 120_000.0, 300_000.0),
)
"""Bucket edges that :meth:`Histogram.cumulative` counts exactly: the ``le`` bounds of
``/metrics`` (Prometheus' default buckets, extended down to the tenths of a millisecond a
message's stages and the event loop's lag are measured in, and up to the minutes a model load
or a long reply can take), in ms."""

_EDGES: tuple[float, ...] = tuple(
    sorted({_BASE * _GROWTH**i for i in range(_LOG_BUCKETS)} | set(EXACT_EDGES_MS))
)
"""Upper edges of the buckets: bucket ``i`` holds ``(_EDGES[i-1], _EDGES[i]]`` (the first also
everything below, the last everything above). The log-spaced edges, plus the exported ones.

Why the exported ``le`` bounds are inserted as edges, rather than mapped onto the nearest
log-spaced edge (as before: a 5.1 ms reply was counted under ``le="0.005"``, up to 4.5% off)
or kept in separate exact counters: an observation is then on one side of every exported
bound by a plain comparison (``bisect``), so the exported counts are exact by construction;
the wire form and the merge across workers stay what they were (bucket index -> count, added
up); no second set of counters can drift from the first; percentiles only gain (15 buckets
get narrower). Every process of a daemon runs the same code (workers are forks of the
master), so bucket indexes mean the same thing in every report the master merges."""


def bucket_of(ms: float) -> int:
    """The index of the bucket holding ``ms``: the first edge >= ``ms`` (clamped to the last)."""
    return min(bisect_left(_EDGES, ms), len(_EDGES) - 1)


def _clamp(index: int) -> int:
    """A bucket index from a report, clamped to the buckets that exist (a malformed report
    must not break a percentile or /metrics)."""
    return max(0, min(index, len(_EDGES) - 1))


def bucket_upper_ms(index: int) -> float:
    """The upper edge of bucket ``index`` in milliseconds (``index`` clamped)."""
    return _EDGES[_clamp(index)]


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

    @classmethod
    def from_wire(cls, pairs: Any, sum_ms: Any) -> Histogram:
        """A Histogram from a report's ``[[bucket, count], ...]`` and sum in ms; empty when
        malformed (a bad report must not break a percentile or /metrics)."""
        h = cls()
        try:
            counts = {int(b): int(n) for b, n in (pairs or ())}
            number = isinstance(sum_ms, int | float) and not isinstance(sum_ms, bool)
            total = float(sum_ms) if number else 0.0
        except (TypeError, ValueError):
            return h
        h.merge(counts, total)
        return h

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
        """Exact counts of observations <= each bound, for Prometheus ``le``.

        Raises:
            ValueError: a bound is not a bucket edge (use :data:`EXACT_EDGES_MS`): its count
                could only be approximated.
        """
        out = []
        for bound in bounds_ms:
            index = bisect_left(_EDGES, bound)
            if index == len(_EDGES) or _EDGES[index] != bound:
                raise ValueError(f"{bound} ms is not a bucket edge")
            below = sum(n for b, n in self.counts.items() if _clamp(b) <= index)
            out.append((bound, below))
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
class KeyLoad:
    """One client key as the granter sees it (the key is a hash or an address, never a
    secret): requests waiting, and slots counted against it (granted, not leased)."""

    key: str
    queued: int
    in_flight: int


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
    held: Mapping[int, Mapping[str, int]] = field(default_factory=dict)
    """Owner (the master: a worker's pid) -> backend key -> slots it holds, in use or leased."""
    refused_key_busy_total: int = 0
    keys: tuple[KeyLoad, ...] = ()
    """The busiest client keys (at most 10), by ``queued + in_flight``, busiest first."""
    other_keys: KeyLoad = KeyLoad("", 0, 0)
    """The other keys' figures, summed (its ``key`` is empty)."""

    def usage(self, reports: Mapping[int, Any]) -> dict[str, tuple[int, int]]:
        """Split each backend's granted slots (``in_flight``) into ``(in_use, leased_idle)``.

        Args:
            reports: owner -> the ``backends`` list of its last ``stats`` report, one
                ``{url, in_flight, held}`` per backend of its configuration, in order
                (``in_flight``: slots in use there; ``held``: in use or kept unused).

        A worker keeps a leased slot without telling the master when it uses it or stops
        using it (that is the point of a lease: no message per request), so the split is
        worked out per owner from the master's exact holdings and the owner's last report,
        which is up to one report interval (1 s) old:

        * the slots its report showed kept unused are leased idle, less the ones it has given
          back since (what a worker gives back unasked is what it kept unused: the idle trim,
          a recall);
        * every other slot it holds is in use: slots granted since its report answer requests
          that wait for them. Without a usable report, every slot held is in use.

        So for every backend ``in_use + leased_idle == in_flight``. A slot shows as in use for
        at most one report interval after its last use, and a kept slot reused without asking
        shows as idle for as long; a malformed report counts as none.
        """
        in_use = {b.key: b.in_flight for b in self.backends}
        idle = dict.fromkeys(in_use, 0)
        for owner, holdings in self.held.items():
            reported = _reported_idle(reports.get(owner))
            for key, held in holdings.items():
                if key not in in_use:
                    continue
                kept, then_held = reported.get(key, (0, 0))
                given_back = max(0, then_held - held)
                n = min(held, max(0, kept - given_back))
                idle[key] += n
                in_use[key] -= n
        return {key: (in_use[key], idle[key]) for key in in_use}


def _reported_idle(report: Any) -> dict[str, tuple[int, int]]:
    """A worker's ``backends`` report as backend key -> (slots kept unused, slots held)."""
    if not isinstance(report, list | tuple):
        return {}
    rows = [r for r in report if isinstance(r, Mapping) and isinstance(r.get("url"), str)]
    out: dict[str, tuple[int, int]] = {}
    for key, row in zip(backend_keys(r["url"] for r in rows), rows, strict=True):
        busy, held = _count(row.get("in_flight")), _count(row.get("held"))
        if busy is not None and held is not None:
            out[key] = (max(0, held - busy), held)
    return out


def _count(value: Any) -> int | None:
    """A reported count, or None for anything that is not a non-negative integer."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
