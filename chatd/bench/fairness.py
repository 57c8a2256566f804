"""Scenario ``fairness``: one flooding client and five light users through ``POST /api/chat``,
round robin across client keys against FIFO, with the same load.

The set-up (own chatd, the default; :func:`chatd_sections` and :func:`fake_knobs`):

- the fake Ollama answers every request in a fixed ``reply_s`` (2 s): ``tokens`` (21)
  tokens, the first at once (``first_token_ms = 0``), then one every
  ``reply_s / (tokens - 1)`` s;
- chatd (``workers`` workers) with ONE backend of ``max_parallel = slots`` (2): a capacity
  of ``slots / reply_s`` = 1 reply per second; ``[auth] tokens`` with one token per client
  (:func:`client_tokens`), so each client is a key of its own; ``[llm] max_queue`` (256)
  and ``[limits] max_queued_per_key`` (128) well above the ``flood_in_flight`` + ``light``
  requests that can wait, so nothing is refused by policy; ``first_token_timeout`` 30 s.

The load (:func:`load_phase`, one asyncio process), for ``warmup + duration`` seconds:

- the **flooder** keeps ``flood_in_flight`` (50) requests in flight: 50 keep-alive
  connections each sending a request, reading its NDJSON to the end, sending the next
  (after a refusal it waits ``Retry-After``, at most 10 s, 1 s without one);
- each of the ``light`` (5) **light users** loops: one request, read to the end, then a think
  time uniform in ``think_s`` (1-3 s) from a seeded RNG (``seed``; the first request also
  comes after one think time);
- at ``warmup + duration`` the load stops: requests still waiting or streaming are abandoned
  (their connections closed) and counted as pending.

Measured per request (:data:`chatd.bench.fairstats.FairRecord`): send, first byte of the
response body (TTFB: the wait for a slot plus the backend's immediate first token, so the
queue wait), end of the body, error. The figures (:func:`chatd.bench.fairstats.phase_figures`):
per class (light, flooder) count, TTFB and total p50/p99, throughput; Jain's fairness index
over the clients' grants normalized by their waiting (each grant's fair share split equally
among the clients waiting at that instant), and as the outcome Jain over the throughputs
normalized by max-min fair shares (definitions, and why the first is *the* index:
:mod:`chatd.bench.fairstats`).

Two phases, same load, same configuration, a fresh chatd (and fake) for each:
``round_robin`` (every client its own token: six keys, served round robin) and ``fifo``
(every client the same token: one key, so one FIFO). ``throughput_ratio_rr_fifo`` = the
overall throughput of the first over the second: the queue is work-conserving, so ≈ 1.

``--target URL`` sends both phases to ``URL`` (a chatd configured likewise, its tokens being
:func:`client_tokens`; or the fake Ollama itself, which has no queue) instead of starting
chatd; ``--fake-url`` then names the fake to set the reply time on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import uvloop

from chatd.bench import fairstats, server
from chatd.bench import stats as st
from chatd.bench.fairstats import FairRecord
from chatd.bench.httpapi import http_base
from chatd.bench.httpload import Outcome, new_session, post_stream
from chatd.bench.httpwire import CHAT_PATH, auth_headers, request_body
from chatd.bench.load import TEXT, clock
from chatd.bench.scenarios import _progress_bar

TITLE = "Fairness: a flooding client and light users, round robin across keys against FIFO"
PHASES = ("round_robin", "fifo")
PHASE_LABELS = {"round_robin": "round robin (a key per client)", "fifo": "FIFO (one key)"}
RETRY_AFTER_MAX_S = 10.0


@dataclass(frozen=True)
class FairParams:
    """The scenario's knobs (module docstring); times in seconds."""

    duration: float = 60.0
    slots: int = 2
    reply_s: float = 2.0
    tokens: int = 21
    flood_in_flight: int = 50
    light: int = 5
    think_s: tuple[float, float] = (1.0, 3.0)
    seed: int = 1
    max_queue: int = 256
    max_queued_per_key: int = 128
    workers: int = 2
    phases: tuple[str, ...] = PHASES

    @property
    def warmup(self) -> float:
        return min(5.0, max(0.5, 0.1 * self.duration))

    @property
    def token_ms(self) -> float:
        return 1000.0 * self.reply_s / max(1, self.tokens - 1)

    @property
    def classes(self) -> list[str]:
        return ["flooder"] + ["light"] * self.light


def client_tokens(p: FairParams) -> list[str]:
    """The bearer token of each client: ``chatd-bench-flooder``, ``chatd-bench-light-1``…"""
    return ["chatd-bench-flooder"] + [f"chatd-bench-light-{i}" for i in range(1, p.light + 1)]


def phase_tokens(phase: str, p: FairParams) -> list[str]:
    """The token each client sends in ``phase``: its own (round robin), or the flooder's for
    every client (``fifo``: one key)."""
    tokens = client_tokens(p)
    return tokens if phase == "round_robin" else [tokens[0]] * len(tokens)


def chatd_sections(p: FairParams) -> dict[str, dict[str, Any]]:
    """The config sections of the own chatd beyond :class:`chatd.bench.server.OwnChatd`'s
    (which sets ``max_queue`` and ``max_parallel`` from its arguments); every key is in
    :mod:`chatd.config_schema`."""
    return {
        "auth": {"tokens": client_tokens(p)},
        "limits": {"max_queued_per_key": p.max_queued_per_key},
        "llm": {"idle_timeout": 30.0},
    }


def fake_knobs(p: FairParams) -> dict[str, Any]:
    """The fake's knobs for a reply of ``reply_s`` seconds whose first token comes at once."""
    return {
        "first_token_ms": 0,
        "token_ms": p.token_ms,
        "tokens": p.tokens,
        "extra_latency_ms": 0,
        "hang": False,
        "status": None,
        "reset_stats": True,
    }


def fake_stats(fake_url: str) -> dict[str, Any] | None:
    """``GET /_fake/stats`` (``in_flight``, ``max_in_flight``, ``requests_total``)."""
    try:
        with urllib.request.urlopen(f"{fake_url.rstrip('/')}/_fake/stats", timeout=5) as r:
            doc = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


async def load_phase(
    url: str,
    tokens: list[str],
    p: FairParams,
    status: Callable[[], dict[str, Any] | None] | None = None,
    progress: bool = False,
    label: str = "fairness",
) -> dict[str, Any]:
    """Run one phase's load against ``url`` (the base URL: ``/api/chat`` is appended), client
    i sending ``tokens[i]`` (client 0 the flooder). Returns ``records`` (a
    :data:`~chatd.bench.fairstats.FairRecord` per request, pending ones included),
    ``bad_reply`` (complete replies whose text is not the fake's known answer),
    ``queue_mid`` (chatd's ``queue`` status half-way, when ``status`` is given)."""
    from chatd.dev.fake_ollama.wire import expected_reply

    endpoint = url.rstrip("/") + CHAT_PATH
    body = request_body("ollama", server.MODEL, TEXT)
    expected = expected_reply(TEXT, p.tokens)
    end = p.warmup + p.duration
    timeout = end + 120.0
    records: list[FairRecord] = []
    pending: dict[int, list[Any]] = {}
    ids = itertools.count()
    bad = [0]
    queue_mid: list[Any] = []
    t0 = clock()

    async def one(session: aiohttp.ClientSession, client: int) -> Outcome:
        rid = next(ids)
        entry: list[Any] = [client, clock() - t0, None]
        pending[rid] = entry

        def first_byte(t: float) -> None:
            entry[2] = t - t0

        out = await post_stream(
            session, endpoint, "ollama", body, auth_headers(tokens[client]), first_byte
        )
        del pending[rid]  # not reached when cancelled: then it stays pending
        done = (out.done or clock()) - t0
        records.append((client, entry[1], entry[2], done, out.error))
        if out.error is None and out.text != expected:
            bad[0] += 1
        return out

    async def sleep_until_or_end(delay: float) -> None:
        await asyncio.sleep(max(0.0, min(delay, end - (clock() - t0))))

    async def flood_lane(session: aiohttp.ClientSession) -> None:
        while clock() - t0 < end:
            out = await one(session, 0)
            if out.error is not None:
                await sleep_until_or_end(min(out.retry_after or 1.0, RETRY_AFTER_MAX_S))

    async def light_user(i: int) -> None:
        rng = random.Random(p.seed * 1000 + i)
        session = new_session(timeout, limit=1)
        sessions.append(session)
        await sleep_until_or_end(rng.uniform(*p.think_s))
        while clock() - t0 < end:
            out = await one(session, i)
            think = rng.uniform(*p.think_s)
            if out.error is not None and out.retry_after:
                think = max(think, min(out.retry_after, RETRY_AFTER_MAX_S))
            await sleep_until_or_end(think)

    async def sample_queue() -> None:
        await asyncio.sleep(p.warmup + p.duration / 2)
        if status is not None:
            doc = await asyncio.to_thread(status)
            queue_mid.append((doc or {}).get("queue"))

    flood_session = new_session(timeout, limit=p.flood_in_flight)
    sessions = [flood_session]
    tasks = [asyncio.create_task(flood_lane(flood_session)) for _ in range(p.flood_in_flight)]
    tasks += [asyncio.create_task(light_user(i)) for i in range(1, p.light + 1)]
    tasks.append(asyncio.create_task(sample_queue()))
    bar = _progress_bar(end, label, progress)
    try:
        while (left := end - (clock() - t0)) > 0:
            await asyncio.sleep(min(0.5, left))
            if bar is not None:
                bar.n = round(min(clock() - t0, end), 1)
                bar.set_postfix(replies=len(records), refresh=True)
    finally:
        if bar is not None:
            bar.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
    for client, sent, first in pending.values():
        records.append((client, sent, first, None, None))
    return {
        "records": records,
        "bad_reply": bad[0],
        "queue_mid": queue_mid[0] if queue_mid else None,
        "elapsed_s": round(clock() - t0, 2),
    }


def run_phase(
    phase: str,
    p: FairParams,
    target_url: str | None = None,
    fake_url: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """One phase (``round_robin`` or ``fifo``): start chatd for it unless ``target_url``, set
    the fake's reply time, run the load, compute the figures; stop what it started."""
    own: server.OwnChatd | None = None
    try:
        if target_url is None:
            own = server.OwnChatd(
                p.workers,
                30.0,
                max_parallel=p.slots,
                max_queue=p.max_queue,
                extra=chatd_sections(p),
            )
            url, fake = http_base(own.url), own.fake_url
        else:
            url, fake = target_url, fake_url
        if fake:
            server.fake_config(fake, **fake_knobs(p))
        raw = uvloop.run(
            load_phase(
                url,
                phase_tokens(phase, p),
                p,
                own.status if own is not None else None,
                progress,
                f"fairness ({phase})",
            )
        )
        backend = fake_stats(fake) if fake else None
    finally:
        if own is not None:
            own.stop()
    mean_think = sum(p.think_s) / 2
    figs = fairstats.phase_figures(
        raw["records"],
        p.classes,
        (p.warmup, p.warmup + p.duration),
        fairstats.demands(p.classes, p.reply_s, mean_think, p.flood_in_flight),
    )
    return figs | {
        "phase": phase,
        "keys": len(set(phase_tokens(phase, p))),
        "requests": len(raw["records"]),
        "bad_reply": raw["bad_reply"],
        "queue_mid": raw["queue_mid"],
        "backend": backend,
        "elapsed_s": raw["elapsed_s"],
    }


def run(
    p: FairParams,
    target_url: str | None = None,
    fake_url: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The whole scenario (module docstring); a JSON-ready dict."""
    unknown = set(p.phases) - set(PHASES)
    if unknown:
        raise ValueError(f"unknown phases {sorted(unknown)}: choose among {list(PHASES)}")
    phases = {ph: run_phase(ph, p, target_url, fake_url, progress) for ph in p.phases}
    rr, fifo = phases.get("round_robin"), phases.get("fifo")
    ratio = None
    if rr is not None and fifo is not None:
        r = st.ratio(rr["throughput_per_s"], fifo["throughput_per_s"])
        ratio = None if r is None else round(r, 3)
    return {
        "name": "fairness",
        "title": TITLE,
        "params": {
            **asdict(p),
            "think_s": list(p.think_s),
            "phases": list(p.phases),
            "warmup": p.warmup,
            "token_ms": round(p.token_ms, 3),
            "capacity_per_s": round(p.slots / p.reply_s, 4),
        },
        "target": target_url or "own fake + chatd (one per phase)",
        "phases": phases,
        "throughput_ratio_rr_fifo": ratio,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``fairness`` scenario's options on ``chatd-bench run`` (``--slots`` is shared with
    ``real``; ``--target`` with ``http``)."""
    g = p.add_argument_group(
        "the fairness scenario (chatd-bench run fairness)",
        "--slots: the backend's max_parallel (2); --target URL: no own chatd, send there "
        "(--fake-url: the fake to set the reply time on)",
    )
    g.add_argument("--flood", type=int, default=50, help="the flooder's requests in flight (50)")
    g.add_argument("--light", type=int, default=5, help="light users (5)")
    g.add_argument("--reply-s", type=float, default=2.0, help="seconds per reply (2)")
    g.add_argument("--seed", type=int, default=1, help="the light users' think-time seed (1)")
    g.add_argument("--phase", choices=PHASES, action="append", help="run only this phase")


def params_from(args: argparse.Namespace) -> FairParams:
    """:class:`FairParams` from parsed ``chatd-bench run fairness`` arguments."""
    base = FairParams()
    return FairParams(
        duration=base.duration if args.duration is None else args.duration,
        slots=args.slots,
        reply_s=args.reply_s,
        flood_in_flight=args.flood,
        light=args.light,
        seed=args.seed,
        workers=args.workers,
        phases=tuple(args.phase or PHASES),
    )


def _v(x: Any, digits: int = 1, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}{unit}"


def _s(summary: dict[str, Any], keys: tuple[str, ...] = ("p50", "p99")) -> str:
    """ms summary values as seconds."""
    return " / ".join(_v(None if summary.get(k) is None else summary[k] / 1000, 2) for k in keys)


def markdown(r: dict[str, Any]) -> str:
    """Both phases side by side: a row per phase and class, then the overall figures."""
    p, phases = r["params"], r["phases"]
    lines = [
        f"### {r['title']}",
        "",
        f"- chatd: one backend, `max_parallel = {p['slots']}`; each reply {p['reply_s']:g} s "
        f"({p['tokens']} tokens, the first at once): capacity {p['capacity_per_s']:g} "
        f"replies/s; `max_queue = {p['max_queue']}`, `max_queued_per_key = "
        f"{p['max_queued_per_key']}`; target: {r['target']}",
        f"- Load: a flooder keeping {p['flood_in_flight']} `POST /api/chat` (stream) in flight, "
        f"{p['light']} light users each looping one request then a think time uniform in "
        f"{p['think_s'][0]:g}-{p['think_s'][1]:g} s (seed {p['seed']}); measured "
        f"{p['duration']:g} s after {p['warmup']:g} s warm-up, per phase",
        "- TTFB: send → first byte of the response body (the wait for a slot; the backend's "
        "first token is immediate); total: send → last byte; both over the replies completed "
        "in the window. Pending: requests unanswered when the load stopped, with how long "
        "they had waited (a lower bound of their wait)",
        "",
        "| queue | class | completed | throughput (replies/s) | TTFB p50 / p99 (s) "
        "| total p50 / p99 (s) | errors | pending at end: n, waited p50 / max (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, ph in phases.items():
        for cls in ("light", "flooder"):
            c = ph["classes"].get(cls)
            if c is None:
                continue
            errs = ", ".join(f"{k} {n}" for k, n in sorted(c["errors"].items())) or "0"
            lines.append(
                f"| {PHASE_LABELS[name]} | {cls} ({c['clients']}) | {c['completed']} "
                f"| {_v(c['throughput_per_s'], 3)} | {_s(c['ttfb_ms'])} | {_s(c['total_ms'])} "
                f"| {errs} | {c['pending_at_end']}, {_s(c['pending_age_ms'], ('p50', 'max'))} |"
            )
    names = list(phases)

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> str:
        return f"| {label} | " + " | ".join(cell(phases[n]) for n in names) + " |"

    def per_client(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda ph: ", ".join(_v(c[key], 2) for c in ph["clients"])

    lines += [
        "",
        "| | " + " | ".join(PHASE_LABELS[n] for n in names) + " |",
        "|---" * (len(names) + 1) + "|",
        row("replies/s, all clients", lambda ph: _v(ph["throughput_per_s"], 3)),
        row("**Jain's index** (grants / fair grants while waiting)", lambda ph: _v(ph["jain"], 3)),
        row("per client: grants / fair grants (flooder first)", per_client("grant_ratio")),
        row(
            "outcome: Jain over throughput / max-min fair share",
            lambda ph: _v(ph["jain_maxmin"], 3),
        ),
        row("per client: throughput / max-min fair share", per_client("normalized")),
        row(
            "backend's most requests in flight",
            lambda ph: str((ph["backend"] or {}).get("max_in_flight", "–")),
        ),
        row("replies with unexpected text", lambda ph: str(ph["bad_reply"])),
        "",
        f"- Throughput ratio round robin / FIFO: {_v(r['throughput_ratio_rr_fifo'], 3)} "
        "(the queue is work-conserving: ≈ 1)",
        "- Jain's index: (Σx)² / (n Σx²), 1 = all equal. Its x: a client's grants (first "
        "bytes in the window) over its fair grants (each grant split equally among the "
        "clients waiting at that instant): what round robin promises, whatever the clients' "
        "think times. The outcome's x: a client's throughput over its max-min fair share of "
        "the measured total (demand: a light user 1 / (reply + mean think), the flooder its "
        "requests in flight / reply); closed-loop light users keep it below 1 even when the "
        "queue is fair",
    ]
    for name, ph in phases.items():
        q = ph.get("queue_mid")
        if q:
            keys = q.get("keys") or []
            lines.append(
                f"- chatd's queue half-way ({PHASE_LABELS[name]}): depth {q.get('depth', '–')}, "
                f"keys waiting {len(keys)}"
            )
    return "\n".join([*lines, ""])
