"""Pure statistics for ``chatd-bench``: percentiles, summaries, histograms, rates, timelines.

Nothing here does I/O or reads a clock: every function takes numbers and returns numbers, so
each is unit-tested on known inputs (``tests/unit/bench/test_stats.py``).

Latency without coordinated omission
------------------------------------
The load is *open loop*: message ``k`` of a run has an **intended** send time fixed before the
run starts (a uniform schedule at the offered rate). Every latency is measured from that
intended time, not from the moment the client managed to send the frame. When the server
stalls for ``S`` seconds, every message scheduled during the stall is charged the time it
waited in the queue, exactly as a user arriving then would see it; a closed-loop tester (or
one that timed from the actual send) would send fewer messages during the stall and record
one slow sample among many fast ones (Gil Tene's "coordinated omission", corrected as wrk2
does). :func:`latencies_from_intended` is that computation.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Bucket upper bounds (ms) of the seed report's "Response Time Distribution" table.
SEED_BUCKETS_MS: tuple[float, ...] = (100.0, 200.0, 300.0, 500.0, 1000.0)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 < q <= 100) by nearest rank of an already sorted sequence.

    Nearest rank: the smallest value such that at least ``q`` % of the values are <= it (so
    p100 is the maximum and every result is an observed value). ``nan`` when empty.
    """
    if not 0 < q <= 100:
        raise ValueError("q must be in (0, 100]")
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(len(sorted_values) * q / 100.0))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summary(values: Iterable[float]) -> dict[str, float]:
    """``count``, ``mean``, ``p50``, ``p95``, ``p99`` and ``max`` of latencies in ms (rounded
    to µs). Only ``count`` (0) for no values."""
    v = sorted(values)
    if not v:
        return {"count": 0}
    return {
        "count": len(v),
        "mean": round(statistics.fmean(v), 3),
        "p50": round(percentile(v, 50), 3),
        "p95": round(percentile(v, 95), 3),
        "p99": round(percentile(v, 99), 3),
        "max": round(v[-1], 3),
    }


def latencies_from_intended(
    intended: Sequence[float], done: Sequence[float | None]
) -> list[float | None]:
    """Milliseconds from each message's intended send time to its completion (seconds in,
    ms out); None where the message never completed. Sequences are aligned by index.

    Because the start is the *intended* time, a message that sat in a client or server queue
    behind a stall carries that wait: a stall of S seconds adds up to S to every message
    scheduled during it, not just to the first one.
    """
    if len(intended) != len(done):
        raise ValueError("intended and done must have the same length")
    return [None if d is None else (d - t) * 1000.0 for t, d in zip(intended, done, strict=True)]


def histogram(values: Iterable[float], bounds: Sequence[float]) -> list[tuple[str, int]]:
    """Counts of ``values`` per bucket: ``< b0``, ``b0-b1``, … , ``>= b_last``.

    A value equal to a bound goes to the bucket above it (``[lo, hi)``). Labels are in the
    unit of ``bounds`` (``"<100"``, ``"100-200"``, ``">=1000"``).
    """
    if list(bounds) != sorted(bounds) or not bounds:
        raise ValueError("bounds must be non-empty and ascending")
    labels = [f"<{_fmt(bounds[0])}"]
    labels += [f"{_fmt(lo)}-{_fmt(hi)}" for lo, hi in itertools.pairwise(bounds)]
    labels.append(f">={_fmt(bounds[-1])}")
    counts = [0] * len(labels)
    for x in values:
        i = 0
        while i < len(bounds) and x >= bounds[i]:
            i += 1
        counts[i] += 1
    return list(zip(labels, counts, strict=True))


def _fmt(x: float) -> str:
    return f"{x:g}"


def rate(count: int, seconds: float) -> float:
    """Events per second over a window (0 for an empty window)."""
    return count / seconds if seconds > 0 else 0.0


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, or None when the denominator is 0 or either is nan."""
    if denominator == 0 or math.isnan(numerator) or math.isnan(denominator):
        return None
    return numerator / denominator


def ratio_of(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded to 0.001 (a table's ratio), or None when either is unknown or the
    ratio is (:func:`ratio`)."""
    if a is None or b is None:
        return None
    r = ratio(a, b)
    return None if r is None else round(r, 3)


def share_pct(part: int, whole: int) -> float:
    """``part`` as a percentage of ``whole``; 100 % when there is nothing to count (a run
    without messages had no failures)."""
    return 100.0 * part / whole if whole else 100.0


def timeline(
    samples: Iterable[tuple[float, float]], window_s: float, bucket_s: float = 1.0
) -> list[dict[str, float]]:
    """Per time bucket of ``bucket_s`` seconds over ``[0, window_s)``: the number of samples
    and their p50/p99/max. ``samples`` are ``(time_s, latency_ms)`` with the time relative to
    the window's start (the intended send time); samples outside the window are ignored.
    An empty bucket has ``count`` 0 and nan percentiles."""
    if bucket_s <= 0:
        raise ValueError("bucket_s must be positive")
    n = max(1, math.ceil(window_s / bucket_s - 1e-9))
    buckets: list[list[float]] = [[] for _ in range(n)]
    for t, lat in samples:
        if 0 <= t < window_s:
            buckets[min(n - 1, int(t // bucket_s))].append(lat)
    out = []
    for i, b in enumerate(buckets):
        b.sort()
        out.append(
            {
                "t_s": round(i * bucket_s, 3),
                "count": float(len(b)),
                "p50": percentile(b, 50),
                "p99": percentile(b, 99),
                "max": b[-1] if b else math.nan,
            }
        )
    return out


def uniform_schedule(
    index: int, connections: int, rate_per_s: float, start: float, end: float
) -> list[float]:
    """Intended send times of connection ``index`` of ``connections`` for a total open-loop
    ``rate_per_s``: ``start + index/R + k*C/R`` for every such time before ``end``. Together
    the connections send uniformly at R msg/s, each at R/C."""
    if rate_per_s <= 0 or connections <= 0:
        raise ValueError("rate and connections must be positive")
    period = connections / rate_per_s
    first = start + index / rate_per_s
    n = max(0, math.ceil((end - first) / period - 1e-12))
    return [first + k * period for k in range(n)]


def per_message_us(cpu_s: float, messages: int) -> float | None:
    """CPU microseconds per message: ``cpu_s`` CPU seconds spent over a window in which
    ``messages`` were answered, rounded to 0.1 µs; None when nothing was answered."""
    if messages <= 0:
        return None
    return round(cpu_s / messages * 1e6, 1)


# Process-name prefixes (as chatd-bench keys its CPU readings) -> the group they count for.
CPU_GROUPS: dict[str, str] = {
    "worker": "workers",
    "store": "workers",  # the SQLite store's writer process: it does the workers' writes
    "master": "master",
    "fake": "backend",
    "model": "backend",
    "client": "clients",
}


def serves(key: str) -> bool:
    """Is the process of this chatd-bench key one of those that serve the messages: a worker,
    or the SQLite store's writer (it does the workers' writes)? (Not the master.)"""
    return CPU_GROUPS.get(key.split(" ", 1)[0]) == "workers"


def cpu_per_reply(cpu_s: Mapping[str, float], replies: int) -> dict[str, float | None]:
    """CPU µs per reply of each group of processes: ``workers`` (every ``worker …`` key
    together, and the ``store writer``, which writes for them), ``master``, ``backend``
    (``fake`` or ``model``) and ``clients`` (``client …``), from CPU seconds per process over
    the window in which ``replies`` replies came in (:func:`per_message_us`). A group without
    a process, or no reply, gives None; other keys are ignored."""
    sums: dict[str, float] = {}
    for key, seconds in cpu_s.items():
        group = CPU_GROUPS.get(key.split(" ", 1)[0])
        if group is not None:
            sums[group] = sums.get(group, 0.0) + seconds
    return {
        g: None if g not in sums else per_message_us(sums[g], replies)
        for g in ("workers", "master", "backend", "clients")
    }


STAGE_NAMES = ("commit", "queue", "first_token", "stream")
"""The worker's stages a reply reports (``stats.stages``), in order. Of the rest of a reply's
latency, the client's own lateness in sending is ``send_lag``; what is left (storing the
reply, writing it, the network both ways, the worker reading the frame, the client reading
the reply) is ``rest``."""


def slowest_stages(
    records: Sequence[Sequence[Any]],
    stages: Sequence[Sequence[float] | None],
    start: float,
    end: float,
    fraction: float = 0.01,
) -> dict[str, Any] | None:
    """Where the time of the slowest replies went: for the replies whose intended send time
    is in ``[start, end)`` and that said their stages, the slowest ``fraction`` by reply
    latency (at least one), the mean of each stage, of ``send_lag`` and of the ``rest`` in ms
    (see :data:`STAGE_NAMES`); ``all``: the
    same means over every such reply, to compare. None when no reply said its stages.

    ``records`` are load records (intended, sent, ack, first, done, error; seconds);
    ``stages[i]``: record i's stages in ms (commit, queue, first token, stream) or None.
    """
    rows = []
    for r, st in zip(records, stages, strict=False):
        if st is None or r[4] is None or r[5] is not None or not start <= r[0] < end:
            continue
        latency = (r[4] - r[0]) * 1000.0
        lag = (r[1] - r[0]) * 1000.0 if r[1] is not None else 0.0
        rows.append((latency, (lag, *st)))
    if not rows:
        return None
    rows.sort(key=lambda row: row[0])
    k = max(1, math.ceil(len(rows) * fraction))

    def means(sel: Sequence[tuple[float, tuple[float, ...]]]) -> dict[str, float]:
        n = len(sel)
        out = {"reply_ms": round(sum(lat for lat, _ in sel) / n, 2)}
        for i, name in enumerate(("send_lag", *STAGE_NAMES)):
            out[f"{name}_ms"] = round(sum(st[i] for _, st in sel) / n, 2)
        spent = sum(out[f"{name}_ms"] for name in ("send_lag", *STAGE_NAMES))
        out["rest_ms"] = round(out["reply_ms"] - spent, 2)
        return out

    return {"fraction": fraction, "n": k, "of": len(rows), **means(rows[-k:]), "all": means(rows)}
