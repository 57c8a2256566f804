"""The seed report's tables, filled with measured values: Markdown and the same data as JSON.

Every table of the seed report (``Test 1``-``Test 5``, the failure scenarios, the response
time distribution, throughput characteristics, resource utilisation and the comparison with
requirements) is reproduced, with a ``Seed claim`` column next to the measured value so a
reader sees both. A status says whether the measurement meets the claim (``meets``) or not
(``MISSES``); it is never decided by anything but the two numbers. Definitions of every
figure are in :mod:`chatd.bench.scenarios` and :mod:`chatd.bench.stats`.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from chatd.bench.scenarios import SCENARIOS
from chatd.bench.server import Target

# The seed's claims per load scenario: avg, p95, p99 (ms), throughput (msg/min), memory (MB),
# CPU (%), error rate (%), connection stability (%). None: the seed gave no figure.
SEED: dict[str, tuple[float | None, ...]] = {
    "baseline": (245, 320, 450, 6, 256, 5, 0, None),
    "low": (260, 340, 500, 100, 320, 8, 0, 100),
    "medium": (280, 380, 550, 1000, 450, 25, 0.01, 99.98),
    "high": (350, 450, 700, 10000, 512, 45, 0.02, 99.95),
    "peak": (400, None, 800, 60000, 512, 62, 0, None),
}
HIGHER_IS_BETTER = {3, 7}  # throughput, stability
THROUGHPUT_ROW = 3


def meta(argv: list[str] | None, target: Target) -> dict[str, Any]:
    """When, where and how the report was made (the command, the machine, the tree)."""
    try:
        rev = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, timeout=5, check=False
            )
            .stdout.decode()
            .strip()
        )
    except (OSError, subprocess.TimeoutExpired):
        rev = ""
    return {
        "command": "chatd-bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "host": platform.node(),
        "cores": psutil.cpu_count() or 1,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "git": rev,
        "target": "own fake + chatd" if target.fake_pid is not None else target.url,
    }


def build(results: list[dict[str, Any]], meta_: dict[str, Any]) -> dict[str, Any]:
    """The report's data: the meta, every scenario's figures, the requirements table."""
    by = {r["name"]: r for r in results}
    return {"meta": meta_, "scenarios": by, "requirements": requirements(by)}


def _v(x: Any, unit: str = "", digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float | int):
        return f"{x:,.{digits}f}{unit}"
    return f"{x}{unit}"


def _status(measured: float | None, claim: float | None, higher_better: bool) -> str:
    if measured is None or claim is None or math.isnan(measured):
        return "–"
    ok = measured >= claim if higher_better else measured <= claim
    return "meets" if ok else "MISSES"


def _throughput_status(r: dict[str, Any], per_min: float, claim: float) -> str:
    """A load's throughput *meets* its claim when every message of the window was answered
    without error and the reply rate is within 1 % of the claim, or short of it by at most
    one message over the window: the rate is an estimate from a window of replies
    (scenarios.summarize) whose edges can miss a reply or two of a target that keeps up
    exactly, and a short window at a low rate counts whole messages (at 100 msg/min for
    10 s, one message is 6 msg/min)."""
    errors = r["chatd"]["errors"]["total"]
    minutes = r["params"]["duration"] / 60.0
    close = per_min >= 0.99 * claim or (claim - per_min) * minutes <= 1.0 + 1e-9
    return "meets" if errors == 0 and close else "MISSES"


def _load_rows(r: dict[str, Any]) -> list[tuple[str, float | None, str, int]]:
    """(metric, measured, unit, digits) for the seed's Test 1-4 table."""
    c, lat = r["chatd"], r["chatd"]["reply_ms"]
    return [
        ("Avg Response Time", lat.get("mean"), " ms", 2),
        ("P95 Response Time", lat.get("p95"), " ms", 2),
        ("P99 Response Time", lat.get("p99"), " ms", 2),
        ("Throughput", c["throughput_per_min"], " msg/min", 1),
        ("Memory Usage (RSS peak, all chatd processes)", r["memory"]["rss_peak_mb"], " MB", 1),
        ("CPU Usage (chatd, % of one core)", r["cpu"]["chatd_pct_of_core"], " %", 1),
        ("Error Rate", c["error_rate_pct"], " %", 3),
        ("Connection Stability", r["connections"]["stability_pct"], " %", 2),
    ]


def scenario_markdown(r: dict[str, Any]) -> str:
    """One scenario: configuration, the seed's table with measured values, extra tables."""
    if r["name"] == "real":
        from chatd.bench.realreport import markdown as real_markdown

        return real_markdown(r)
    if r["name"] in ("max", "idle", "closed"):
        from chatd.bench.longrun import markdown as long_markdown

        return long_markdown(r)
    if r["name"] == "fairness":
        from chatd.bench.fairness import markdown as fairness_markdown

        return fairness_markdown(r)
    if r["name"] == "http":
        from chatd.bench.httpapi import markdown as http_markdown

        return http_markdown(r)
    if r["name"] == "reload":
        from chatd.bench.reloads import markdown as reload_markdown

        return reload_markdown(r)
    if r["name"] == "capacity":
        from chatd.bench.capacity import markdown as capacity_markdown

        return capacity_markdown(r)
    p = r["params"]
    lines = [f"### {r['title']}", ""]
    lines += [
        f"- Connections: {p['connections']}; offered rate: {p['rate'] * 60:,.1f} msg/min "
        f"({p['rate']:g} msg/s); measured {p['duration']:g} s after {p['warmup']:g} s "
        f"warm-up (default: {SCENARIOS[r['name']].duration:g} s); "
        f"client processes: {r['procs']}; client: {p['mode']}",
        "",
    ]
    if r["name"] in SEED:
        claims = SEED[r["name"]]
        lines += ["| Metric | Measured | Seed claim | Status |", "|---|---|---|---|"]
        for i, (name, val, unit, digits) in enumerate(_load_rows(r)):
            claim = claims[i]
            status = _status(val, claim, i in HIGHER_IS_BETTER)
            if i == THROUGHPUT_ROW and val is not None and claim is not None:
                status = _throughput_status(r, val, claim)
            lines.append(
                f"| {name} | {_v(val, unit, digits)} | {_v(claim, unit, 2 if i == 6 else 0)} "
                f"| {status} |"
            )
        if r["name"] == "peak":
            q = r["server_after"].get("queue", {})
            lines.append(f"| Queue depth (at the end) | {q.get('depth', '–')} | 500 | – |")
            lines.append(f"| Message Loss | {r['chatd']['errors']['lost']} | 0 | – |")
        lines += ["", _latency_table(r), ""]
        slow = r["chatd"].get("slowest")
        if slow:
            lines += [slowest_line(slow), ""]
    if "failure" in r:
        lines += [*_failure_lines(r), ""]
    return "\n".join(lines)


def _latency_table(r: dict[str, Any]) -> str:
    """chatd against the direct baseline: ack, first token, reply; the overhead ratio; CPU
    µs per reply (chatd's workers, the backend)."""
    c = r["chatd"]
    rows = ["| | ack p50 / p99 | first token p50 / p99 | reply p50 / p95 / p99 (ms) | errors "]
    rows[0] += "| CPU per reply: workers / backend (µs) |"
    rows.append("|---|---|---|---|---|---|")

    def fmt(s: dict[str, Any], keys: tuple[str, ...]) -> str:
        return " / ".join(_v(s.get(k), "", 2) for k in keys)

    rows.append(
        f"| chatd | {fmt(c['ack_ms'], ('p50', 'p99'))} | {fmt(c['first_token_ms'], ('p50', 'p99'))}"
        f" | {fmt(c['reply_ms'], ('p50', 'p95', 'p99'))} | {c['errors']['total']} "
        f"| {cpu_per_reply(r['cpu'])} |"
    )
    if "direct" in r:
        d = r["direct"]
        rows.append(
            f"| direct to the backend | – | {fmt(d['first_token_ms'], ('p50', 'p99'))}"
            f" | {fmt(d['reply_ms'], ('p50', 'p95', 'p99'))} | {d['errors']['total']} "
            f"| {cpu_per_reply(d['cpu'])} |"
        )
        o = r["overhead"]
        rows.append(
            f"| overhead (chatd / direct) | – | – | {_v(o['p50'], '×', 2)} / "
            f"{_v(o['p95'], '×', 2)} / {_v(o['p99'], '×', 2)} | – | – |"
        )
    return "\n".join(rows)


def slowest_line(s: dict[str, Any]) -> str:
    """Where the slowest replies' time went (the replies' ``stats.stages``), against all."""

    def parts(m: dict[str, Any]) -> str:
        return (
            f"client send lag {m['send_lag_ms']:.2f}, "
            f"commit {m['commit_ms']:.2f}, queue {m['queue_ms']:.2f}, first token "
            f"{m['first_token_ms']:.2f}, stream {m['stream_ms']:.2f}, rest {m['rest_ms']:.2f}"
        )

    a = s["all"]
    return (
        f"- Where the time went, mean ms (stages from the replies' `stats.stages`; rest: storing "
        f"the reply, writing it, network, reading on both sides): slowest "
        f"{s['fraction'] * 100:g} % "
        f"({s['n']} of {s['of']} replies, {s['reply_ms']:.2f} ms): {parts(s)}; all replies "
        f"({a['reply_ms']:.2f} ms): {parts(a)}"
    )


def cpu_per_reply(cpu: dict[str, Any]) -> str:
    """``workers / backend`` CPU µs per reply of a run's ``cpu`` figures (– where unknown)."""
    per = cpu.get("per_reply_us", {})
    return f"{_v(per.get('workers'), '', 0)} / {_v(per.get('backend'), '', 0)}"


def _failure_lines(r: dict[str, Any]) -> list[str]:
    f, c, conn = r["failure"], r["chatd"], r["connections"]
    n = r["name"]
    out = [
        f"- Messages: {c['scheduled']} scheduled in the window, {c['answered']} answered, "
        f"{c['errors']['lost']} lost, errors {c['errors']['by_code'] or 'none'}",
        f"- Reply latency: mean {_v(c['reply_ms'].get('mean'), ' ms', 1)}, "
        f"p99 {_v(c['reply_ms'].get('p99'), ' ms', 1)}",
        f"- Reconnects: {conn['reconnects']} (resumed {conn['resumes']}); "
        f"duplicate answers: {conn['duplicate_answers']}",
    ]
    if n == "crash":
        out.append(
            f"- Killed worker pid {f.get('killed_pid')}: detection "
            f"{_v(f.get('detection_ms'), ' ms')}, recovery {_v(f.get('recovery_ms'), ' ms')}"
        )
    elif n == "latency-spike":
        ph = f.get("phases", [])
        parts = [
            f"{name} p50 {_v(x.get('p50'), ' ms')}"
            for name, x in zip(("before", "during +500 ms", "after"), ph, strict=False)
        ]
        out.append("- " + "; ".join(parts) + ("" if f.get("spike_applied") else " (NOT applied)"))
    elif n == "memory":
        m = r["memory"]
        verdict = "within" if m["rss_peak_mb"] <= m["budget_mb"] else "OVER"
        out.append(
            f"- RSS peak of all chatd processes {m['rss_peak_mb']:.1f} MB: {verdict} the "
            f"{m['budget_mb']:.0f} MB budget; per process {m['rss_peak_per_process_mb']}"
        )
    elif n == "drops":
        out.append(
            f"- Cut on purpose: {conn['cut_on_purpose']}; cut -> welcome again "
            f"p50 {_v(conn['reconnect_ms'].get('p50'), ' ms')}, "
            f"max {_v(conn['reconnect_ms'].get('max'), ' ms')}"
        )
    elif n == "llm-timeout":
        t = f.get("time_to_error_ms", {})
        out.append(
            f"- Backend hung during {f.get('outage_s')} s of the run; send -> llm_timeout "
            f"p50 {_v(t.get('p50'), ' ms')}, max {_v(t.get('max'), ' ms')} "
            f"({t.get('count', 0)} messages); other clients during the outage: "
            f"{f.get('during_outage', 'not probed')}"
        )
    return out


def requirements(by: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The seed's "comparison with requirements" rows, each decided on measured values."""
    loads = [r for n, r in by.items() if n in SEED]
    rows: list[dict[str, Any]] = []

    def add(req: str, target: str, achieved: str, ok: bool | None) -> None:
        status = "–" if ok is None else ("PASS" if ok else "FAIL")
        rows.append({"requirement": req, "target": target, "achieved": achieved, "status": status})

    for n, users in (("low", 10), ("medium", 100)):
        r = by.get(n)
        if r is None:
            add(f"Support {users} concurrent users", str(users), "not run", None)
            continue
        opened, err = r["connections"]["opened"], r["chatd"]["errors"]["total"]
        add(
            f"Support {users} concurrent users",
            str(users),
            f"{opened} open, {err} errors",
            opened >= users and err == 0,
        )
    tp = max((r["chatd"]["throughput_per_min"] for r in loads), default=None)
    add(
        "Handle 1000 msg/min",
        "1,000 msg/min",
        _v(tp, " msg/min", 0),
        None if tp is None else tp >= 1000,
    )
    means = [r["chatd"]["reply_ms"].get("mean") for r in loads]
    avg = max((x for x in means if x is not None), default=None)
    add(
        "Response time <500ms",
        "< 500 ms avg (worst scenario)",
        _v(avg, " ms", 2),
        None if avg is None or math.isnan(avg) else avg < 500,
    )
    cpu = max((r["cpu"]["chatd_pct_of_core"] / r["cpu"]["cores"] for r in loads), default=None)
    add("CPU <80%", "< 80 % of the machine", _v(cpu, " %"), None if cpu is None else cpu < 80)
    mem = max((r["memory"]["rss_peak_mb"] for r in by.values() if "memory" in r), default=None)
    add("Memory <2GB", "< 2,048 MB RSS", _v(mem, " MB"), None if mem is None else mem < 2048)
    er = max((r["chatd"]["error_rate_pct"] for r in loads), default=None)
    add("Error rate <1%", "< 1 %", _v(er, " %", 3), None if er is None else er < 1)
    stab = min((r["connections"]["stability_pct"] for r in loads), default=None)
    add(
        "Uptime 99%+",
        ">= 99 % connections kept",
        _v(stab, " %", 2),
        None if stab is None else stab >= 99,
    )
    return rows


def markdown(doc: dict[str, Any]) -> str:
    """The whole report."""
    m, by = doc["meta"], doc["scenarios"]
    lines = [
        "# chatd load test results (measured)",
        "",
        f"- Command: `{m['command']}`",
        f"- Date (UTC): {m['date_utc']}; git {m['git'] or '?'}; Python {m['python']}",
        f"- Machine: {m['cores']} cores, {m['memory_gb']} GB; the load generator, the backend "
        "and chatd **share these cores**",
        f"- Target: {m['target']}. Latency is measured from each message's *intended* send "
        "time (open loop, no coordinated omission).",
        "",
        "## Test results",
        "",
    ]
    for r in by.values():
        if r["name"] in SEED:
            lines.append(scenario_markdown(r))
    lines += ["## Failure scenario tests", ""]
    for r in by.values():
        if "failure" in r:
            lines.append(scenario_markdown(r))
    long = [r for r in by.values() if r["name"] in ("max", "idle", "closed")]
    if long:
        lines += ["## Against the bare relay: sustained rate, idle connections, closed loop", ""]
        lines += [scenario_markdown(r) for r in long]
    lines += _distribution(by) + _characteristics(by)
    if "capacity" in by:
        lines += ["## Capacity analysis", "", scenario_markdown(by["capacity"])]
    lines += ["## Comparison with requirements", ""]
    lines += ["| Requirement | Target | Achieved | Status |", "|---|---|---|---|"]
    for row in doc["requirements"]:
        lines.append(
            f"| {row['requirement']} | {row['target']} | {row['achieved']} | {row['status']} |"
        )
    return "\n".join(lines) + "\n"


def _distribution(by: dict[str, dict[str, Any]]) -> list[str]:
    """Reply latency distribution over every load scenario's measured messages."""
    counts: dict[str, int] = {}
    for n, r in by.items():
        if n in SEED:
            for label, k in r["chatd"]["histogram"]:
                counts[label] = counts.get(label, 0) + k
    total = sum(counts.values())
    out = ["## Performance characteristics", "", "### Response time distribution", ""]
    out += ["| Response time (ms) | Messages | Percentage |", "|---|---|---|"]
    for label, k in counts.items():
        out.append(f"| {label} | {k} | {100 * k / total if total else 0:.2f} % |")
    return [*out, ""]


def _characteristics(by: dict[str, dict[str, Any]]) -> list[str]:
    out = ["### Throughput characteristics", ""]
    out += ["| Concurrent users | Avg response time | Throughput | RSS peak | chatd CPU |"]
    out += ["|---|---|---|---|---|"]
    for n, r in by.items():
        if n in SEED:
            out.append(
                f"| {r['params']['connections']} ({n}) | "
                f"{_v(r['chatd']['reply_ms'].get('mean'), ' ms', 2)} | "
                f"{_v(r['chatd']['throughput_per_min'], ' msg/min')} | "
                f"{_v(r['memory']['rss_peak_mb'], ' MB')} | "
                f"{_v(r['cpu']['chatd_pct_of_core'], ' %')} |"
            )
    return [*out, ""]


def write(doc: dict[str, Any], out: Path) -> list[Path]:
    """``out/report.md`` and ``out/report.json``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "report.md", out / "report.json"
    md.write_text(markdown(doc))
    js.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return [md, js]
