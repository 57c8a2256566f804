"""Scenario ``idle``: memory per idle connection, chatd against the bare relay.

``connections`` N WebSocket connections (default 1,000; 10,000 works), spread over client
processes, each completing ``hello`` -> ``welcome`` and then held idle (the clients answer
the server's pings). **KB per idle connection** = (sum over the relay's worker processes of
their RSS after every connection is open and 1.5 s have passed, minus their RSS before) / the
connections opened / 1024 (:func:`kb_per_conn`). Before the "before" reading each client
process opens and closes ``WARM`` connections, so one-time allocations (imports, first
buffers) are not counted. ``uss_kb_per_conn`` (JSON only) is the same with USS: it also
grows when a worker first writes to a page it still shared with its parent since the fork
(copy-on-write), which RSS does not count as growth, so at a few connections it overstates.

Measured for chatd (its workers' pids from its status) and for the bare reference relay
(:mod:`chatd.bench.bare`, started here with as many workers): the bare relay's figure is
what uvloop + websockets cost; the difference is chatd's own.

RLIMIT_NOFILE is raised in this process (a chatd and a bare relay started afterwards
inherit it) and in every client process, and enough client processes are used that each
holds fewer connections than its limit (:func:`client_procs`). chatd refuses connections
beyond ``[limits] max_connections`` per worker (the own chatd is configured far above).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any

import orjson
import psutil
import uvloop
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from chatd.bench import fleet, load, server
from chatd.bench.bare import BareRelay
from chatd.bench.load import Counter
from chatd.bench.scenarios import _progress_bar
from chatd.bench.server import Target

TITLE = "Memory per idle connection"
WARM = 20  # connections each client process opens and closes before the "before" reading
SETTLE_S = 1.5  # after the last connection opened, before the "after" reading
NOFILE_SPARE = 64  # descriptors a client process keeps for itself
NO_BACKEND = "http://127.0.0.1:9"  # the bare relay's backend when none is known: idle never asks


def kb_per_conn(before: Mapping[int, int], after: Mapping[int, int], n: int) -> float | None:
    """(sum over the pids read both times of after - before) bytes / ``n`` / 1024, rounded to
    0.01 KB; None when ``n`` < 1. A pid missing from either reading is left out of the sum."""
    if n < 1:
        return None
    delta = sum(after[pid] - before[pid] for pid in before if pid in after)
    return round(delta / n / 1024, 2)


def client_procs(connections: int, procs: int, nofile: int) -> int:
    """Client processes to use: at least ``procs``, enough that each holds no more than
    ``nofile - NOFILE_SPARE`` connections, never more than there are connections."""
    per_proc = max(1, nofile - NOFILE_SPARE)
    need = -(-connections // per_proc)
    return max(1, min(connections, max(procs, need)))


def _pick(mem: Mapping[int, tuple[int, int]], i: int) -> dict[int, int]:
    return {pid: m[i] for pid, m in mem.items()}


def _mem(pid: int) -> tuple[int, int]:
    """RSS and USS of a process in bytes; zeros when it is gone."""
    try:
        m = psutil.Process(pid).memory_full_info()
    except psutil.Error:
        return 0, 0
    return int(m.rss), int(m.uss)


async def _next_command(pipe: Connection) -> str:
    """Wait (without blocking the loop, so pings are answered) for the parent's next word."""
    await fleet.wait_readable(pipe)
    return str(pipe.recv()[0])


def _holder(url: str, n: int, pipe: Connection, opened: Counter) -> None:
    """A client process: warm up, then on ``open`` open ``n`` connections and report, then
    on ``close`` close them. Messages to the parent: ``warm``, ``open``, ``closed``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    server.raise_nofile()

    async def main() -> None:
        gate = asyncio.Semaphore(50)  # 50 handshakes at a time: the listen backlog stays short

        async def open_one() -> ClientConnection:
            async with gate:
                ws = await ws_connect(url, **load.WS_OPTS)
                await ws.send(b'{"type":"hello"}', text=True)
                welcome = orjson.loads(await asyncio.wait_for(ws.recv(decode=False), 20))
                if welcome.get("type") != "welcome":
                    raise RuntimeError(f"no welcome: {welcome}")
                opened.value += 1
                return ws

        warm = await asyncio.gather(*(open_one() for _ in range(WARM)), return_exceptions=True)
        await asyncio.gather(
            *(w.close() for w in warm if isinstance(w, ClientConnection)), return_exceptions=True
        )
        opened.value = 0
        pipe.send(("warm", None))
        if await _next_command(pipe) != "open":
            return
        got = await asyncio.gather(*(open_one() for _ in range(n)), return_exceptions=True)
        ok = [w for w in got if isinstance(w, ClientConnection)]
        bad = [repr(w) for w in got if not isinstance(w, ClientConnection)]
        pipe.send(("open", (len(ok), len(bad), bad[:3])))
        await _next_command(pipe)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(20):
                await asyncio.gather(*(w.close() for w in ok), return_exceptions=True)
        pipe.send(("closed", None))

    try:
        uvloop.run(main())
    except BaseException:
        with contextlib.suppress(Exception):
            pipe.send(("error", traceback.format_exc()))
    finally:
        pipe.close()


def measure(
    url: str,
    pids: Mapping[str, int],
    connections: int,
    procs: int,
    label: str = "idle",
    progress: bool = False,
    connections_of: Callable[[], dict[int, Any]] | None = None,
) -> dict[str, Any]:
    """Open ``connections`` idle connections to ``url`` over ``procs`` client processes and
    read the memory of the processes ``pids`` (name -> pid) before and after."""
    ctx = mp.get_context("fork")
    run = fleet.Run([], [])
    for i in range(procs):
        parent, child = ctx.Pipe()
        counter: Counter = ctx.Value("q", 0, lock=False)
        share = len(range(i, connections, procs))
        p = ctx.Process(target=_holder, args=(url, share, child, counter), daemon=True)
        p.start()
        child.close()
        run.procs.append((p, parent))
        run.progress.append(counter)
    bar = _progress_bar(connections, f"{label}: opening", progress)
    if bar is not None:
        bar.unit = "conn"
    try:
        for _, pipe in run.procs:
            fleet.expect(pipe, "warm", 60)
        time.sleep(1.0)
        before = {pid: _mem(pid) for pid in pids.values()}
        t0 = time.perf_counter()
        for _, pipe in run.procs:
            pipe.send(("open", None))
        results = [_wait(pipe, run, bar, 60 + connections / 20) for _, pipe in run.procs]
        open_s = time.perf_counter() - t0
        time.sleep(SETTLE_S)
        after = {pid: _mem(pid) for pid in pids.values()}
        per_worker = connections_of() if connections_of is not None else {}
        for _, pipe in run.procs:
            pipe.send(("close", None))
        for _, pipe in run.procs:
            with contextlib.suppress(RuntimeError):
                fleet.expect(pipe, "closed", 30)
    finally:
        if bar is not None:
            bar.close()
        fleet.stop(run)
    opened = sum(r[0] for r in results)
    rss = kb_per_conn(_pick(before, 0), _pick(after, 0), opened)
    uss = kb_per_conn(_pick(before, 1), _pick(after, 1), opened)
    return {
        "requested": connections,
        "opened": opened,
        "failed": sum(r[1] for r in results),
        "errors_sample": [e for r in results for e in r[2]][:3],
        "open_s": round(open_s, 2),
        "workers": [
            {
                "name": name,
                "pid": pid,
                "rss_before_mb": round(before[pid][0] / 2**20, 2),
                "rss_after_mb": round(after[pid][0] / 2**20, 2),
                "uss_delta_mb": round((after[pid][1] - before[pid][1]) / 2**20, 2),
                "connections": per_worker.get(pid),
            }
            for name, pid in pids.items()
        ],
        "rss_delta_mb": round(sum(after[p][0] - before[p][0] for p in before) / 2**20, 2),
        "kb_per_conn": rss,
        "uss_kb_per_conn": uss,
    }


def _wait(pipe: Connection, run: fleet.Run, bar: Any, timeout: float) -> Any:
    """One client process's ``open`` answer, moving the progress bar meanwhile."""
    deadline = time.monotonic() + timeout
    while not pipe.poll(0.25):
        if bar is not None:
            bar.n = run.replies()
            bar.refresh()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the connections were not open within {timeout:.0f} s")
    return fleet.expect(pipe, "open", 0)


def run_idle(
    target: Target,
    connections: int = 1000,
    procs: int = 2,
    progress: bool = False,
    bare_workers: int = 2,
) -> dict[str, Any]:
    """The whole scenario, chatd then the bare relay; a JSON-ready dict."""
    nofile = server.raise_nofile()
    procs = client_procs(connections, procs, nofile)
    status = target.status() or {}
    workers = {k: v for k, v in server.chatd_pids(status).items() if k.startswith("worker")}

    def chatd_connections() -> dict[int, Any]:
        doc = target.status() or {}
        return {int(w["pid"]): w.get("connections") for w in doc.get("workers", [])}

    out: dict[str, Any] = {
        "name": "idle",
        "title": TITLE,
        "params": {"connections": connections, "warm": WARM, "settle_s": SETTLE_S},
        "procs": procs,
        "workers": {"chatd": len(workers), "bare": bare_workers},
        "rlimit_nofile": nofile,
        "targets": {},
    }
    out["targets"]["chatd"] = measure(
        target.url, workers, connections, procs, "idle chatd", progress, chatd_connections
    )
    bare = BareRelay(target.fake_url or NO_BACKEND, bare_workers)
    try:
        bare_pids = {f"worker {i}/{pid}": pid for i, pid in enumerate(bare.pids, 1)}
        out["targets"]["bare"] = measure(
            bare.url, bare_pids, connections, procs, "idle bare", progress
        )
    finally:
        bare.stop()
    c, b = (out["targets"][k]["kb_per_conn"] for k in ("chatd", "bare"))
    out["difference_kb"] = None if c is None or b is None else round(c - b, 2)
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return out


def markdown(r: dict[str, Any]) -> str:
    """The scenario's table: chatd and the bare relay, and the difference."""
    p, w = r["params"], r["workers"]
    lines = [
        f"### {r['title']}",
        "",
        f"- {p['connections']:,} connections, each after hello -> welcome, held idle; client "
        f"processes: {r['procs']}; RSS of the workers after every connection is open "
        f"(+{p['settle_s']:g} s) minus before, / connections opened (before: after "
        f"{p['warm']} connections per client process opened and closed)",
        "",
        "| target | opened | failed | workers' RSS before -> after | KB per connection "
        "| time to open |",
        "|---|---|---|---|---|---|",
    ]
    for kind, name in (("chatd", "chatd"), ("bare", "bare relay")):
        t = r["targets"].get(kind)
        if t is None:
            continue
        rss0 = sum(x["rss_before_mb"] for x in t["workers"])
        rss1 = sum(x["rss_after_mb"] for x in t["workers"])
        lines.append(
            f"| {name} ({w[kind]} worker{'' if w[kind] == 1 else 's'}) | {t['opened']:,} "
            f"| {t['failed']} "
            f"| {rss0:,.1f} -> {rss1:,.1f} MB | {_kb(t['kb_per_conn'])} | {t['open_s']:g} s |"
        )
    lines += ["", f"- chatd - bare relay: {_kb(r.get('difference_kb'))} per idle connection", ""]
    return "\n".join(lines)


def _kb(x: float | None) -> str:
    return "–" if x is None else f"{x:,.2f} KB"
