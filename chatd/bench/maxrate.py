"""Scenario ``max``: the highest offered rate sustained with reply p99 < 50 ms and no error.

For three targets in one run, on the same zero-delay fake Ollama (8 tokens per reply):
chatd (the :class:`~chatd.bench.server.Target`), the bare reference relay
(:mod:`chatd.bench.bare`, started here with as many workers as chatd) and the backend
itself (:mod:`chatd.bench.direct`). Each is offered an open-loop load (``raw`` mode, see
:mod:`chatd.bench.load`) at ``start`` msg/s, then ``start + step``, … for ``duration``
seconds after ``warmup`` seconds per step, until the first failing step (or ``max_rate``).

A step **passes** when every message intended in its measured window was answered with a
correct reply (no error frame, none lost, no bad reply, every connection opened, none closed
by the server) and the reply p99 is under 50 ms (:func:`verdict`). The sustained rate is
the last passing step's offered rate; the search stops at the first failing step, a failing
rate being run a second time first (:func:`search`: one stall of another process on a
shared machine must not end a target's search). Per step: p50/p99, the rate achieved, and
the **CPU per message** of the relay's worker processes (their CPU seconds in the measured
window / replies received in it; chatd's workers from its status, the bare relay's from its
own pids), of the fake, and of the client processes in % of a core (they share the
machine's cores with what is measured); for chatd also its master's CPU per message, and the
stage breakdown of its slowest 1 % of replies (:func:`chatd.bench.stats.slowest_stages` over
the step's records and the stages its replies reported).

With ``stored`` a fourth target, the **bare relay + store** (:class:`BareRelay` with
``store``): the bare relay keeping chatd's promises on each message in chatd's SQLite store
(the user message committed before its ack, the reply before it is sent), through a store
writer when chatd has one (its status says), else each worker writing: what chatd costs
beyond the price of those promises is the difference between the two.

``ratios``: chatd's sustained rate / the bare relay's, / the bare relay + store's (with
``stored``), and / direct's (the point ratio).
With steps of ``step`` msg/s a target's true sustained rate is only known to lie in
``[sustained, first failing)``, so the true ratio lies between ``chatd's sustained / the
other's first failing`` and ``chatd's first failing / the other's sustained``
(:func:`ratio_interval`, ``ratio_intervals``); finer steps (``--step 250``) narrow it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from chatd.bench import report, scenarios, server
from chatd.bench import stats as st
from chatd.bench.bare import BareRelay
from chatd.bench.scenarios import Scenario
from chatd.bench.server import Target

P99_LIMIT_MS = 50.0
TITLE = "Highest sustained rate (reply p99 < 50 ms, no error)"
KINDS = ("chatd", "bare", "stored", "direct")
LABELS = {
    "chatd": "chatd",
    "bare": "bare relay",
    "stored": "bare relay + store",
    "direct": "direct to the backend",
}
REFERENCES = ("bare", "stored", "direct")  # what chatd's figures are divided by


@dataclass(frozen=True)
class MaxParams:
    """The search: rates in msg/s, times in seconds."""

    connections: int = 100
    start: float = 500.0
    step: float = 500.0
    max_rate: float = 20000.0
    duration: float = 8.0
    warmup: float = 1.0
    drain: float = 3.0


def rates(p: MaxParams) -> list[float]:
    """The offered rates of the steps: ``start``, ``start + step``, … up to ``max_rate``."""
    if p.start <= 0 or p.step <= 0:
        raise ValueError("start and step must be positive")
    n = math.floor((p.max_rate - p.start) / p.step + 1e-9) + 1
    return [p.start + i * p.step for i in range(max(0, n))]


def verdict(step: dict[str, Any], limit_ms: float = P99_LIMIT_MS) -> str | None:
    """Why a step fails, in a few words; None when it passes.

    ``step`` holds ``scheduled``, ``answered``, ``errors`` (``total``, ``by_code``, ``lost``,
    ``bad_reply``, ``connect_failed``, ``closed``) and ``reply_ms`` (a summary with ``p99``).
    """
    e = step["errors"]
    problems = [f"{k} {v}" for k, v in sorted(e.get("by_code", {}).items())]
    for key, what in (
        ("lost", "lost"),
        ("bad_reply", "bad replies"),
        ("connect_failed", "connections failed"),
        ("closed", "connections closed by the server"),
    ):
        if e.get(key):
            problems.append(f"{e[key]} {what}")
    if problems:
        return "errors: " + ", ".join(problems)
    if not step["scheduled"] or step["answered"] < step["scheduled"]:
        return "no reply measured" if not step["answered"] else "not every message answered"
    p99 = step["reply_ms"].get("p99", math.inf)
    if not p99 < limit_ms:
        return f"p99 {p99:,.1f} ms >= {limit_ms:g} ms"
    return None


def search(
    offered: Iterable[float],
    run_step: Callable[[float], dict[str, Any]],
    limit_ms: float = P99_LIMIT_MS,
    attempts: int = 2,
) -> dict[str, Any]:
    """Run ``run_step(rate)`` for each rate in turn until one fails (:func:`verdict`).

    A failing rate is run again, up to ``attempts`` times in all, and fails only if every
    attempt failed: on a shared machine one stall of another process can fail a step that
    the target sustains (seen here), while a rate beyond the target's reach fails each time.
    Every attempt is kept in ``steps`` (``attempt`` numbers them).

    Returns ``sustained_rate`` (the last passing rate, None if the first rate failed),
    ``at_sustained`` (that step), ``first_failing`` (the last attempt of the failing rate,
    None if every rate passed) and ``steps`` (all of them, each with ``ok`` and ``why``).
    """
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for rate in offered:
        for attempt in range(1, max(1, attempts) + 1):
            step = run_step(rate)
            why = verdict(step, limit_ms)
            step["ok"], step["why"], step["attempt"] = why is None, why, attempt
            steps.append(step)
            if why is None:
                break
        if not steps[-1]["ok"]:
            break
        best = steps[-1]
    failing = steps[-1] if steps and not steps[-1]["ok"] else None
    return {
        "sustained_rate": None if best is None else best["rate"],
        "at_sustained": best,
        "first_failing": failing,
        "steps": steps,
    }


def ratio_interval(
    num_sustained: float | None,
    num_failing: float | None,
    den_sustained: float | None,
    den_failing: float | None,
) -> tuple[float | None, float | None]:
    """The bounds of ``true rate of A / true rate of B`` when each true sustained rate is only
    known to the step: A's lies in ``[num_sustained, num_failing)``, B's in ``[den_sustained,
    den_failing)``. Low bound ``num_sustained / den_failing``, high bound ``num_failing /
    den_sustained`` (neither reached: the true rates lie below the failing ones).

    A target that failed its first step (sustained None) sustains somewhere in ``[0, its
    first failing)``; one that passed every step up to the cap (failing None) has no upper
    bound. So: A failed its first step -> low 0; B never failed -> low None (unknown: B
    could be arbitrarily fast); A never failed or B failed its first step -> high None
    (unbounded). Rounded to 0.001.
    """
    if num_sustained is None:
        low: float | None = 0.0
    elif den_failing is None or den_failing <= 0:
        low = None
    else:
        low = round(num_sustained / den_failing, 3)
    if num_failing is None or den_sustained is None or den_sustained <= 0:
        high = None
    else:
        high = round(num_failing / den_sustained, 3)
    return low, high


def run_step(
    kind: str, target: Target, url: str, rate: float, p: MaxParams, procs: int, progress: bool
) -> dict[str, Any]:
    """One step against one target: the load, then the figures :func:`verdict` reads."""
    sc = Scenario(f"max {kind} {rate:g}/s", TITLE, p.connections, rate, p.duration)
    mode = "direct" if kind == "direct" else "raw"
    window = (p.warmup, p.duration, p.drain)
    res, cpu = scenarios.run_load(sc, target, mode, url, window, procs, progress=progress)
    s = scenarios.summarize(res.records, p.warmup, p.duration)
    replies = s["replies_in_window"]
    workers = sum(v for k, v in cpu.items() if st.serves(k))  # the store writer's with them
    master = cpu.get("master") if kind == "chatd" else None
    clients = sum(v for k, v in cpu.items() if k.startswith("client"))
    errors = s["errors"] | {
        "bad_reply": res.bad_reply,
        "connect_failed": res.connect_failed,
        "closed": res.closed,
    }
    return {
        "rate": rate,
        "achieved_per_s": s["throughput_per_s"],
        "scheduled": s["scheduled"],
        "answered": s["answered"],
        "reply_ms": s["reply_ms"],
        "errors": errors,
        "send_lag_p99_ms": s["send_lag_ms"].get("p99"),
        "worker_cpu_us_per_msg": st.per_message_us(workers, replies) if mode == "raw" else None,
        "master_cpu_us_per_msg": None if master is None else st.per_message_us(master, replies),
        "workers_pct_of_core": round(100 * workers / p.duration, 1),
        "fake_cpu_us_per_msg": st.per_message_us(cpu["fake"], replies) if "fake" in cpu else None,
        "clients_pct_of_core": round(100 * clients / p.duration, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        # Where the slowest 1 % of the replies' time went (chatd's replies say their stages;
        # the bare relay's and direct's do not: None).
        "slowest": st.slowest_stages(res.records, res.stages, p.warmup, p.warmup + p.duration),
    }


def zero_delay(fake_url: str) -> None:
    """Set the fake Ollama behind a run to answer at once: no delay, no hang, and
    :data:`chatd.bench.server.TOKENS` tokens a reply (the answer the clients check)."""
    zero = {"first_token_ms": 0, "token_ms": 0, "extra_latency_ms": 0, "hang": False}
    server.fake_config(fake_url, **zero, tokens=server.TOKENS)


def run_max(
    target: Target,
    params: MaxParams | None = None,
    procs: int = 2,
    progress: bool = False,
    bare_workers: int = 2,
    direct: bool = True,
    stored: bool = False,
) -> dict[str, Any]:
    """The whole scenario: the search for each target, then the ratios (JSON-ready).

    The bare relay and the direct baseline need the backend's URL (``target.fake_url``);
    without it only chatd is searched; ``direct`` False skips the direct baseline, ``stored``
    True adds the bare relay + store. The fake's delay knobs are set to zero first.
    """
    p = params or MaxParams()
    fake = target.fake_url
    if fake:
        zero_delay(fake)
    out: dict[str, Any] = {
        "name": "max",
        "title": TITLE,
        "params": dataclasses.asdict(p) | {"p99_limit_ms": P99_LIMIT_MS, "mode": "raw"},
        "procs": procs,
        "workers": {"chatd": len(target.worker_pids()), "bare": bare_workers},
        "targets": {},
    }
    skip = {k for k, on in (("direct", direct), ("stored", stored)) if not on}
    kinds = [k for k in KINDS if fake and k not in skip] or ["chatd"]
    writes = store_mode(target) if "stored" in kinds else None
    if writes is not None:
        out["workers"]["stored"] = bare_workers
        out["stored_writes"] = writes
    for kind in kinds:
        store = writes if kind == "stored" else None
        out["targets"][kind] = _search_one(kind, target, p, procs, progress, bare_workers, store)
    sustained = {k: v["sustained_rate"] for k, v in out["targets"].items()}
    out["ratios"] = {
        f"chatd/{k}": st.ratio_of(sustained.get("chatd"), sustained.get(k))
        for k in REFERENCES
        if k != "stored" or k in out["targets"]
    }
    out["ratio_intervals"] = intervals(out["targets"])
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _search_one(
    kind: str,
    target: Target,
    p: MaxParams,
    procs: int,
    progress: bool,
    bare_workers: int,
    store: Literal["own", "writer"] | None = None,
) -> dict[str, Any]:
    """The search for one target; ``store``: the bare relay's (``"stored"``: how it writes)."""
    if kind == "chatd":
        return search(rates(p), lambda r: run_step(kind, target, target.url, r, p, procs, progress))
    assert target.fake_url is not None
    if kind == "direct":
        url = target.fake_url
        return search(rates(p), lambda r: run_step(kind, target, url, r, p, procs, progress))
    bare = BareRelay(target.fake_url, bare_workers, store=store)
    bare.fake_pid = target.fake_pid
    try:
        return search(rates(p), lambda r: run_step(kind, bare, bare.url, r, p, procs, progress))
    finally:
        bare.stop()


def store_mode(target: Target) -> Literal["own", "writer"]:
    """How the bare relay + store writes, as chatd does: through a store writer when chatd's
    status shows one (or cannot be read), else each worker writing the file."""
    status = target.status()
    if status is not None and not status.get("master", {}).get("store_writer"):
        return "own"
    return "writer"


def failing_rate(t: dict[str, Any]) -> float | None:
    """A target's first failing rate (None when every step passed)."""
    bad = t.get("first_failing")
    return None if not bad else float(bad["rate"])


def intervals(targets: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """``chatd/bare``, ``chatd/stored`` and ``chatd/direct``: the :func:`ratio_interval` of
    each searched pair, as ``{"low": …, "high": …}``."""
    out: dict[str, dict[str, float | None]] = {}
    c = targets.get("chatd")
    for k in REFERENCES:
        o = targets.get(k)
        if c is None or o is None:
            continue
        low, high = ratio_interval(
            c["sustained_rate"], failing_rate(c), o["sustained_rate"], failing_rate(o)
        )
        out[f"chatd/{k}"] = {"low": low, "high": high}
    return out


def interval_text(iv: dict[str, float | None] | None, other: str) -> str:
    """An interval in words: ``between 0.67 and 1.00``, or which bound is unknown and why."""
    if not iv:
        return "–"
    low, high = iv.get("low"), iv.get("high")
    if low is not None and high is not None:
        return f"between {low:.2f} and {high:.2f}"
    if low is not None:
        return (
            f"at least {low:.2f} (no upper bound: chatd passed every step, or the {other} "
            "failed its first)"
        )
    if high is not None:
        return f"at most {high:.2f} (no lower bound: the {other} passed every step)"
    return "unbounded (no failing step on one side, no passing step on the other)"


def num(x: Any, unit: str = "", digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}{unit}"


def fmt_workers(n: int) -> str:
    return f"{n} worker" + ("" if n == 1 else "s")


def markdown(r: dict[str, Any]) -> str:
    """The scenario's tables: one row per target, then every step."""
    p, w = r["params"], r["workers"]
    lines = [f"### {r['title']}", ""]
    lines += [
        f"- {p['connections']} connections; steps of {p['step']:g} msg/s from "
        f"{p['start']:g}, {p['duration']:g} s each after {p['warmup']:g} s warm-up, up to "
        f"{p['max_rate']:g}; stop at the first rate failing twice; client processes: {r['procs']}; "
        f"zero-delay fake Ollama; chatd {fmt_workers(w['chatd'])}, bare relay "
        f"{fmt_workers(w['bare'])}{_stored_words(r)}",
        "",
        "| target | sustained | reply p50 / p99 at it | worker CPU / msg at it "
        "| first failing step | why |",
        "|---|---|---|---|---|---|",
    ]
    for kind, t in r["targets"].items():
        best, bad = t["at_sustained"] or {}, t["first_failing"] or {}
        lat = best.get("reply_ms", {})
        name = LABELS[kind] + (f" ({fmt_workers(w[kind])})" if kind in w else "")
        lines.append(
            f"| {name} | {num(t['sustained_rate'], ' msg/s')} "
            f"| {num(lat.get('p50'), '', 2)} / {num(lat.get('p99'), ' ms', 2)} "
            f"| {num(best.get('worker_cpu_us_per_msg'), ' µs')} "
            f"| {num(bad.get('rate'), ' msg/s')} | {bad.get('why') or 'none up to the cap'} |"
        )
    ratios, ivs = r["ratios"], r.get("ratio_intervals") or {}
    lines.append("")
    refs = (("bare", "bare relay"), ("stored", "bare relay + store"), ("direct", "backend"))
    for k, who in refs:
        if k not in r["targets"]:
            continue
        other = "direct" if k == "direct" else who
        lines.append(
            f"- chatd / {other}: {num(ratios.get(f'chatd/{k}'), '', 2)} (sustained / sustained); "
            f"the true ratio lies {interval_text(ivs.get(f'chatd/{k}'), who)}"
        )
    if ivs:
        lines.append(
            f"- With steps of {p['step']:g} msg/s a sustained rate is known only to the step: the "
            "true one lies between the last passing step and the first failing one, so the ratio "
            "lies between chatd's sustained / the other's first failing and chatd's first "
            "failing / the other's sustained (if a rate above a failing one fails too, and each "
            "step's verdict holds: a failing rate is run twice, a lucky pass is not checked)"
        )
    lines += _slowest_lines(r)
    lines += [
        "",
        "| target | offered | achieved | reply p50 / p99 (ms) | errors | worker CPU / msg "
        "| master CPU / msg | fake CPU / msg | clients CPU | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, t in r["targets"].items():
        for s in t["steps"]:
            lat = s["reply_ms"]
            lines.append(
                f"| {LABELS[kind]} | {num(s['rate'])} | {num(s['achieved_per_s'], '', 1)} "
                f"| {num(lat.get('p50'), '', 2)} / {num(lat.get('p99'), '', 2)} "
                f"| {s['errors']['total']} | {num(s['worker_cpu_us_per_msg'], ' µs')} "
                f"| {num(s.get('master_cpu_us_per_msg'), ' µs')} "
                f"| {num(s['fake_cpu_us_per_msg'], ' µs')} | {num(s['clients_pct_of_core'], ' %')} "
                f"| {'ok' if s['ok'] else s['why']} |"
            )
    return "\n".join([*lines, ""])


def _stored_words(r: dict[str, Any]) -> str:
    """The bare relay + store in the run's description: its workers and how it writes."""
    if "stored" not in r["workers"]:
        return ""
    how = "one store writer" if r.get("stored_writes") == "writer" else "each worker writing"
    return f", bare relay + store {fmt_workers(r['workers']['stored'])} ({how})"


def _slowest_lines(r: dict[str, Any]) -> list[str]:
    """chatd at its sustained step: where the slowest 1 % of its replies' time went."""
    c = r["targets"].get("chatd")
    if c is None:
        return []
    best = c.get("at_sustained")
    if not best:
        return ["- chatd sustained no step: no stage breakdown at a sustained rate"]
    slow = best.get("slowest")
    head = f"- chatd at its sustained rate ({num(best['rate'], ' msg/s')}):"
    if not slow:
        return [f"{head} its replies reported no stages"]
    return [head, "  " + report.slowest_line(slow)]
