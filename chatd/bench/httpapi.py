"""Scenario ``http``: the seed's peak load through ``/ws`` and through the two HTTP APIs.

In one run, against the same chatd, one after the other (a pause of ``pause`` s between
them), each for ``duration`` seconds (default 20) after a warm-up:

- ``ws``: the ``peak`` scenario's load path (:func:`chatd.bench.load.raw_load`: bare
  WebSocket frames, ``hello`` then ``message``; the reply is the ``reply`` frame, the first
  token the first ``token`` frame);
- ``ollama``: ``POST /api/chat`` with ``stream: true`` (NDJSON);
- ``openai``: ``POST /v1/chat/completions`` with ``stream: true`` (SSE),

each from ``connections`` client connections (default 100, the seed's peak) at an aggregate
``rate`` (default 1,000 per second), open loop, spread over ``procs`` client processes
(:mod:`chatd.bench.fleet`). A WebSocket connection has many messages in flight; an HTTP
connection (:mod:`chatd.bench.httpload`, keep-alive) carries one request at a time.

Figures per path (times in ms, from each message's **intended** send time, so a request that
waited for its connection, or for a stalled server, is charged that wait):

- ``sent``: requests (messages) actually sent whose intended time is in the measured window;
  ``scheduled`` (JSON): those intended in it; ``completed``: answered without error;
  ``errors.by_code``: ``http_STATUS`` (e.g. ``http_404`` before the API exists, ``http_429``,
  ``http_503``), ``stream_error``, ``truncated`` or an exception name (WebSocket: the
  ``error`` frame's code); ``errors.lost``: never answered by the end of the drain (including
  those never sent because their connection was still busy); ``bad_reply``: a reply whose
  text is not the fake's known answer.
- ``replies_per_s``: as ``peak``'s throughput (:func:`chatd.bench.scenarios.summarize`:
  replies received in the window shifted by the median latency, per second).
- ``latency_ms``: intended send -> last byte of the response (WebSocket: the ``reply``
  frame), p50 / p99 / p99.9 (``p999``) of the completed requests.
- ``ttft_ms``: intended send -> first content token (:mod:`chatd.bench.httpwire`; WebSocket:
  the first ``token`` frame).
- ``send_lag_ms``: actual minus intended send. Over HTTP it includes the wait for the
  previous request on the same connection.
- ``cpu``: over the measured window, % of one core of chatd (master and workers), of every
  client process and of the fake, CPU µs per reply (:func:`chatd.bench.stats.cpu_per_reply`),
  and ``machine_busy_pct``: the whole machine's busy share of all its cores
  (``psutil.cpu_times``). ``generator_saturated``: some client process used at least
  :data:`SATURATED_PCT` % of a core, so the load generator itself may be what limits the
  figures; ``machine_saturated``: the machine was at least :data:`MACHINE_SATURATED_PCT` %
  busy (the generator, chatd and the fake share its cores).

``--target URL`` sends the two HTTP loads to ``URL`` instead (e.g. the fake Ollama itself:
the same load without chatd, a direct baseline), with no ``/ws`` load and no chatd figures.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import psutil

from chatd.bench import scenarios, server
from chatd.bench import stats as st
from chatd.bench.httpwire import PATHS as API_PATHS
from chatd.bench.load import LoadResult, Record
from chatd.bench.server import Target

TITLE = "The HTTP APIs against /ws at the peak load"
PATHS = ("ws", "ollama", "openai")
MODE = {"ws": "raw", "ollama": "http-ollama", "openai": "http-openai"}
LABELS = {
    "ws": "/ws (WebSocket)",
    "ollama": "POST /api/chat (NDJSON)",
    "openai": "POST /v1/chat/completions (SSE)",
}
SATURATED_PCT = 90.0
MACHINE_SATURATED_PCT = 95.0


@dataclass(frozen=True)
class HttpParams:
    """The scenario's knobs (module docstring); rate in requests per second."""

    duration: float = 20.0
    connections: int = 100
    rate: float = 1000.0
    paths: tuple[str, ...] = PATHS
    procs: int = 2
    pause: float = 1.0
    drain: float = 5.0

    @property
    def warmup(self) -> float:
        return min(2.0, max(0.5, self.duration * 0.1))


class NoChatd(Target):
    """The target of ``--target URL``: nothing to ask for status, nothing to stop."""

    def __init__(self, url: str) -> None:
        super().__init__(url, "", None)

    def status(self) -> dict[str, Any] | None:
        return None


def http_base(url: str) -> str:
    """``http(s)://HOST:PORT`` of a chatd's ``ws(s)://HOST:PORT/ws`` (or any URL)."""
    u = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(u.scheme, u.scheme)
    return f"{scheme}://{u.netloc}"


def _window_pcts(records: Sequence[Record], w0: float, w1: float) -> dict[str, Any]:
    """p99.9 of reply latency and TTFT (ms, from the intended send) of the window's messages
    (the rest is :func:`chatd.bench.scenarios.summarize`'s)."""
    inside = [r for r in records if w0 <= r[0] < w1]
    reply = sorted((r[4] - r[0]) * 1000.0 for r in inside if r[4] is not None and r[5] is None)
    first = sorted((r[3] - r[0]) * 1000.0 for r in inside if r[3] is not None)
    return {
        "sent": sum(1 for r in inside if r[1] is not None),
        "latency_p999": round(st.percentile(reply, 99.9), 3) if reply else None,
        "ttft_p999": round(st.percentile(first, 99.9), 3) if first else None,
    }


def figures(
    result: LoadResult,
    cpu_s: dict[str, float],
    machine_busy_pct: float | None,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    """One path's figures (module docstring) from its merged load result and the CPU
    seconds per process over the window."""
    s = scenarios.summarize(result.records, warmup, duration)
    extra = _window_pcts(result.records, warmup, warmup + duration)
    cpu = scenarios._cpu(cpu_s, duration, s["replies_in_window"])
    clients = [v for k, v in cpu["per_process_pct"].items() if k.startswith("client")]
    cpu["client_max_pct_of_core"] = max(clients, default=0.0)
    cpu["machine_busy_pct"] = machine_busy_pct
    cpu["generator_saturated"] = cpu["client_max_pct_of_core"] >= SATURATED_PCT
    cpu["machine_saturated"] = (machine_busy_pct or 0.0) >= MACHINE_SATURATED_PCT
    latency = dict(s["reply_ms"])
    ttft = dict(s["first_token_ms"])
    if latency.get("count"):
        latency["p999"] = extra["latency_p999"]
    if ttft.get("count"):
        ttft["p999"] = extra["ttft_p999"]
    return {
        "scheduled": s["scheduled"],
        "sent": extra["sent"],
        "completed": s["answered"],
        "errors": s["errors"],
        "bad_reply": result.bad_reply,
        "replies_per_s": s["throughput_per_s"],
        "latency_ms": latency,
        "ttft_ms": ttft,
        "send_lag_ms": s["send_lag_ms"],
        "connections": {
            "opened": result.connections_opened,
            "failed": result.connect_failed,
            "closed_by_server": result.closed,
        },
        "cpu": cpu,
        "timeline": s["timeline"],
    }


class _MachineCpu:
    """The machine's busy share of all cores between two readings (``psutil.cpu_times``)."""

    def __init__(self) -> None:
        self.readings: list[Any] = []

    def read(self) -> None:
        self.readings.append(psutil.cpu_times())

    def busy_pct(self) -> float | None:
        if len(self.readings) < 2:
            return None
        a, b = self.readings[0], self.readings[1]
        total = sum(b) - sum(a)
        idle = (b.idle + getattr(b, "iowait", 0.0)) - (a.idle + getattr(a, "iowait", 0.0))
        return round(100.0 * (1.0 - idle / total), 1) if total > 0 else None


def run_http(
    target: Target | None,
    p: HttpParams,
    http_url: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The scenario against ``target`` (a chatd: ``/ws`` at ``target.url``, the HTTP APIs
    at its base URL) or, with ``target`` None, the HTTP paths only against ``http_url``
    (the fake Ollama, say). A JSON-ready dict (module docstring)."""
    if target is None and not http_url:
        raise ValueError("run_http needs a target or an http_url")
    unknown = set(p.paths) - set(PATHS)
    if unknown:
        raise ValueError(f"unknown paths {sorted(unknown)}: choose among {list(PATHS)}")
    load_target: Target = target if target is not None else NoChatd(http_url or "")
    base = (http_url or http_base(load_target.url)).rstrip("/")
    sc = scenarios.Scenario("http", TITLE, p.connections, p.rate, p.duration)
    window = (p.warmup, p.duration, p.drain)
    out: dict[str, Any] = {
        "name": "http",
        "title": TITLE,
        "params": {**asdict(p), "paths": list(p.paths), "warmup": p.warmup},
        "target": {"ws": None if target is None else target.url, "http": base},
        "procs": p.procs,
        "paths": {},
        "skipped": {},
    }
    for i, path in enumerate(p.paths):
        if path == "ws" and target is None:
            out["skipped"][path] = "no chatd (--target): no WebSocket load"
            continue
        if i and p.pause > 0:
            time.sleep(p.pause)
        url = load_target.url if path == "ws" else base + API_PATHS[path]
        machine = _MachineCpu()
        actions: list[tuple[float, Callable[[], None]]] = [
            (p.warmup, machine.read),
            (p.warmup + p.duration, machine.read),
        ]
        result, cpu = scenarios.run_load(
            sc, load_target, MODE[path], url, window, p.procs, actions, progress=progress
        )
        out["paths"][path] = figures(result, cpu, machine.busy_pct(), p.warmup, p.duration) | {
            "url": url
        }
    if target is not None:
        time.sleep(1.1)  # workers report their stats every second
        out["server_after"] = server.server_figures(target.status())
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _v(x: Any, digits: int = 1, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}{unit}"


def _pcts(s: dict[str, Any], keys: tuple[str, ...] = ("p50", "p99", "p999")) -> str:
    return " / ".join(_v(s.get(k), 2) for k in keys)


def _errors(e: dict[str, Any]) -> str:
    parts = [f"{code} {n}" for code, n in sorted(e["by_code"].items())]
    if e["lost"]:
        parts.append(f"lost {e['lost']}")
    return ", ".join(parts) or "0"


def markdown(r: dict[str, Any]) -> str:
    """The scenario's table: one row per path, then the CPU and the load generator's state."""
    p = r["params"]
    lines = [
        f"### {r['title']}",
        "",
        f"- {p['connections']} connections at {p['rate']:,.0f} requests/s in all (open loop), "
        f"each path {p['duration']:g} s after {p['warmup']:g} s warm-up, one after the other "
        f"against the same target; client processes: {r['procs']}; HTTP: keep-alive, one "
        "request at a time per connection, `stream: true`",
        f"- Target: {r['target']['ws'] or 'no chatd'} (WebSocket), {r['target']['http']} (HTTP)",
        "- Latency: intended send → last byte (WebSocket: the reply frame); TTFT: intended "
        "send → first content token (WebSocket: the first token frame)",
        "",
        "| path | sent | completed | errors | replies/s | latency p50 / p99 / p99.9 (ms) "
        "| TTFT p50 / p99 / p99.9 (ms) | send lag p99 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, f in r["paths"].items():
        lines.append(
            f"| {LABELS[path]} | {f['sent']:,} | {f['completed']:,} | {_errors(f['errors'])} "
            f"| {_v(f['replies_per_s'])} | {_pcts(f['latency_ms'])} | {_pcts(f['ttft_ms'])} "
            f"| {_v(f['send_lag_ms'].get('p99'), 2)} |"
        )
    lines += [
        "",
        "| path | chatd CPU (% of a core) | workers µs / reply | fake CPU (% of a core) "
        "| clients CPU (% of a core: all / busiest process) | machine busy | load generator |",
        "|---|---|---|---|---|---|---|",
    ]
    for path, f in r["paths"].items():
        c = f["cpu"]
        fake = c["per_process_pct"].get("fake")
        verdict = "saturated" if c["generator_saturated"] else "not saturated"
        if c["machine_saturated"]:
            verdict += "; machine saturated"
        lines.append(
            f"| {LABELS[path]} | {_v(c['chatd_pct_of_core'])} "
            f"| {_v(c['per_reply_us'].get('workers'), 0)} | {_v(fake)} "
            f"| {_v(c['clients_pct_of_core'])} / {_v(c['client_max_pct_of_core'])} "
            f"| {_v(c['machine_busy_pct'], 1, ' %')} | {verdict} |"
        )
    bad = {path: f["bad_reply"] for path, f in r["paths"].items() if f["bad_reply"]}
    conn = {path: f["connections"]["failed"] for path, f in r["paths"].items() if f["connections"]}
    failed = {k: v for k, v in conn.items() if v}
    lines.append("")
    if bad:
        lines.append(f"- Replies with unexpected text: {bad}")
    if failed:
        lines.append(f"- Connections whose warm-up request failed: {failed}")
    for path, why in r.get("skipped", {}).items():
        lines.append(f"- {LABELS[path]}: skipped ({why})")
    lines.append(
        f"- Load generator saturated: a client process at ≥ {SATURATED_PCT:g} % of a core; "
        f"machine saturated: ≥ {MACHINE_SATURATED_PCT:g} % of all cores busy"
    )
    return "\n".join([*lines, ""])
