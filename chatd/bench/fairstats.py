"""Pure figures of the ``fairness`` scenario: Jain's index over grants normalized by the
clients' waiting, max-min fair shares, per-class aggregation. No I/O, no clock
(``tests/unit/bench/test_fairstats.py``).

Jain's fairness index
---------------------
Jain's index of n non-negative values is ``J = (Σ x_i)² / (n · Σ x_i²)``: 1 when all are
equal, k/n when k of them are equal and the others 0. What matters is what x_i is; here
it is each client's service **normalized by its demand**, demand being "has a request
waiting" (the scenario's ``jain``, :func:`grant_shares`):

- A *grant* is a request getting its slot, timed by the first byte of its response body (the
  fake answers its first token at once, so the first byte follows the grant by the relay's
  milliseconds). The grants counted are those whose first byte falls in the window.
- A client is *waiting* at time t when one of its requests was sent at or before t and had
  no first byte before t (a refused request waits until its refusal; a request never served
  waits until the window's end).
- Each grant is one unit of service, whose fair division is equal among the clients waiting
  at that instant (the grantee among them): a client's *fair grants* E_i is the sum, over
  the grants, of 1 / (clients waiting) for each grant at which it was waiting; its *grants*
  A_i how many it got; ``x_i = A_i / E_i`` over the clients with E_i > 0.

That is exactly what round robin across keys promises (among the keys with a request
waiting, each gets the same share of the slots granted) and it normalizes by demand without
a model of the clients: think time, a client's own rate and the closed loop (a light user
who waits longer also asks less often) do not count against the queue, since a client
earns a fair share only while it waits. With round robin J ≈ 1; with FIFO the flooder's
backlog takes almost every grant while the light users wait, J ≈ 1/n.

Rejected as *the* index: per-client mean waits (FIFO would score as perfectly fair: every
request waits behind the same queue, whoever sent it, while light users are starved of
throughput); raw throughputs (a light user who asks for less is not wronged by getting
less); Jain over the backlogged clients only (only the flooder is backlogged all the time:
light users think between requests, so the set is one client).

Also reported, as the *outcome* rather than the scheduler's fairness (``jain_maxmin``,
:func:`maxmin_shares`): Jain over ``T_i / O_i``, the client's throughput over its max-min
fair share of the measured total throughput (the normalization of Jain, Chiu and Hawe 1984,
DEC-TR-301), with a demand per client of ``1 / (reply + mean think)`` for a light user (what
it completes per second if it never waits) and ``in flight / reply`` for the flooder (more
than the capacity). It stays below 1 even under perfect round robin when light users' own
cycle (reply + wait + think) cannot consume their equal share.

The records
-----------
One request: ``(client, sent, first, done, error)``, seconds from the load's start;
``first`` is the first byte of the response body (None if none came), ``done`` the end of the
response (its last byte, or the error), None while it was still waiting or streaming when the
load stopped, ``error`` None for a complete reply, else a code (``http_429``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from chatd.bench import stats as st

FairRecord = tuple[int, float, float | None, float | None, str | None]


def jain(xs: Sequence[float]) -> float | None:
    """Jain's index ``(Σx)² / (n Σx²)`` of non-negative values; None when empty or all 0
    (nothing to compare)."""
    if not xs:
        return None
    if any(x < 0 or math.isnan(x) for x in xs):
        raise ValueError("Jain's index is defined for non-negative values")
    sq = sum(x * x for x in xs)
    if sq == 0:
        return None
    return sum(xs) ** 2 / (len(xs) * sq)


def maxmin_shares(demands: Sequence[float], capacity: float) -> list[float]:
    """Max-min fair shares (water-filling) of ``capacity`` among clients asking for
    ``demands`` (``math.inf`` allowed): every client gets min(demand, level), the level being
    the highest that fits in the capacity. When the demands fit, each gets its demand."""
    if capacity < 0 or any(d < 0 for d in demands):
        raise ValueError("demands and capacity must be non-negative")
    shares = [0.0] * len(demands)
    left = capacity
    todo = sorted(range(len(demands)), key=lambda i: demands[i])
    while todo:
        level = left / len(todo)
        i = todo[0]
        if demands[i] <= level:  # the smallest demand fits: give it all, share the rest
            shares[i] = demands[i]
            left -= demands[i]
            todo.pop(0)
            continue
        for j in todo:  # every remaining demand is above the level
            shares[j] = level
        break
    return shares


def grant_shares(
    records: Sequence[FairRecord], n: int, window: tuple[float, float]
) -> tuple[list[int], list[float]]:
    """Per client (0..n-1): the grants it got in ``window`` and its fair grants (the module
    docstring's A_i and E_i)."""
    w0, w1 = window
    waits: list[tuple[int, float, float]] = []  # client, waiting from, until
    grants: list[tuple[float, int]] = []
    for client, sent, first, done, _ in records:
        if not 0 <= client < n:
            continue
        until = first if first is not None else done if done is not None else w1
        waits.append((client, sent, until))
        if first is not None and w0 <= first < w1:
            grants.append((first, client))
    got = [0] * n
    fair = [0.0] * n
    for g, client in grants:
        got[client] += 1
        waiting = {c for c, a, b in waits if a <= g <= b}
        waiting.add(client)
        for c in waiting:
            fair[c] += 1.0 / len(waiting)
    return got, fair


def demands(
    classes: Sequence[str], reply_s: float, mean_think_s: float, flood_in_flight: int
) -> list[float]:
    """Each client's demand in completions per second (module docstring): ``"flooder"``:
    ``flood_in_flight / reply_s``; ``"light"``: ``1 / (reply_s + mean_think_s)``."""
    if reply_s <= 0:
        raise ValueError("reply_s must be positive")
    light = 1.0 / (reply_s + mean_think_s)
    return [flood_in_flight / reply_s if c == "flooder" else light for c in classes]


def _summary_s(values: list[float]) -> dict[str, float]:
    """:func:`chatd.bench.stats.summary` of seconds, in ms."""
    return st.summary(v * 1000.0 for v in values)


def phase_figures(
    records: Sequence[FairRecord],
    classes: Sequence[str],
    window: tuple[float, float],
    client_demands: Sequence[float],
) -> dict[str, Any]:
    """A phase's figures from its requests. ``classes[i]`` is client i's class,
    ``window`` = (w0, w1) in seconds from the start, ``client_demands`` from :func:`demands`.

    Per class (``classes.light``, ``classes.flooder``):

    - ``completed``: replies that ended (complete, no error) inside [w0, w1);
      ``throughput_per_s`` = completed / (w1 - w0).
    - ``ttfb_ms``: for those replies, send -> first byte of the response body (the wait for
      a slot and the backend's first token); ``total_ms``: send -> last byte.
    - ``errors``: requests that ended with an error inside the window, by code.
    - ``pending_at_end``: requests sent before w1 still unanswered at w1 (a reply still
      waiting or streaming when the load stopped: their wait is *censored*);
      ``pending_age_ms``: w1 - send of each, a lower bound of its wait.

    Overall: ``throughput_per_s`` (every class); per client ``grants`` and ``fair_grants``
    (:func:`grant_shares`) and ``grant_ratio`` (their ratio), ``throughput_per_s``,
    ``fair_share_per_s`` (:func:`maxmin_shares` of the overall throughput) and
    ``normalized`` (their ratio); ``jain`` over the grant ratios (the index), ``jain_maxmin``
    over the normalized throughputs (the outcome; see the module docstring).
    """
    w0, w1 = window
    span = w1 - w0
    if span <= 0:
        raise ValueError("empty window")
    n = len(classes)
    done_in = [
        r
        for r in records
        if r[3] is not None and r[4] is None and w0 <= r[3] < w1 and 0 <= r[0] < n
    ]
    per_client = [0] * n
    for r in done_in:
        per_client[r[0]] += 1
    tput = [k / span for k in per_client]
    total = sum(tput)
    shares = maxmin_shares(client_demands, total)
    normalized = [t / o if o > 0 else 0.0 for t, o in zip(tput, shares, strict=True)]
    got, fair = grant_shares(records, n, window)
    ratios = [a / e for a, e in zip(got, fair, strict=True) if e > 0]
    by_class: dict[str, Any] = {}
    for cls in dict.fromkeys(classes):
        members = {i for i, c in enumerate(classes) if c == cls}
        ok = [r for r in done_in if r[0] in members]
        errs: dict[str, int] = {}
        for r in records:
            if r[0] in members and r[4] is not None and r[3] is not None and w0 <= r[3] < w1:
                errs[r[4]] = errs.get(r[4], 0) + 1
        pending = [r for r in records if r[0] in members and r[1] < w1 and r[3] is None]
        by_class[cls] = {
            "clients": len(members),
            "completed": len(ok),
            "throughput_per_s": round(len(ok) / span, 4),
            "ttfb_ms": _summary_s([r[2] - r[1] for r in ok if r[2] is not None]),
            "total_ms": _summary_s([r[3] - r[1] for r in ok if r[3] is not None]),
            "errors": errs,
            "pending_at_end": len(pending),
            "pending_age_ms": _summary_s([w1 - r[1] for r in pending]),
        }
    j = jain(ratios)
    jm = jain(normalized) if total > 0 else None
    return {
        "window_s": [round(w0, 3), round(w1, 3)],
        "throughput_per_s": round(total, 4),
        "classes": by_class,
        "clients": [
            {
                "client": i,
                "class": classes[i],
                "completed": per_client[i],
                "throughput_per_s": round(tput[i], 4),
                "demand_per_s": round(client_demands[i], 4),
                "fair_share_per_s": round(shares[i], 4),
                "normalized": round(normalized[i], 4),
                "grants": got[i],
                "fair_grants": round(fair[i], 4),
                "grant_ratio": round(got[i] / fair[i], 4) if fair[i] > 0 else None,
            }
            for i in range(n)
        ],
        "jain": None if j is None else round(j, 4),
        "jain_maxmin": None if jm is None else round(jm, 4),
    }
