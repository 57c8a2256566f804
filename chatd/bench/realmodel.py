"""``chatd-bench run real``: the real SmolLM2 model behind chatd, the model the bottleneck.

What runs, in order:

1. The model: ``chatd-local-model --parallel SLOTS --max-tokens MAX_TOKENS --threads
   MODEL_THREADS`` (SmolLM2-135M in llama.cpp, OpenAI API) started here and stopped by its
   PID at the end, unless ``--model-url`` names a running OpenAI-compatible server (its own
   token cap then applies). Its model name is read from ``GET /v1/models``. One thread by
   default: llama.cpp's threads meet at a barrier after every step, so with as many threads
   as cores a single preempted thread stalls the whole decode; on a 2-core machine shared
   with chatd and the clients, 2 threads made the same 24-token reply take 0.4 s or 6.8 s
   from one request to the next, 1 thread keeps it steady (and leaves a core to chatd).
2. The direct baseline (:mod:`chatd.bench.realdirect`): after one warm-up request, SLOTS
   concurrent closed-loop clients send the prompts straight to ``/v1/chat/completions`` with
   the body chatd sends, for ``direct_s`` seconds. Its replies per second are the model's
   *capacity* at that concurrency; its TTFT is the model's own.
3. chatd (:class:`chatd.bench.server.OwnChatd`, 2 workers by default) in front of it with
   ``max_parallel = SLOTS`` and ``[llm] max_queue = MAX_QUEUE``, ``[sessions] history_turns =
   0`` (every request is the one user message, as in the direct baseline), first-token
   deadline 60 s. CONNECTIONS WebSocket sessions send the prompts open loop (each message at
   its intended time whatever happened before, :func:`chatd.bench.stats.uniform_schedule`) at
   ``rate`` msg/s, by default OVERLOAD (2) times the measured capacity, for ``duration``
   seconds; then the clients wait for the last answers. More arrives than the model can
   answer, so messages wait for a slot (``queued`` frames), the queue fills, and what finds
   it full gets ``busy``.

Per message (seconds from the load's start): intended send, sent, ``ack``, first ``queued``
frame and the highest position announced, first ``token``, ``reply`` or final ``error`` (and
its code), and the reply's ``stats`` (the backend's TTFT as chatd's relay measured it, from
its request to the first token; the token count). The status of the daemon (queue depth,
slots granted and in use) is read every 0.25 s in-process from the control socket (the
``chatctl status --json`` document, without a subprocess per sample). CPU seconds of every
chatd process, the model and this process are read at the window's edges. The figures are
in :func:`chatd.bench.realreport.figures`; the table in :func:`chatd.bench.realreport.markdown`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from chatd.bench import realdirect, realreport, server
from chatd.bench import stats as st
from chatd.bench.load import Record, clock, open_session
from chatd.bench.pyspy import PySpy
from chatd.ctl import main as ctl
from chatd.errors import ControlError
from chatd.proto import control as proto

PROMPTS = (
    "Name a colour.",
    "Say hello.",
    "Name a fruit.",
    "What is two plus two?",
    "Name an animal.",
    "Say a day of the week.",
)
SAMPLE_S = 0.25  # status sampling period


@dataclass(frozen=True)
class RealParams:
    """The scenario's knobs (see the module docstring); ``rate`` None: OVERLOAD × capacity."""

    duration: float = 30.0
    slots: int = 2
    max_queue: int = 8
    connections: int = 16
    overload: float = 2.0
    rate: float | None = None
    max_tokens: int = 24
    model_threads: int = 1
    direct_s: float = 8.0
    direct: bool = True
    model_url: str | None = None
    workers: int = 2
    drain_max: float = 60.0


@dataclass
class Msg:
    """One message through chatd: times in seconds from the load's start, None until seen."""

    intended: float
    prompt: str
    sent: float | None = None
    ack: float | None = None
    queued: float | None = None  # first ``queued`` frame
    position: int = 0  # highest position announced
    first: float | None = None
    done: float | None = None
    error: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def record(self) -> Record:
        """As a :data:`chatd.bench.load.Record` (for :func:`chatd.bench.scenarios.summarize`)."""
        return (self.intended, self.sent, self.ack, self.first, self.done, self.error)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``real`` scenario's options on ``chatd-bench run``."""
    g = p.add_argument_group("the real scenario (chatd-bench run real)")
    g.add_argument("--model-url", help="a running OpenAI-compatible model (default: start one)")
    g.add_argument("--slots", type=int, default=2, help="LLM slots (max_parallel; default 2)")
    g.add_argument("--max-queue", type=int, default=8, help="chatd's max_queue (default 8)")
    g.add_argument("--connections", type=int, default=16, help="WebSocket sessions (16)")
    g.add_argument("--overload", type=float, default=2.0, help="rate / capacity (default 2)")
    g.add_argument("--rate", type=float, help="offered msg/s (default: overload × capacity)")
    g.add_argument("--max-tokens", type=int, default=24, help="the model's reply cap (24)")
    g.add_argument("--model-threads", type=int, default=1, help="the model's threads (1)")


def params_from(args: argparse.Namespace) -> RealParams:
    """:class:`RealParams` from parsed ``chatd-bench run real`` arguments."""
    if args.no_direct and args.rate is None:
        raise SystemExit("chatd-bench: run real --no-direct needs --rate (no capacity measured)")
    return RealParams(
        duration=30.0 if args.duration is None else args.duration,
        slots=args.slots,
        max_queue=args.max_queue,
        connections=args.connections,
        overload=args.overload,
        rate=args.rate,
        max_tokens=args.max_tokens,
        model_threads=args.model_threads,
        direct=not args.no_direct,
        model_url=args.model_url,
        workers=args.workers,
    )


def model_name(url: str) -> str:
    """The model an OpenAI-compatible server serves (``GET /v1/models``, ``data[0].id``)."""
    with urllib.request.urlopen(f"{url.rstrip('/')}/v1/models", timeout=10) as r:
        return str(json.loads(r.read())["data"][0]["id"])


def status(target: server.Target) -> dict[str, Any] | None:
    """The ``chatctl status --json`` document, asked in-process over the control socket."""
    try:
        reply = ctl.request(target.control_socket, {proto.T: proto.STATUS}, timeout=5.0)
    except (OSError, ctl.NotRunning, ControlError):
        return None
    data = reply.get("data") if reply.get("ok") else None
    return data if isinstance(data, dict) else None


def run(p: RealParams, profile: Path | None = None) -> dict[str, Any]:
    """The whole scenario (module docstring); a JSON-ready dict. Everything started here is
    stopped (by PID) before it returns or raises."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 - the model's stderr, closed in finally
    proc = None
    target: server.OwnChatd | None = None
    spy: PySpy | None = None
    try:
        t_start = time.monotonic()
        if p.model_url is None:
            from chatd.dev.local_model.main import start_local_model

            args = ["--parallel", str(p.slots), "--max-tokens", str(p.max_tokens)]
            args += ["--threads", str(p.model_threads)]
            try:
                proc, url = start_local_model(0, args=args, timeout=120, stderr=log)
            except (RuntimeError, TimeoutError) as exc:  # LocalModelError is a RuntimeError
                log.seek(0)
                tail = log.read()[-1500:].decode(errors="replace")
                raise RuntimeError(f"the local model did not start: {exc}\n{tail}") from exc
        else:
            url = p.model_url.rstrip("/")
        name = model_name(url)
        model = {
            "url": url,
            "name": name,
            "started_here": proc is not None,
            "pid": None if proc is None else proc.pid,
            "start_s": round(time.monotonic() - t_start, 2),
        }
        direct: dict[str, Any] | None = None
        if p.direct:
            direct = uvloop.run(realdirect.closed_loop(url, name, PROMPTS, p.slots, p.direct_s))
        rate = p.rate if p.rate is not None else p.overload * direct_capacity(direct)
        target = server.OwnChatd(
            p.workers,
            60.0,
            backend_url=url,
            api="openai",
            model=name,
            max_parallel=p.slots,
            max_queue=p.max_queue,
            extra={"sessions": {"history_turns": 0}},
        )
        pids = server.chatd_pids(status(target) or {})
        if proc is not None:
            pids["model"] = proc.pid
        pids[f"client {os.getpid()}"] = os.getpid()
        if profile is not None and target.worker_pids():
            wpid = target.worker_pids()[0]
            spy = PySpy(wpid, profile / f"real-worker-{wpid}.speedscope.json", p.duration)
        load = uvloop.run(_load(target, p, rate, pids, spy))
        time.sleep(1.1)  # workers report their stats every second
        after = server.server_figures(status(target))
        out = realreport.figures(p, rate, model, load, direct)
        out["server_after"] = after
        out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
        if spy is not None:
            out["profile"] = spy.finish()
        return out
    finally:
        if spy is not None:
            spy.kill()
        if target is not None:
            target.stop()
        if proc is not None:  # the model we started: SIGTERM, SIGKILL after 10 s (by PID)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        log.close()


def direct_capacity(direct: dict[str, Any] | None) -> float:
    """Replies per second the direct baseline measured (at least 0.1)."""
    return max(0.1, float((direct or {}).get("capacity_per_s") or 0.0))


async def _load(
    target: server.Target,
    p: RealParams,
    rate: float,
    pids: dict[str, int],
    spy: PySpy | None,
) -> dict[str, Any]:
    """Open the sessions, send the schedule, sample the status; the raw observations."""
    conns: list[list[Msg]] = []
    for i in range(p.connections):
        times = st.uniform_schedule(i, p.connections, rate, 0.0, p.duration)
        conns.append([Msg(t, PROMPTS[(i + k) % len(PROMPTS)]) for k, t in enumerate(times)])
    sockets = [await open_session(target.url) for _ in conns]
    series: list[list[float]] = []
    cpu: list[dict[str, float]] = []
    t0 = clock() + 0.2
    window_closed, all_answered = asyncio.Event(), asyncio.Event()
    left = [sum(len(c) for c in conns)]
    if not left[0]:
        all_answered.set()

    def cpu_now() -> None:
        cpu.append({k: server.cpu_seconds(pid) for k, pid in pids.items()})
        if len(cpu) == 2:
            window_closed.set()

    def answered() -> None:
        left[0] -= 1
        if left[0] <= 0:
            all_answered.set()

    async def sampler() -> None:
        while True:
            doc = await asyncio.to_thread(status, target)
            if doc is not None:
                b = (doc.get("backends") or [{}])[0]
                series.append(
                    [
                        round(clock() - t0, 2),
                        int(doc.get("queue", {}).get("depth", 0)),
                        int(b.get("in_flight", 0)),
                        int(b.get("in_use", 0)),
                    ]
                )
            await asyncio.sleep(SAMPLE_S)

    loop = asyncio.get_running_loop()
    loop.call_at(loop.time() + 0.2, cpu_now)
    loop.call_at(loop.time() + 0.2 + p.duration, cpu_now)
    if spy is not None:
        loop.call_at(loop.time() + 0.2, spy.start)
    sampling = asyncio.create_task(sampler())
    pairs = list(zip(sockets, conns, strict=True))
    readers = [asyncio.create_task(_receive(ws, msgs, t0, answered)) for ws, msgs in pairs]
    try:
        await asyncio.gather(*(_send(ws, msgs, t0) for ws, msgs in pairs))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(loop.time() + t0 + p.duration + p.drain_max - clock()):
                await all_answered.wait()
        await window_closed.wait()  # everything may be answered before the window closes
    finally:
        sampling.cancel()
        for r in readers:
            r.cancel()
        await asyncio.gather(sampling, *readers, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    msgs = [m for c in conns for m in c]
    return {
        "messages": msgs,
        "series": series,
        "cpu_s": {k: round(cpu[1][k] - cpu[0][k], 3) for k in pids},
        "elapsed_s": round(clock() - t0, 2),
    }


async def _send(ws: ClientConnection, msgs: list[Msg], t0: float) -> None:
    """Send each message at its intended time (never earlier), whatever came back."""
    for k, m in enumerate(msgs):
        delay = t0 + m.intended - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        m.sent = clock() - t0
        frame = {"type": "message", "id": str(k), "text": m.prompt}
        try:
            await ws.send(orjson.dumps(frame), text=True)
        except ConnectionClosed:
            return


async def _receive(
    ws: ClientConnection, msgs: list[Msg], t0: float, answered: Callable[[], None]
) -> None:
    """Record every frame of one session against its message (by ``id``); ``answered()``
    once per message when its reply or final error arrives."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            f = orjson.loads(await ws.recv(decode=False))
            now = clock() - t0
            typ, mid = f.get("type"), f.get("id")
            if mid is None or not str(mid).isdigit() or int(mid) >= len(msgs):
                continue
            m = msgs[int(mid)]
            if typ == "ack":
                m.ack = now
            elif typ == "queued":
                m.queued = now if m.queued is None else m.queued
                m.position = max(m.position, int(f.get("position", 0)))
            elif typ == "token" and m.first is None:
                m.first = now
            elif typ == "reply" and m.done is None:
                m.done, m.stats = now, dict(f.get("stats") or {})
                answered()
            elif typ == "error" and m.done is None:
                m.done, m.error = now, str(f.get("code"))
                answered()
