"""The scenarios, named after the seed report's tests, and how one is run and measured.

Load scenarios (the seed's parameters are the defaults; ``--duration`` shortens the measured
window): ``baseline`` 1 connection at 1 msg/10 s (5 min), ``low`` 10 at 100 msg/min (15 min),
``medium`` 100 at 1,000 msg/min (30 min), ``high`` 1,000 at 10,000 msg/min (30 min), ``peak``
100 at 1,000 msg/s (60 s). Each is followed by the direct baseline (:mod:`chatd.bench.direct`)
when the backend is known, so its overhead ratio is measured in the same run.

Failure scenarios (ChatClient connections, see :mod:`chatd.bench.load`):

- ``crash``: SIGKILL one worker (pid from ``chatctl status``) half-way. *Detection*: kill ->
  the master lists a different pid or a higher restart count; *recovery*: kill -> every slot
  ``ready`` again; lost = messages never answered.
- ``latency-spike``: ``extra_latency_ms = 500`` on the fake for the middle third; reply
  latency per third, errors; *recovery*: last third p50 against the first's.
- ``memory``: RSS of every chatd process sampled every 0.25 s under 200 connections, peak
  against a 256 MB budget.
- ``drops``: 10 % of the connections cut at random half-way (the TCP connection aborted);
  the client reconnects and resumes; reconnect time, lost and duplicated answers.
- ``llm-timeout``: the fake stops answering (``hang``) for ``first_token_timeout`` + 1.5 s:
  time from send to the ``llm_timeout`` error; meanwhile a new connection's hello -> welcome
  and a ping -> pong on it (other clients unaffected).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
from websockets.asyncio.client import connect as ws_connect

from chatd.bench import fleet, load, server
from chatd.bench import stats as st
from chatd.bench.load import LoadResult, Record
from chatd.bench.pyspy import PySpy
from chatd.bench.server import Target

MEMORY_BUDGET_MB = 256.0


@dataclass(frozen=True)
class Scenario:
    """One scenario's parameters (rate in messages per second, durations in seconds)."""

    name: str
    title: str
    connections: int
    rate: float
    duration: float
    mode: str = "raw"
    failure: bool = False


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("baseline", "Test 1: Baseline Performance", 1, 0.1, 300.0),
        Scenario("low", "Test 2: Low Load (10 Concurrent Users)", 10, 100 / 60, 900.0),
        Scenario("medium", "Test 3: Medium Load (100 Concurrent Users)", 100, 1000 / 60, 1800.0),
        Scenario("high", "Test 4: High Load (1000 Concurrent Users)", 1000, 10000 / 60, 1800.0),
        Scenario("peak", "Test 5: Peak Throughput (1000 msg/sec)", 100, 1000.0, 60.0),
        Scenario("crash", "Scenario 1: Bot Crash", 20, 20.0, 30.0, "client", True),
        Scenario("latency-spike", "Scenario 2: Latency Spike", 20, 20.0, 30.0, "client", True),
        Scenario("memory", "Scenario 3: Memory Budget", 200, 50.0, 30.0, "client", True),
        Scenario("drops", "Scenario 4: Connection Drops", 20, 20.0, 30.0, "client", True),
        Scenario("llm-timeout", "Scenario 5: LLM Timeout", 10, 5.0, 30.0, "client", True),
    )
}
LOAD_SCENARIOS = [n for n, s in SCENARIOS.items() if not s.failure]
FAILURE_SCENARIOS = [n for n, s in SCENARIOS.items() if s.failure]


def summarize(
    records: list[Record], warmup: float, duration: float, bounds: tuple[float, ...] = ()
) -> dict[str, Any]:
    """Figures of the messages whose intended send time is in the measured window.

    ``reply_ms``/``ack_ms``/``first_token_ms``: intended send -> reply / ack / first token
    (ms; summaries). ``throughput``: the replies received in a window as long as the measured
    one but later by the median reply latency, per second: in a steady state, the replies to
    the window's messages; unshifted, the replies of the window's last milliseconds would
    fall outside it and a target keeping up exactly would read a hair below the offered rate.
    ``replies_in_window``: replies received inside the window (the CPU window's messages).
    ``errors``: final errors by code, ``lost`` (no answer by the end of the drain);
    ``error_rate_pct`` = (errors + lost) / scheduled. ``histogram``: reply latency counts per
    bucket of the seed's table. ``timeline``: per second of intended send time, p50/p99/max.
    """
    w0, w1 = warmup, warmup + duration
    inside = [r for r in records if w0 <= r[0] < w1]
    ok = [r for r in inside if r[4] is not None and r[5] is None]
    reply = [(r[4] - r[0]) * 1000.0 for r in ok if r[4] is not None]
    codes: dict[str, int] = {}
    for r in inside:
        if r[5] is not None:
            codes[r[5]] = codes.get(r[5], 0) + 1
    lost = sum(1 for r in inside if r[4] is None)
    in_window = sum(1 for r in records if r[5] is None and r[4] is not None and w0 <= r[4] < w1)
    lag = st.percentile(sorted(reply), 50) / 1000.0 if reply else 0.0
    shifted = sum(
        1 for r in records if r[5] is None and r[4] is not None and w0 + lag <= r[4] < w1 + lag
    )
    n_err = sum(codes.values()) + lost
    return {
        "scheduled": len(inside),
        "answered": len(ok),
        "reply_ms": st.summary(reply),
        "ack_ms": st.summary((r[2] - r[0]) * 1000.0 for r in inside if r[2] is not None),
        "first_token_ms": st.summary((r[3] - r[0]) * 1000.0 for r in inside if r[3] is not None),
        "send_lag_ms": st.summary((r[1] - r[0]) * 1000.0 for r in inside if r[1] is not None),
        "replies_in_window": in_window,
        "throughput_per_s": round(st.rate(shifted, duration), 3),
        "throughput_per_min": round(60 * st.rate(shifted, duration), 1),
        "errors": {"by_code": codes, "lost": lost, "total": n_err},
        "error_rate_pct": round(100.0 - st.share_pct(len(inside) - n_err, len(inside)), 4),
        "histogram": st.histogram(reply, bounds or st.SEED_BUCKETS_MS),
        "timeline": st.timeline(
            ((r[0] - w0, (r[4] - r[0]) * 1000.0) for r in ok if r[4] is not None), duration
        ),
    }


class _Sampler:
    """RSS of every chatd process (pids from status, re-read when a worker is replaced)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.pids = server.chatd_pids(target.status() or {})
        self.peak_total_mb = 0.0
        self.peak_mb: dict[str, float] = {}
        self.series: list[tuple[float, float]] = []

    def sample(self, t: float) -> None:
        rss = {name: server.rss_bytes(pid) / 2**20 for name, pid in self.pids.items()}
        total = sum(rss.values())
        self.series.append((round(t, 2), round(total, 2)))
        self.peak_total_mb = max(self.peak_total_mb, total)
        for k, v in rss.items():
            self.peak_mb[k] = round(max(self.peak_mb.get(k, 0.0), v), 2)


def _progress_bar(total: float, label: str, enabled: bool) -> Any:
    """A tqdm bar over the run's seconds when stderr is a TTY and tqdm is installed."""
    if not enabled:
        return None
    try:
        import importlib

        tqdm = importlib.import_module("tqdm").tqdm
    except ImportError:
        return None
    return tqdm(total=round(total, 1), desc=label, unit="s", leave=False, dynamic_ncols=True)


def run_load(
    sc: Scenario,
    target: Target,
    mode: str,
    url: str,
    window: tuple[float, float, float],
    procs: int,
    actions: list[tuple[float, Callable[[], None]]] | None = None,
    sampler: _Sampler | None = None,
    progress: bool = False,
    drop_at: float | None = None,
    before_go: Callable[[], None] | None = None,
) -> tuple[LoadResult, dict[str, float]]:
    """One load run with ``actions`` at given times (s from the start) in this process;
    returns the merged result and CPU seconds used in the measured window per process.
    ``before_go``: called with every connection open and idle, before the first message
    (:func:`chatd.bench.fleet.start`)."""
    jobs = fleet.split(mode, url, sc.connections, procs, sc.rate, window)
    for j in jobs:
        j.drop_at, j.drop_fraction = drop_at, 0.1
    run = fleet.start(jobs, before_go=before_go)
    warmup, duration, drain = window
    watched = dict(server.chatd_pids(target.status() or {})) if mode != "direct" else {}
    if target.fake_pid:
        watched["fake"] = target.fake_pid
    for p, _ in run.procs:
        watched[f"client {p.pid}"] = p.pid or 0
    todo = sorted(actions or [], key=lambda a: a[0])
    bar = _progress_bar(warmup + duration, f"{sc.name} ({mode})", progress)
    cpu0: dict[str, float] = {}
    cpu1: dict[str, float] = {}
    try:
        while True:
            t = time.time() - run.start_wall
            if not cpu0 and t >= warmup:
                cpu0 = {k: server.cpu_seconds(pid) for k, pid in watched.items()}
            if not cpu1 and t >= warmup + duration:
                cpu1 = {k: server.cpu_seconds(pid) for k, pid in watched.items()}
            while todo and t >= todo[0][0]:
                todo.pop(0)[1]()
            if sampler is not None:
                sampler.sample(t)
            if bar is not None:
                bar.n = round(min(t, warmup + duration), 1)
                bar.set_postfix(answers=run.replies(), refresh=True)
            if cpu1 and not todo:
                break
            time.sleep(0.25)
    finally:
        if bar is not None:
            bar.close()
    result = fleet.collect(run, drain + 60)
    return result, {k: round(cpu1.get(k, 0.0) - cpu0.get(k, 0.0), 3) for k in watched}


def _connections(sc: Scenario, r: LoadResult) -> dict[str, Any]:
    """Connection stability: connections that opened and were not lost for good, in %."""
    unexpected = r.closed + r.connect_failed
    return {
        "requested": sc.connections,
        "opened": r.connections_opened,
        "connect_failed": r.connect_failed,
        "closed_by_server": r.closed,
        "cut_on_purpose": r.drops,
        "reconnects": r.reconnects,
        "resumes": r.resumes,
        "reconnect_ms": st.summary(r.reconnect_ms),
        "duplicate_answers": r.duplicates,
        "stability_pct": round(st.share_pct(sc.connections - unexpected, sc.connections), 3),
    }


def _cpu(cpu: dict[str, float], duration: float, replies: int) -> dict[str, Any]:
    """CPU in % of one core over the measured window, per process and for all of chatd; CPU
    µs per reply received in the window by group (:func:`stats.cpu_per_reply`)."""
    pct = {k: round(100 * v / duration, 1) for k, v in cpu.items()}
    chatd = sum(v for k, v in pct.items() if k == "master" or st.serves(k))
    clients = sum(v for k, v in pct.items() if k.startswith("client"))
    return {
        "chatd_pct_of_core": round(chatd, 1),
        "clients_pct_of_core": round(clients, 1),
        "per_process_pct": pct,
        "per_reply_us": st.cpu_per_reply(cpu, replies),
        "cores": psutil.cpu_count() or 1,
    }


def _probe(url: str) -> dict[str, float]:
    """A new connection: ms for the handshake + hello -> welcome, then ping -> pong."""

    async def go() -> dict[str, float]:
        t0 = time.perf_counter()
        async with ws_connect(url, **load.WS_OPTS) as ws:
            await ws.send(b'{"type":"hello"}', text=True)
            await asyncio.wait_for(ws.recv(), 5)
            t1 = time.perf_counter()
            await ws.send(b'{"type":"ping"}', text=True)
            while orjson.loads(await asyncio.wait_for(ws.recv(), 5)).get("type") != "pong":
                pass
            t2 = time.perf_counter()
        return {"welcome_ms": round((t1 - t0) * 1000, 2), "pong_ms": round((t2 - t1) * 1000, 2)}

    try:
        return asyncio.run(go())
    except Exception:
        return {"failed": 1.0}


def run_scenario(
    name: str,
    target: Target,
    duration: float | None = None,
    procs: int = 2,
    progress: bool = False,
    direct: bool = True,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Run scenario ``name`` against ``target``; a JSON-ready dict of every figure. With
    ``profile`` (a directory), py-spy records the first worker over the measured window of
    the chatd run into it (``out["profile"]``, :meth:`chatd.bench.pyspy.PySpy.finish`)."""
    sc = SCENARIOS[name]
    dur = sc.duration if duration is None else duration
    warmup = min(2.0, max(0.5, dur * 0.1))
    if sc.connections / sc.rate > dur / 2:  # a slow scenario (baseline): measure from t=0
        warmup = 0.0
    drain = 10.0 if name == "llm-timeout" else 5.0
    window = (warmup, dur, drain)
    sampler = _Sampler(target)
    actions: list[tuple[float, Callable[[], None]]] = []
    failure: dict[str, Any] = {}
    fake = target.fake_url
    if name == "crash":
        actions.append((warmup + dur / 2, lambda: failure.update(_crash(target))))
    elif name == "latency-spike" and fake:
        actions.append((warmup + dur / 3, lambda: server.fake_config(fake, extra_latency_ms=500)))
        actions.append((warmup + 2 * dur / 3, lambda: server.fake_config(fake, extra_latency_ms=0)))
    elif name == "llm-timeout" and fake:
        hang_at, hang_s = warmup + dur / 3, 5.0 + 1.5
        actions.append((hang_at, lambda: server.fake_config(fake, hang=True)))
        actions.append((hang_at + 1.0, lambda: failure.update(during_outage=_probe(target.url))))
        actions.append((hang_at + hang_s, lambda: server.fake_config(fake, hang=False)))
        failure["outage_s"] = [round(hang_at, 2), round(hang_at + hang_s, 2)]
    drop_at = warmup + dur / 2 if name == "drops" else None
    spy = None
    if profile is not None and target.worker_pids():
        pid = target.worker_pids()[0]
        spy = PySpy(pid, profile / f"{name}-worker-{pid}.speedscope.json", dur)
        actions.append((warmup, spy.start))
    before = server.server_figures(target.status())
    result, cpu = run_load(
        sc, target, sc.mode, target.url, window, procs, actions, sampler, progress, drop_at
    )
    time.sleep(1.1)  # workers report their stats every second
    after = server.server_figures(target.status())
    out_c = summarize(result.records, warmup, dur)
    out_c["slowest"] = st.slowest_stages(result.records, result.stages, warmup, warmup + dur)
    out: dict[str, Any] = {
        "name": name,
        "title": sc.title,
        "params": {**asdict(sc), "duration": dur, "warmup": warmup, "drain": drain},
        "procs": procs,
        "chatd": out_c,
        "connections": _connections(sc, result),
        "cpu": _cpu(cpu, dur, out_c["replies_in_window"]),
        "memory": {
            "rss_peak_mb": round(sampler.peak_total_mb, 2),
            "rss_peak_per_process_mb": sampler.peak_mb,
            "series": sampler.series,
            "budget_mb": MEMORY_BUDGET_MB,
        },
        "server_before": before,
        "server_after": after,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    if name == "latency-spike":
        thirds = [warmup + i * dur / 3 for i in range(4)]
        failure["phases"] = [
            summarize(result.records, thirds[i], dur / 3)["reply_ms"] for i in range(3)
        ]
        failure["spike_applied"] = bool(fake)
    if name == "llm-timeout":
        waits = [
            ((r[4] or 0) - (r[1] or 0)) * 1000.0 for r in result.records if r[5] == "llm_timeout"
        ]
        failure["time_to_error_ms"] = st.summary(waits)
        failure["hang_applied"] = bool(fake)
    if name == "drops":
        failure["cut"] = result.drops
    if spy is not None:
        out["profile"] = spy.finish()
    if sc.failure:
        out["failure"] = failure
    elif direct and fake:
        res_d, cpu_d = run_load(sc, target, "direct", fake, window, procs, progress=progress)
        d = summarize(res_d.records, warmup, dur)
        out["direct"] = d | {"cpu": _cpu(cpu_d, dur, d["replies_in_window"])}
        c, dd = out["chatd"]["reply_ms"], d["reply_ms"]
        out["overhead"] = {
            q: None if "p50" not in c or "p50" not in dd else _r(st.ratio(c[q], dd[q]))
            for q in ("p50", "p95", "p99", "mean")
        }
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _crash(target: Target) -> dict[str, Any]:
    """SIGKILL the first worker; time until the master notices and until it is replaced."""
    st0 = target.status() or {}
    workers = st0.get("workers", [])
    if not workers:
        return {"killed": None}
    victim = int(workers[0]["pid"])
    restarts0 = st0.get("totals", {}).get("worker_restarts_total", 0)
    t0 = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    detected = recovered = None
    while time.perf_counter() - t0 < 15 and recovered is None:
        doc = target.status() or {}
        now = (time.perf_counter() - t0) * 1000.0
        pids = [w.get("pid") for w in doc.get("workers", [])]
        gone = victim not in pids
        restarts = doc.get("totals", {}).get("worker_restarts_total", 0)
        if detected is None and (gone or restarts > restarts0):
            detected = now
        ready = all(w.get("state") == "ready" for w in doc.get("workers", []))
        if gone and ready and all(pids):
            recovered = now
        time.sleep(0.02)
    return {
        "killed_pid": victim,
        "detection_ms": None if detected is None else round(detected, 1),
        "recovery_ms": None if recovered is None else round(recovered, 1),
        "note": "each chatctl status call takes some ms: times are upper bounds",
    }
