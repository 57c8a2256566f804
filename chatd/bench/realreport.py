"""The ``real`` scenario's figures (from the raw observations) and its Markdown table.

Definitions (every time in ms; "intended" is the message's scheduled send time, so a wait
anywhere, in the client, chatd's queue or the model, counts; see :mod:`chatd.bench.stats`):

- ``chatd``: :func:`chatd.bench.scenarios.summarize` of every message scheduled in the
  window (``ack_ms``, ``first_token_ms``, ``reply_ms`` from the intended send; ``errors`` by
  code, ``busy`` being the queue full; the histogram over :data:`BUCKETS_MS`).
- ``queue.time_queued_ms``: per reply, ``(first token - ack) - backend TTFT``, where the
  backend TTFT is the reply's ``stats.ttft_ms`` (chatd's relay: its request to the first
  token). It is the time between the ack and the request to the model: the wait for a slot,
  plus chatd's own small steps (floored at 0). An estimate: chatd does not tell the client
  when the slot was granted.
- ``queue.messages_queued``: messages that got at least one ``queued`` frame;
  ``max_position`` the highest position any was told.
- ``queue.series``: ``[t_s, depth, slots granted, slots in use]`` every 0.25 s from the
  daemon's status (``in_flight`` counts a leased idle slot for up to 2 s; ``in_use`` is what
  the workers last reported, up to 1 s old). ``queue.timeline``: the same per tenth of the
  run, with the replies and ``busy`` errors received in it.
- ``backend_ttft_ms``: the stats' ``ttft_ms`` (the model's TTFT as chatd measured it, to
  compare with the direct baseline's at the same concurrency); ``unqueued_ttft_ms``: first
  token from the actual send of the messages that never waited (chatd's added cost on a
  real model, when there are such messages).
- ``tokens_per_s``: per reply ``(tokens - 1) / (reply - first token)``
  (:func:`chatd.bench.realdirect.tokens_per_s`; the reply frame comes after the store
  commit, so it is slightly lower than the model's own rate).
- ``cpu.per_reply_us``: CPU µs per reply received in the window, of chatd's workers, its
  master, the model and this process (:func:`chatd.bench.stats.cpu_per_reply`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from chatd.bench import stats as st
from chatd.bench.realdirect import tokens_per_s
from chatd.bench.scenarios import summarize

if TYPE_CHECKING:
    from chatd.bench.realmodel import Msg, RealParams

TITLE = "A real model behind chatd: the model the bottleneck, the queue at work"
BUCKETS_MS: tuple[float, ...] = (250.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0)


def queue_timeline(
    series: Sequence[Sequence[float]],
    answers: Sequence[tuple[float, str | None]],
    duration: float,
    bins: int = 10,
) -> list[dict[str, float]]:
    """Per ``duration / bins`` seconds: ``depth_max``, ``granted_max``, ``in_use_mean`` of
    the status samples (``[t, depth, granted, in use]``) taken in it (nan without one), and
    ``replies`` / ``busy``: ``answers`` (time, error code or None) received in it. Samples
    and answers outside ``[0, duration)`` are ignored."""
    width = duration / bins
    out = []
    for i in range(bins):
        lo, hi = i * width, (i + 1) * width
        s = [x for x in series if lo <= x[0] < hi]
        a = [code for t, code in answers if lo <= t < hi]
        out.append(
            {
                "t_s": round(lo, 2),
                "depth_max": max((x[1] for x in s), default=math.nan),
                "granted_max": max((x[2] for x in s), default=math.nan),
                "in_use_mean": round(statistics.fmean(x[3] for x in s), 2) if s else math.nan,
                "replies": float(sum(1 for c in a if c is None)),
                "busy": float(sum(1 for c in a if c == "busy")),
            }
        )
    return out


def figures(
    p: RealParams,
    rate: float,
    model: dict[str, Any],
    load: dict[str, Any],
    direct: dict[str, Any] | None,
) -> dict[str, Any]:
    """The scenario's JSON-ready result from ``_load``'s raw observations (module doc)."""
    msgs: list[Msg] = load["messages"]
    chatd = summarize([m.record() for m in msgs], 0.0, p.duration, BUCKETS_MS)
    replies = [m for m in msgs if m.done is not None and m.error is None]
    waits, backend, unqueued, rates = [], [], [], []
    for m in replies:
        ttft = m.stats.get("ttft_ms")
        if isinstance(ttft, int | float):
            backend.append(float(ttft))
            if m.first is not None and m.ack is not None:
                waits.append(max(0.0, (m.first - m.ack) * 1000.0 - ttft))
        if m.queued is None and m.first is not None and m.sent is not None:
            unqueued.append((m.first - m.sent) * 1000.0)
        tokens = m.stats.get("tokens")
        rate_m = tokens_per_s(tokens if isinstance(tokens, int) else None, m.first, m.done)
        if rate_m is not None:
            rates.append(rate_m)
    series: list[list[float]] = load["series"]
    answers = [(m.done, m.error) for m in msgs if m.done is not None]
    cpu_s: dict[str, float] = load["cpu_s"]
    return {
        "name": "real",
        "title": TITLE,
        "params": asdict(p)
        | {"rate": round(rate, 3), "rate_given": p.rate is not None, "warmup": 0.0, "mode": "raw"},
        "procs": 1,
        "model": model,
        "chatd": chatd,
        "queue": {
            "slots": p.slots,
            "max_queue": p.max_queue,
            "messages_queued": sum(1 for m in msgs if m.queued is not None),
            "max_position": max((m.position for m in msgs), default=0),
            "time_queued_ms": st.summary(waits),
            "depth_max": max((x[1] for x in series), default=0),
            "depth_mean": round(statistics.fmean(x[1] for x in series), 2) if series else None,
            "in_use_mean": round(statistics.fmean(x[3] for x in series), 2) if series else None,
            "busy": chatd["errors"]["by_code"].get("busy", 0),
            "timeline": queue_timeline(series, answers, p.duration),
            "series": series,
        },
        "backend_ttft_ms": st.summary(backend),
        "unqueued_ttft_ms": st.summary(unqueued),
        "tokens_per_s": st.summary(rates),
        "direct": direct,
        "cpu": {
            "per_process_s": cpu_s,
            "per_process_pct": {k: round(100 * v / p.duration, 1) for k, v in cpu_s.items()},
            "per_reply_us": st.cpu_per_reply(cpu_s, chatd["replies_in_window"]),
        },
        "elapsed_s": load["elapsed_s"],
    }


def _n(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}" if isinstance(x, float) else f"{x:,}"


def _row(label: str, s: dict[str, Any] | None, digits: int = 1) -> str:
    s = s or {}
    cells = " | ".join(_n(s.get(k), digits) for k in ("p50", "p95", "p99", "max"))
    return f"| {label} | {cells} | {s.get('count', 0)} |"


def markdown(r: dict[str, Any]) -> str:
    """The ``real`` scenario as Markdown: set-up, latencies (chatd and direct), tokens/s,
    the queue (totals, then per tenth of the run), CPU per reply, errors."""
    p, q, c, d, m = r["params"], r["queue"], r["chatd"], r.get("direct"), r["model"]
    how = (
        f"started here, `--parallel {p['slots']} --max-tokens {p['max_tokens']} "
        f"--threads {p['model_threads']}`"
        if m["started_here"]
        else "a running server"
    )
    basis = (
        f"{p['overload']:g} × the direct capacity of {d['capacity_per_s']:.2f} replies/s"
        if d is not None and not p["rate_given"]
        else "as given"
    )
    lines = [
        f"### {r['title']}",
        "",
        f"- Model: `{m['name']}` at {m['url']} ({how}); chatd: {p['workers']} workers, "
        f"{p['slots']} LLM slots (`max_parallel`), `max_queue = {p['max_queue']}`, "
        "`history_turns = 0`",
        f"- Load: {p['connections']} sessions, open loop at {p['rate']:.2f} msg/s ({basis}) "
        f"for {p['duration']:g} s: {c['scheduled']} messages, {c['answered']} answered, "
        f"errors {c['errors']['by_code'] or 'none'}, {c['errors']['lost']} lost; "
        f"{c['throughput_per_s']:.2f} replies/s received in the window",
        "",
        "| ms | p50 | p95 | p99 | max | n |",
        "|---|---|---|---|---|---|",
        _row("ack (from the intended send)", c["ack_ms"]),
        _row("first token (from the intended send; queue included)", c["first_token_ms"]),
        _row("reply (from the intended send)", c["reply_ms"]),
        _row("time queued (ack → request to the model, estimate)", q["time_queued_ms"]),
        _row("model TTFT through chatd (its relay's request → first token)", r["backend_ttft_ms"]),
        _row("first token of messages never queued (from the send)", r["unqueued_ttft_ms"]),
    ]
    if d is not None:
        conc = d["concurrency"]
        lines += [
            _row(f"direct to the model: TTFT ({conc} concurrent, closed loop)", d["ttft_ms"]),
            _row(f"direct to the model: reply ({conc} concurrent)", d["reply_ms"]),
        ]
    lines += [
        "",
        "| tokens/s per reply | p50 | p95 | p99 | max | n |",
        "|---|---|---|---|---|---|",
        _row("through chatd", r["tokens_per_s"]),
    ]
    if d is not None:
        lines.append(_row("direct", d["tokens_per_s"]))
    per = r["cpu"]["per_reply_us"]
    lines += [
        "",
        f"- Queue: {q['messages_queued']} of {c['scheduled']} messages got a `queued` frame "
        f"(highest position {q['max_position']}); depth max {q['depth_max']} of "
        f"{q['max_queue']}, mean {_n(q['depth_mean'], 2)}; slots in use mean "
        f"{_n(q['in_use_mean'], 2)} of {q['slots']}; `busy` (queue full): {q['busy']}",
        f"- CPU per reply (µs): chatd workers {_n(per['workers'], 0)}, master "
        f"{_n(per['master'], 0)}, model {_n(per['backend'], 0)}, this client "
        f"{_n(per['clients'], 0)}",
        "",
        "| t (s) | queue depth (max) | slots granted (max) | in use (mean) | replies | busy |",
        "|---|---|---|---|---|---|",
    ]
    for b in q["timeline"]:
        lines.append(
            f"| {b['t_s']:g} | {_n(b['depth_max'], 0)} | {_n(b['granted_max'], 0)} | "
            f"{_n(b['in_use_mean'], 2)} | {_n(b['replies'], 0)} | {_n(b['busy'], 0)} |"
        )
    lines.append("")
    return "\n".join(lines)
