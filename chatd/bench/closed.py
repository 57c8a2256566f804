"""Scenario ``closed``: the closed-loop rate of chatd and of the bare relay, side by side.

Issue #13's goal: chatd's closed-loop rate at least :data:`GOAL_RATIO` of the bare relay's.
``connections`` connections (100 by default) each send their next chat message as soon as
the final reply to the previous one is in, with no think time (:mod:`chatd.bench.closedload`,
over ``procs`` client processes), for ``duration`` seconds after ``warmup`` seconds: first
against chatd (the :class:`~chatd.bench.server.Target`), then against the bare relay
(:mod:`chatd.bench.bare`, started here with ``bare_workers`` workers on the same fake Ollama),
one after the other in one run. The fake is set to answer at once (8 tokens a reply). Without
the fake's URL (a running chatd without ``--fake-url``) only chatd is measured.

Per target (:func:`measure`), over the measured window:

- ``replies_per_s``: the replies received in the window / its length (the closed-loop rate;
  ``replies_in_window`` is the count);
- ``reply_ms``, ``ack_ms``, ``first_token_ms``: summaries from each message's send (in a
  closed loop a message is due when it is sent) over the messages sent in the window;
  ``sent`` and ``answered`` count those messages;
- ``cpu_us_per_reply``: CPU seconds used in the window / ``replies_in_window``, per group of
  processes (:func:`chatd.bench.stats.cpu_per_reply`): ``workers`` (chatd's from its status,
  the bare relay's from its pids), ``master`` (chatd's; None for the bare relay, whose parent
  only waits), ``backend`` (the fake, when its pid is known) and ``clients``;
  ``pct_of_core``: the same groups' CPU in % of one core; ``cpu_s``: per process;
- ``errors``: final errors by code, ``lost`` (sent in the window, no final answer within
  ``drain`` seconds), ``bad_reply`` (a wrong text, or an answer to a message not in flight),
  ``connect_failed``, ``closed`` (connections closed by the server); ``total``: all of these;
- ``slowest``: where the slowest 1 % of the replies' time went
  (:func:`chatd.bench.stats.slowest_stages`; only chatd's replies say their stages).

``ratios`` (:func:`ratios`): chatd / bare relay of the rate, of the workers' CPU per reply and
of the reply p50 and p99; ``goal`` (:func:`goal`): the rate ratio against :data:`GOAL_RATIO`.
With ``stored``, a third target after those, the **bare relay + store** (the bare relay
keeping chatd's promises in chatd's SQLite store, written as chatd writes it:
:func:`chatd.bench.maxrate.store_mode`), and ``ratios_stored``, the same ratios against it:
what chatd costs beyond the price of its promises.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from chatd.bench import maxrate, report, scenarios
from chatd.bench import stats as st
from chatd.bench.bare import BareRelay
from chatd.bench.maxrate import fmt_workers, num
from chatd.bench.scenarios import Scenario
from chatd.bench.server import TOKENS, Target

NAME = "closed"
TITLE = "Closed-loop rate (each connection sends its next message when its reply is in)"
GOAL_RATIO = 0.9  # issue #13: chatd's closed-loop rate >= 0.9 of the bare relay's
LABELS = maxrate.LABELS
GROUPS = ("workers", "master", "backend", "clients")


@dataclass(frozen=True)
class ClosedParams:
    """The run: connections, and seconds (``drain``: the longest wait for one answer)."""

    connections: int = 100
    duration: float = 10.0
    warmup: float = 1.0
    drain: float = 5.0


def params_from(args: argparse.Namespace, duration: float | None) -> ClosedParams:
    """``--conns`` and ``--duration`` (None: the defaults); SystemExit on a bad value."""
    base = ClosedParams()
    p = ClosedParams(
        connections=base.connections if args.conns is None else args.conns,
        duration=base.duration if duration is None else duration,
    )
    if p.connections < 1:
        raise SystemExit("chatd-bench: run closed needs --conns of at least 1")
    if not 0 < p.duration < math.inf:
        raise SystemExit("chatd-bench: run closed needs a positive --duration")
    return p


def errors_of(
    summary: dict[str, Any], bad_reply: int, connect_failed: int, closed: int
) -> dict[str, Any]:
    """A target's errors: :func:`chatd.bench.scenarios.summarize`'s ``by_code`` and ``lost``,
    the load's ``bad_reply``, ``connect_failed`` and ``closed``, and their ``total``."""
    e = summary["errors"]
    out: dict[str, Any] = {
        "by_code": dict(e["by_code"]),
        "lost": e["lost"],
        "bad_reply": bad_reply,
        "connect_failed": connect_failed,
        "closed": closed,
    }
    out["total"] = sum(out["by_code"].values()) + e["lost"] + bad_reply + connect_failed + closed
    return out


def group_seconds(cpu: dict[str, float]) -> dict[str, float | None]:
    """CPU seconds per group (:data:`chatd.bench.stats.CPU_GROUPS`) of per-process seconds;
    None for a group without a process."""
    sums: dict[str, float] = {}
    for key, seconds in cpu.items():
        group = st.CPU_GROUPS.get(key.split(" ", 1)[0])
        if group is not None:
            sums[group] = sums.get(group, 0.0) + seconds
    return {g: sums.get(g) for g in GROUPS}


def measure(
    kind: str, target: Target, url: str, p: ClosedParams, procs: int, progress: bool = False
) -> dict[str, Any]:
    """One closed-loop run against one target (``kind`` "chatd" or "bare"): its figures (the
    module docstring)."""
    sc = Scenario(f"closed {kind}", TITLE, p.connections, 0.0, p.duration, mode="closed")
    window = (p.warmup, p.duration, p.drain)
    res, cpu = scenarios.run_load(sc, target, "closed", url, window, procs, progress=progress)
    s = scenarios.summarize(res.records, p.warmup, p.duration)
    replies = s["replies_in_window"]
    per = st.cpu_per_reply(cpu, replies)
    secs = group_seconds(cpu)
    if kind != "chatd":
        per["master"] = secs["master"] = None
    return {
        "connections": p.connections,
        "opened": res.connections_opened,
        "replies_in_window": replies,
        "replies_per_s": round(st.rate(replies, p.duration), 1),
        "sent": s["scheduled"],
        "answered": s["answered"],
        "reply_ms": s["reply_ms"],
        "ack_ms": s["ack_ms"],
        "first_token_ms": s["first_token_ms"],
        "errors": errors_of(s, res.bad_reply, res.connect_failed, res.closed),
        "cpu_us_per_reply": per,
        "pct_of_core": {
            g: None if v is None else round(100 * v / p.duration, 1) for g, v in secs.items()
        },
        "cpu_s": cpu,
        "slowest": st.slowest_stages(res.records, res.stages, p.warmup, p.warmup + p.duration),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def run_closed(
    target: Target,
    params: ClosedParams | None = None,
    procs: int = 2,
    progress: bool = False,
    bare_workers: int = 2,
    stored: bool = False,
) -> dict[str, Any]:
    """The whole scenario (module docstring): chatd, then the bare relay (then the bare relay
    + store, with ``stored``); JSON-ready. Each relay is stopped before this returns,
    whatever happens."""
    p = params or ClosedParams()
    fake = target.fake_url
    if fake:
        maxrate.zero_delay(fake)
    out: dict[str, Any] = {
        "name": NAME,
        "title": TITLE,
        "params": dataclasses.asdict(p) | {"goal_ratio": GOAL_RATIO, "tokens": TOKENS},
        "procs": procs,
        "workers": {"chatd": len(target.worker_pids())},
        "targets": {"chatd": measure("chatd", target, target.url, p, procs, progress)},
    }
    references = ["bare", "stored"] if stored else ["bare"]
    for kind in references:
        if not fake:
            break
        out["workers"][kind] = bare_workers
        store = maxrate.store_mode(target) if kind == "stored" else None
        if store is not None:
            out["stored_writes"] = store
        bare = BareRelay(fake, bare_workers, store=store)
        bare.fake_pid = target.fake_pid
        try:
            out["targets"][kind] = measure(kind, bare, bare.url, p, procs, progress)
        finally:
            bare.stop()
    out["ratios"] = ratios(out["targets"])
    if "stored" in out["targets"]:
        out["ratios_stored"] = ratios(out["targets"], "stored")
    out["goal"] = goal(out["targets"], out["ratios"]["rate"])
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return out


def ratios(targets: dict[str, Any], reference: str = "bare") -> dict[str, float | None]:
    """chatd / the ``reference`` target (the bare relay, or the bare relay + store) of
    ``rate`` (replies/s), ``worker_cpu_per_reply`` and ``reply_p50``/``reply_p99``, each
    rounded to 0.001; None where a side is missing or a figure unknown or zero on the
    reference's side."""
    c, b = targets.get("chatd"), targets.get(reference)
    if c is None or b is None:
        return {k: None for k in ("rate", "worker_cpu_per_reply", "reply_p50", "reply_p99")}
    return {
        "rate": st.ratio_of(c["replies_per_s"], b["replies_per_s"]),
        "worker_cpu_per_reply": st.ratio_of(
            c["cpu_us_per_reply"].get("workers"), b["cpu_us_per_reply"].get("workers")
        ),
        "reply_p50": st.ratio_of(c["reply_ms"].get("p50"), b["reply_ms"].get("p50")),
        "reply_p99": st.ratio_of(c["reply_ms"].get("p99"), b["reply_ms"].get("p99")),
    }


def goal(targets: dict[str, Any], rate_ratio: float | None) -> dict[str, Any]:
    """Issue #13's goal on the rate ratio: ``status`` "meets" (at least :data:`GOAL_RATIO`,
    no error on either side), "MISSES" (below it, or chatd had an error) or None (no ratio,
    or the bare relay had an error: no reference), and ``why`` in a few words."""
    c, b = targets.get("chatd"), targets.get("bare")
    base: dict[str, Any] = {"rate_ratio_at_least": GOAL_RATIO}
    if c is not None and c["errors"]["total"]:
        return base | {"status": "MISSES", "why": "chatd had errors"}
    if b is None or rate_ratio is None:
        return base | {"status": None, "why": "no bare relay measured"}
    if b["errors"]["total"]:
        return base | {"status": None, "why": "the bare relay had errors: no reference"}
    if rate_ratio >= GOAL_RATIO:
        return base | {"status": "meets", "why": None}
    return base | {"status": "MISSES", "why": f"{rate_ratio:.2f} < {GOAL_RATIO:g}"}


def _error_words(e: dict[str, Any]) -> str:
    parts = [f"{code} {n}" for code, n in sorted(e["by_code"].items())]
    for key, what in (
        ("lost", "lost"),
        ("bad_reply", "bad replies"),
        ("connect_failed", "connections failed"),
        ("closed", "connections closed by the server"),
    ):
        if e.get(key):
            parts.append(f"{e[key]} {what}")
    return ", ".join(parts)


def markdown(r: dict[str, Any]) -> str:
    """The scenario's table: one row per target, then the ratios and any errors."""
    p, w = r["params"], r["workers"]
    bare = f", bare relay {fmt_workers(w['bare'])}" if "bare" in w else ""
    if "stored" in w:
        how = "one store writer" if r.get("stored_writes") == "writer" else "each worker writing"
        bare += f", bare relay + store {fmt_workers(w['stored'])} ({how})"
    lines = [f"### {r['title']}", ""]
    lines += [
        f"- {p['connections']} connections, each sending its next message as soon as the "
        f"reply to its previous one is in (no think time); {p['duration']:g} s measured after "
        f"{p['warmup']:g} s warm-up per target, one target after the other; client processes: "
        f"{r['procs']}; zero-delay fake Ollama ({p.get('tokens', TOKENS)} tokens a reply); "
        f"chatd {fmt_workers(w['chatd'])}{bare}",
        "- replies/s: replies received in the measured window / its length; latency from each "
        "message's send; CPU per reply: CPU seconds in the window / those replies",
        "",
        "| target | replies/s | reply p50 / p99 (ms) | worker CPU / reply | master CPU / reply "
        "| fake CPU / reply | clients CPU | sent / answered | errors / lost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, t in r["targets"].items():
        lat, per, e = t["reply_ms"], t["cpu_us_per_reply"], t["errors"]
        name = LABELS[kind] + (f" ({fmt_workers(w[kind])})" if kind in w else "")
        lines.append(
            f"| {name} | {num(t['replies_per_s'], '', 1)} "
            f"| {num(lat.get('p50'), '', 2)} / {num(lat.get('p99'), '', 2)} "
            f"| {num(per.get('workers'), ' µs')} | {num(per.get('master'), ' µs')} "
            f"| {num(per.get('backend'), ' µs')} "
            f"| {num(t['pct_of_core'].get('clients'), ' %')} "
            f"| {num(t['sent'])} / {num(t['answered'])} "
            f"| {e['total'] - e['lost']} / {e['lost']} |"
        )
    lines.append("")
    ra, g = r["ratios"], r["goal"]
    if "bare" in r["targets"]:
        status = g["status"] or "–"
        why = f", {g['why']}" if g.get("why") else ""
        lines.append(
            f"- chatd / bare relay: closed-loop rate **{num(ra['rate'], '', 2)}** (issue #13's "
            f"goal ≥ {g['rate_ratio_at_least']:g}: {status}{why}); workers' CPU per reply "
            f"{num(ra['worker_cpu_per_reply'], '×', 2)}; reply p50 "
            f"{num(ra['reply_p50'], '×', 2)}, p99 {num(ra['reply_p99'], '×', 2)}"
        )
    else:
        lines.append("- no bare relay: the fake Ollama's URL is unknown (--fake-url)")
    rs = r.get("ratios_stored")
    if rs:
        lines.append(
            f"- chatd / bare relay + store (the same promises kept, nothing else): closed-loop "
            f"rate {num(rs['rate'], '', 2)}; workers' CPU per reply "
            f"{num(rs['worker_cpu_per_reply'], '×', 2)}; reply p50 {num(rs['reply_p50'], '×', 2)}"
            f", p99 {num(rs['reply_p99'], '×', 2)}"
        )
    for kind, t in r["targets"].items():
        if t["errors"]["total"]:
            lines.append(f"- {LABELS[kind]}'s errors: {_error_words(t['errors'])}")
    slow = r["targets"]["chatd"].get("slowest")
    if slow:
        lines.append(report.slowest_line(slow).replace("- Where", "- chatd: where", 1))
    return "\n".join([*lines, ""])
