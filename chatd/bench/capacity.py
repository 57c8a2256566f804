"""Scenario ``capacity``: the seed's server requirements, derived from chatd's measured costs.

The seed sizes deployments from guesses (:data:`SEED_TIERS`: MVP 50 users, 512 MB, 1-2 cores;
Small 200, 2 GB, 2-4; Medium 500, 4 GB, 4-8; Large 1000+, 8 GB+, 8+; and "per concurrent
user ~5 MB, ~0.5 % CPU at 100"). This scenario measures what chatd costs, in one short run
(:func:`run_capacity`), and derives the table from it (:func:`derive`):

1. **Warm-up**: ``WARM_CONNS`` connections exchange a few messages and close, so one-time
   allocations (first buffers, the relay's pool, the store's first pages) are not counted.
   What they freed is reused by the first connections measured: at 1,000 users about 2 % of
   them; at a few dozen users the per-connection figures read low.
2. **Before**: the RSS of every worker and of the master (psutil).
3. **Idle**: ``users`` N WebSocket connections open, each after hello -> welcome, spread over
   client processes (:mod:`chatd.bench.fleet`); ``SETTLE_S`` later the RSS again, then for
   ``idle_s`` seconds the CPU of the workers and of the master with the N connections open and
   silent (at most the measured window's length): chatd's **fixed CPU** (heartbeats, stats,
   lease renewals, the server's pings every ``ping_interval``, 20 s: a 5 s hold may see none;
   measured with N connections, it overstates a smaller tier's).
4. **Active**: the same N connections each send ``msgs_per_min`` messages a minute (the seed's
   10), open loop (the ``raw`` load of :mod:`chatd.bench.load`: R = N × msgs_per_min / 60
   msg/s in all, each message at its intended time), to the zero-delay fake Ollama, for
   ``duration`` seconds after ``warmup`` (at least two of a user's periods, so every user
   has sent twice); the CPU of every process over the measured window; the RSS once more
   ``READ_BEFORE_END_S`` before the window ends (the connections still open: the clients
   close them once their last answers are in).

The measured figures (:func:`measured`):

- RSS per idle connection = (workers' RSS idle - before) / connections opened (the method of
  :mod:`chatd.bench.idle`, :func:`chatd.bench.idle.kb_per_conn`); RSS per **active**
  connection = (workers' RSS active - before) / connections opened: the idle cost and what a
  session that has talked holds (its cached history after a few messages, its share of the
  store's cache and buffers).
- A worker's base RSS = workers' RSS before / workers; the master's RSS (read when active).
- Worker CPU per message = workers' CPU seconds in the window / replies received in it (at
  the seed's rate: the fixed cost spread over these messages is in it); the master's the same.
- Fixed CPU (cores) = (workers' + master's CPU seconds over the idle hold) / its seconds.
  Marginal CPU per message = (chatd's CPU seconds in the window - fixed × window) / replies,
  at least 0: what one more message costs.

The derivation, per tier of ``users`` U at ``msgs_per_min`` m (:func:`derive`), with the
headroom factor H (default 2: twice what was measured, for peaks and for a slower machine):

- rate = U × m / 60 msg/s;
- cores = H × (fixed cores + rate × marginal CPU per message); a deployment gets whole cores,
  at least 1, and one worker per core (chatd's rule: ``workers = 0``);
- memory = H × (master's RSS + workers × a worker's base RSS + U × RSS per active connection).

For chatd alone: the model (its memory, its cores or GPU), the OS and the store's file are
not in it. Above the measured N the figures are a linear extrapolation. The LLM's throughput
is the separate limit: U users at m msg/min ask the model for rate replies/s; with a ``run
real`` result (``--real-result PATH``, its ``real.json``) the table also gives the slots of
that model the tier needs, at the replies/s per slot it measured (:func:`llm_per_slot`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from chatd.bench import idle, scenarios, server
from chatd.bench import stats as st
from chatd.bench.scenarios import Scenario
from chatd.bench.server import Target

NAME = "capacity"
TITLE = "Capacity: the seed's server requirements, from chatd's measured costs"
WARM_CONNS = 20  # connections of the warm-up load (before the "before" reading)
WARM_S = 1.0  # its seconds, at 1 msg/s per connection
SETTLE_S = 1.5  # after every connection opened, before the "idle" reading
READ_BEFORE_END_S = 0.5  # the "active" reading: this long before the window's end
MIN_PERIODS = 2.0  # the window covers at least this many of a user's periods


@dataclass(frozen=True)
class Tier:
    """One row of the seed's "Server Requirements for Production" table."""

    name: str
    users: int
    memory_mb: float  # the seed's memory
    cores: tuple[int, int | None]  # the seed's cores: low, high (None: "8+")
    note: str
    more: bool = False  # "1000+": the seed's tier has no upper bound

    def users_text(self) -> str:
        return f"{self.users:,}" + ("+" if self.more else "")

    def memory_text(self) -> str:
        mb = self.memory_mb
        text = f"{mb / 1024:g} GB" if mb >= 1024 else f"{mb:g} MB"
        return text + ("+" if self.more else "")

    def cores_text(self) -> str:
        low, high = self.cores
        return f"{low}+" if high is None else f"{low}-{high}"


SEED_TIERS: tuple[Tier, ...] = (
    Tier("MVP", 50, 512, (1, 2), "Comfortable"),
    Tier("Small", 200, 2048, (2, 4), "Busy"),
    Tier("Medium", 500, 4096, (4, 8), "Good headroom"),
    Tier("Large", 1000, 8192, (8, None), "Redundancy needed", more=True),
)
SEED_PER_USER = {"memory_mb": 5.0, "cpu_pct": 0.5, "at_users": 100}
SEED_MSGS_PER_MIN = 10.0  # "Throughput per user: 10 msg/min (normal usage)"


@dataclass(frozen=True)
class CapacityParams:
    """The run (module docstring): rates in messages per minute per user, times in seconds."""

    users: int = 1000
    msgs_per_min: float = SEED_MSGS_PER_MIN
    duration: float = 30.0
    warmup: float = 2.0
    drain: float = 3.0
    idle_s: float = 5.0
    headroom: float = 2.0

    @property
    def rate(self) -> float:
        """All users together, msg/s."""
        return self.users * self.msgs_per_min / 60.0

    def window(self) -> float:
        """The measured seconds: ``duration``, at least ``MIN_PERIODS`` of a user's periods."""
        return max(self.duration, MIN_PERIODS * 60.0 / self.msgs_per_min)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``capacity`` scenario's options (``--conns`` is its users, ``--duration`` its
    measured window)."""
    g = p.add_argument_group("the capacity scenario (chatd-bench run capacity)")
    g.add_argument(
        "--msgs-per-min",
        type=float,
        default=SEED_MSGS_PER_MIN,
        help="capacity: messages a minute per user (default 10, the seed's)",
    )
    g.add_argument(
        "--headroom",
        type=float,
        default=2.0,
        help="capacity: the derived table's factor over what was measured (default 2)",
    )
    g.add_argument(
        "--real-result",
        type=Path,
        metavar="PATH",
        help="capacity: a `chatd-bench run real --out DIR` result (DIR/real.json): the model's "
        "replies/s per slot for the table",
    )


def params_from(args: argparse.Namespace, duration: float | None) -> CapacityParams:
    """The command line's parameters (``--conns`` users, default 1,000: the seed's Large)."""
    base = CapacityParams()
    if args.msgs_per_min is not None and not args.msgs_per_min > 0:
        raise SystemExit("chatd-bench: --msgs-per-min must be positive")
    if args.headroom is not None and not args.headroom >= 1:
        raise SystemExit("chatd-bench: --headroom must be at least 1")
    return CapacityParams(
        users=base.users if args.conns is None else args.conns,
        msgs_per_min=base.msgs_per_min if args.msgs_per_min is None else args.msgs_per_min,
        duration=base.duration if duration is None else duration,
        headroom=base.headroom if args.headroom is None else args.headroom,
    )


def read_real(path: Path | None) -> dict[str, Any] | None:
    """The ``real`` result in ``path`` (its JSON), or None without a path."""
    if path is None:
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"chatd-bench: --real-result {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("name") != "real":
        raise SystemExit(f"chatd-bench: --real-result {path}: not a `run real` result")
    doc["source"] = str(path)
    return doc


def llm_per_slot(real: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The model's replies per second per slot from a ``real`` result: its direct baseline's
    ``capacity_per_s`` (the model alone, ``slots`` closed-loop clients) / ``slots``; without
    a direct baseline, the replies/s through chatd (offered above the model's capacity, so
    the model's pace) / ``slots``. None without a result or a usable figure."""
    if not real:
        return None
    p = real.get("params") or {}
    slots = int(p.get("slots") or 0)
    direct = real.get("direct") or {}
    through = (real.get("chatd") or {}).get("throughput_per_s")
    if direct.get("capacity_per_s"):
        per_s, how = float(direct["capacity_per_s"]), "the model alone: direct, closed loop"
    elif through:
        per_s, how = float(through), "through chatd, offered above the model's capacity"
    else:
        return None
    if slots < 1 or per_s <= 0:
        return None
    return {
        "model": (real.get("model") or {}).get("name"),
        "slots": slots,
        "max_tokens": p.get("max_tokens"),
        "replies_per_s": round(per_s, 3),
        "per_slot": round(per_s / slots, 3),
        "how": how,
        "source": real.get("source"),
    }


def _mb(values: Mapping[int, int]) -> float:
    return round(sum(values.values()) / 2**20, 2)


def measured(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The measured costs (module docstring) from the run's readings: ``users`` (opened),
    ``workers`` (their number), ``window_s``, ``replies`` (in the window), ``rss_before`` /
    ``rss_idle`` / ``rss_active`` (worker pid -> bytes), ``master_rss`` (bytes, active),
    ``idle_cpu_s`` and ``idle_s`` (the hold: ``workers`` and ``master`` CPU seconds),
    ``cpu_s`` (the window: ``workers`` and ``master`` CPU seconds)."""
    n, w = int(raw["users"]), max(1, int(raw["workers"]))
    window, replies = float(raw["window_s"]), int(raw["replies"])
    before, idle_, active = raw["rss_before"], raw["rss_idle"], raw["rss_active"]
    idle_cpu, cpu = raw["idle_cpu_s"], raw["cpu_s"]
    hold = float(raw["idle_s"])
    fixed_w = idle_cpu["workers"] / hold if hold > 0 else 0.0
    fixed_m = idle_cpu["master"] / hold if hold > 0 else 0.0
    chatd_s = cpu["workers"] + cpu["master"]
    marginal = None
    if replies > 0:
        marginal = max(0.0, round((chatd_s - (fixed_w + fixed_m) * window) / replies * 1e6, 1))
    return {
        "users": n,
        "workers": w,
        "window_s": window,
        "replies": replies,
        "rate_per_s": round(replies / window, 3) if window > 0 else None,
        "idle_kb_per_conn": idle.kb_per_conn(before, idle_, n),
        "active_kb_per_conn": idle.kb_per_conn(before, active, n),
        "workers_rss_mb": {
            "before": _mb(before),
            "idle": _mb(idle_),
            "active": _mb(active),
        },
        "worker_base_mb": round(sum(before.values()) / w / 2**20, 2),
        "master_rss_mb": round(float(raw["master_rss"]) / 2**20, 2),
        "fixed_cores": {
            "workers": round(fixed_w, 4),
            "master": round(fixed_m, 4),
            "total": round(fixed_w + fixed_m, 4),
        },
        "window_cores": {
            "workers": round(cpu["workers"] / window, 4) if window > 0 else None,
            "master": round(cpu["master"] / window, 4) if window > 0 else None,
        },
        "worker_cpu_us_per_msg": st.per_message_us(cpu["workers"], replies),
        "master_cpu_us_per_msg": st.per_message_us(cpu["master"], replies),
        "marginal_cpu_us_per_msg": marginal,
    }


def derive(
    m: Mapping[str, Any],
    msgs_per_min: float,
    headroom: float,
    per_slot: float | None = None,
    tiers: tuple[Tier, ...] = SEED_TIERS,
) -> list[dict[str, Any]]:
    """The seed's tiers with chatd's needs from the measured costs ``m`` (:func:`measured`):
    per tier ``rate_per_s``, ``cores_needed`` (H × (fixed + rate × marginal)), ``cores``
    (whole, at least 1) = ``workers``, ``memory_mb`` (H × (master + workers × base + users ×
    active KB)), ``llm_replies_per_s`` (= the rate) and ``llm_slots`` (rate / ``per_slot``,
    None without it), next to the seed's claims. None where a measured figure is missing."""
    fixed = (m.get("fixed_cores") or {}).get("total")
    marginal = m.get("marginal_cpu_us_per_msg")
    active_kb = m.get("active_kb_per_conn")
    rows = []
    for t in tiers:
        rate = t.users * msgs_per_min / 60.0
        cores_needed = cores = memory = None
        if fixed is not None and marginal is not None:
            cores_needed = headroom * (fixed + rate * marginal * 1e-6)
            cores = max(1, math.ceil(cores_needed - 1e-9))
        if cores is not None and active_kb is not None:
            raw = m["master_rss_mb"] + cores * m["worker_base_mb"] + t.users * active_kb / 1024
            memory = headroom * raw
        rows.append(
            {
                "tier": t.name,
                "users": t.users,
                "users_text": t.users_text(),
                "rate_per_s": round(rate, 3),
                "cores_needed": None if cores_needed is None else round(cores_needed, 3),
                "cores": cores,
                "workers": cores,
                "memory_mb": None if memory is None else round(memory, 1),
                "llm_replies_per_s": round(rate, 3),
                "llm_slots": None if not per_slot else round(rate / per_slot, 1),
                "seed": {
                    "memory_mb": t.memory_mb,
                    "memory": t.memory_text(),
                    "cores": t.cores_text(),
                    "note": t.note,
                },
            }
        )
    return rows


def _rss(pids: Mapping[str, int]) -> dict[int, int]:
    return {pid: server.rss_bytes(pid) for pid in pids.values()}


def _cpu(pids: Mapping[str, int]) -> dict[str, float]:
    return {k: server.cpu_seconds(pid) for k, pid in pids.items()}


def _group(cpu_s: Mapping[str, float]) -> dict[str, float]:
    """CPU seconds of ``worker …`` keys together (with the ``store writer``: it does the
    workers' writes) and of ``master``."""
    workers = (v for k, v in cpu_s.items() if st.serves(k))
    return {
        "workers": round(sum(workers), 4),
        "master": round(float(cpu_s.get("master", 0.0)), 4),
    }


def run_capacity(
    target: Target,
    params: CapacityParams | None = None,
    procs: int = 2,
    progress: bool = False,
    real: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole scenario against ``target`` (module docstring); a JSON-ready dict.

    ``real``: a ``run real`` result (:func:`read_real`) for the model's replies/s per slot.
    The target should be a fresh chatd: memory freed by earlier loads is reused by these
    connections, and their cost then reads lower than it is."""
    p = params or CapacityParams()
    nofile = server.raise_nofile()
    procs = idle.client_procs(p.users, procs, nofile)
    if target.fake_url:
        zero = {"first_token_ms": 0, "token_ms": 0, "extra_latency_ms": 0, "hang": False}
        server.fake_config(target.fake_url, **zero, tokens=server.TOKENS)
    pids = server.chatd_pids(target.status() or {})
    workers = {k: v for k, v in pids.items() if k.startswith("worker")}
    chatd = {k: v for k, v in pids.items() if k == "master" or st.serves(k)}
    master = pids.get("master", 0)
    n_warm = min(WARM_CONNS, p.users)  # 1 msg/s each
    warm = Scenario(f"{NAME} warm-up", TITLE, n_warm, float(n_warm), WARM_S)
    scenarios.run_load(warm, target, "raw", target.url, (0.0, WARM_S, 2.0), procs)
    time.sleep(1.0)
    rss_before = _rss(workers)
    master_before = server.rss_bytes(master) if master else 0
    readings: dict[str, Any] = {}
    window = p.window()

    def hold() -> None:
        """Every connection open and silent: their RSS, then chatd's CPU over ``idle_s``."""
        time.sleep(SETTLE_S)
        readings["rss_idle"] = _rss(workers)
        doc = target.status() or {}
        readings["connections"] = sum(
            int(w.get("connections") or 0) for w in doc.get("workers", [])
        )
        c0, t0 = _cpu(chatd), time.monotonic()
        time.sleep(min(p.idle_s, window))
        c1, readings["idle_s"] = _cpu(chatd), time.monotonic() - t0
        readings["idle_cpu_s"] = _group({k: c1[k] - c0[k] for k in c0})

    def read_active() -> None:
        readings["rss_active"] = _rss(workers)
        readings["master_rss"] = server.rss_bytes(master) if master else 0

    sc = Scenario(NAME, TITLE, p.users, p.rate, window)
    actions: list[tuple[float, Callable[[], None]]] = [
        (p.warmup + window - min(READ_BEFORE_END_S, window / 4), read_active)
    ]
    sampler = scenarios._Sampler(target)
    res, cpu = scenarios.run_load(
        sc,
        target,
        "raw",
        target.url,
        (p.warmup, window, p.drain),
        procs,
        actions,
        sampler,
        progress,
        before_go=hold,
    )
    s = scenarios.summarize(res.records, p.warmup, window)
    replies = s["replies_in_window"]
    raw = {
        "users": res.connections_opened,
        "workers": len(workers),
        "window_s": window,
        "replies": replies,
        "rss_before": rss_before,
        "rss_idle": readings.get("rss_idle", {}),
        "rss_active": readings.get("rss_active", {}),
        "master_rss": readings.get("master_rss", 0),
        "idle_s": readings.get("idle_s", 0.0),
        "idle_cpu_s": readings.get("idle_cpu_s", {"workers": 0.0, "master": 0.0}),
        "cpu_s": _group(cpu),
    }
    m = measured(raw)
    m["master_rss_before_mb"] = round(master_before / 2**20, 2)
    m["connections_seen_by_chatd"] = readings.get("connections")
    llm = llm_per_slot(real)
    clients = sum(v for k, v in cpu.items() if k.startswith("client"))
    return {
        "name": NAME,
        "title": TITLE,
        "params": asdict(p) | {"window": window, "rate": round(p.rate, 3), "mode": "raw"},
        "procs": procs,
        "load": {
            k: s[k]
            for k in (
                "scheduled",
                "answered",
                "reply_ms",
                "ack_ms",
                "errors",
                "throughput_per_s",
                "replies_in_window",
            )
        }
        | {"connect_failed": res.connect_failed, "closed": res.closed, "bad_reply": res.bad_reply},
        "measured": m,
        "seed_per_user": SEED_PER_USER,
        "tiers": derive(m, p.msgs_per_min, p.headroom, None if llm is None else llm["per_slot"]),
        "llm": llm,
        "memory": {
            "rss_peak_mb": round(sampler.peak_total_mb, 2),
            "rss_peak_per_process_mb": sampler.peak_mb,
        },
        "clients_pct_of_core": round(100 * clients / window, 1),
        "fake_pct_of_core": round(100 * cpu.get("fake", 0.0) / window, 1)
        if "fake" in cpu
        else None,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def _v(x: Any, unit: str = "", digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}{unit}"


def _size(mb: float | None) -> str:
    if mb is None:
        return "–"
    return f"{mb / 1024:,.2f} GB" if mb >= 1024 else f"{mb:,.0f} MB"


def markdown(r: dict[str, Any]) -> str:
    """The measured costs, then the seed's tiers with chatd's derived needs, then the LLM."""
    p, m, ld = r["params"], r["measured"], r["load"]
    h, mpm = p["headroom"], p["msgs_per_min"]
    lat, err = ld["reply_ms"], ld["errors"]
    failed = err["total"] + sum(
        int(ld.get(k) or 0) for k in ("connect_failed", "closed", "bad_reply")
    )
    per_user_pct = None
    if m["marginal_cpu_us_per_msg"] is not None:
        per_user_pct = 100 * m["marginal_cpu_us_per_msg"] * 1e-6 * mpm / 60.0
    active_kb = m["active_kb_per_conn"]
    sent = (p["warmup"] + p["window"]) * mpm / 60.0  # each user's messages by the reading
    fixed = {k: None if v is None else 100 * v for k, v in m["fixed_cores"].items()}
    master_pct = m["window_cores"]["master"]
    master_pct = None if master_pct is None else 100 * master_pct
    lines = [f"### {r['title']}", ""]
    lines += [
        f"- Measured: {m['users']:,} users (WebSocket connections, each after hello -> welcome), "
        f"first {min(p['idle_s'], p['window']):g} s open and silent, then each sending "
        f"{mpm:g} msg/min "
        f"(open loop, {p['rate']:,.1f} msg/s in all) for {p['window']:g} s after "
        f"{p['warmup']:g} s warm-up; zero-delay fake Ollama (8 tokens a reply); chatd "
        f"{m['workers']} worker{'' if m['workers'] == 1 else 's'}; client processes: "
        f"{r['procs']}. chatd alone: the model's memory and cores are not in these figures",
        f"- The load: {ld['answered']:,} of {ld['scheduled']:,} messages answered, errors "
        f"{err['total']} ({err['by_code'] or 'none'}, {err['lost']} lost), reply p50 / p99 "
        f"{_v(lat.get('p50'), '', 2)} / {_v(lat.get('p99'), ' ms', 2)}"
        + (
            ""
            if failed == 0
            else f" ({ld.get('connect_failed', 0)} connections failed, {ld.get('closed', 0)} "
            f"closed by the server, {ld.get('bad_reply', 0)} bad replies) — **the figures below "
            "are of a failing load**"
        ),
        "",
        "| measured | value | seed's claim |",
        "|---|---|---|",
        f"| RSS per idle connection (workers) | {_v(m['idle_kb_per_conn'], ' KB', 2)} | – |",
        f"| RSS per active connection (workers; after ~{sent:.0f} messages "
        f"each) | {_v(active_kb, ' KB', 2)} | ~{SEED_PER_USER['memory_mb']:g} MB per user "
        f"(at {SEED_PER_USER['at_users']}) |",
        f"| a worker's RSS before any connection | {_v(m['worker_base_mb'], ' MB', 1)} | – |",
        f"| the master's RSS | {_v(m['master_rss_mb'], ' MB', 1)} | – |",
        f"| chatd's fixed CPU (connections open, silent) | "
        f"{_v(fixed['total'], ' %', 2)} of a core (workers {_v(fixed['workers'], '', 2)}, "
        f"master {_v(fixed['master'], '', 2)}) | – |",
        f"| worker CPU per message at {mpm:g} msg/min per user | "
        f"{_v(m['worker_cpu_us_per_msg'], ' µs')} | – |",
        f"| master CPU per message (its own cost: {_v(master_pct, ' %', 2)} of a core) "
        f"| {_v(m['master_cpu_us_per_msg'], ' µs')} | – |",
        f"| chatd CPU per message beyond the fixed CPU (marginal) | "
        f"{_v(m['marginal_cpu_us_per_msg'], ' µs')} | – |",
        f"| CPU per user at {mpm:g} msg/min (marginal) | {_v(per_user_pct, ' %', 3)} of a core "
        f"| ~{SEED_PER_USER['cpu_pct']:g} % (at {SEED_PER_USER['at_users']}) |",
        "",
        f"| tier | users | msg/s | chatd cores (×{h:g}) | chatd memory (×{h:g}) "
        "| seed: memory | seed: cores | model replies/s needed | slots of the measured model "
        "(no headroom) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in r["tiers"]:
        cores = "–" if t["cores"] is None else f"{t['cores_needed']:.2f} → {t['cores']}"
        lines.append(
            f"| {t['tier']} | {t['users_text']} | {t['rate_per_s']:,.1f} | {cores} "
            f"| {_size(t['memory_mb'])} | {t['seed']['memory']} | {t['seed']['cores']} "
            f"| {t['llm_replies_per_s']:,.1f} | {_v(t['llm_slots'], '', 1)} |"
        )
    lines += [
        "",
        f"- chatd cores = {h:g} × (fixed CPU + msg/s × marginal CPU per message), then whole "
        "cores (at least 1), one worker per core; chatd memory = "
        f"{h:g} × (master's RSS + workers × a worker's RSS before any connection + users × "
        f"RSS per active connection). Headroom ×{h:g}: for peaks above {mpm:g} msg/min and a "
        "slower machine. Above the measured users the figures are a linear extrapolation; "
        "the seed's Large is 1000+",
        "- **The model's throughput is the separate limit**, and at these tiers the one that "
        f"decides: U users at {mpm:g} msg/min ask the model for U × {mpm:g} / 60 replies/s, "
        "whatever chatd costs. " + _llm_sentence(r.get("llm")),
        "",
    ]
    return "\n".join(lines)


def _llm_sentence(llm: Mapping[str, Any] | None) -> str:
    if not llm:
        return (
            "The model's replies/s per slot were not measured in this run (`chatd-bench run "
            "real --out DIR`, then `--real-result DIR/real.json`)."
        )
    return (
        f"The real local model ({llm['model']}, {llm['max_tokens']} tokens at most a reply) "
        f"answered {llm['replies_per_s']:.2f} replies/s with {llm['slots']} slots, "
        f"{llm['per_slot']:.2f} per slot ({llm['how']}; `{llm['source']}`): the last column "
        "is the replies needed / that. Slots of one server share its compute, so this counts "
        "slots at that pace, not what one model server can run."
    )
