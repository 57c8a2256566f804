#!/usr/bin/env python3
"""slot_bench: what a daemon-wide LLM slot costs, measured on the real master and links.

Runs the real ``chatd`` master (its selector loop, its per-worker links, the slot granter)
with a stand-in worker (the ``CHATD_TEST_WORKER`` hook) that does nothing but take and give
back slots through :class:`chatd.worker.slots.MasterSlots` over its real link, from
``--concurrency`` tasks at once, for ``--duration`` seconds. Each cycle is
``acquire`` -> ``await asyncio.sleep(0)`` (holding the slot for one loop turn) ->
``release``; with ``--max-parallel`` below ``workers x concurrency`` slots are contended and
the daemon-wide queue is in use, so this is the cost *under load*.

It prints, and writes as JSON with ``--out``:

- ``grants_per_s``: cycles completed per second, all workers together;
- ``acquire_us`` p50/p99: time from ``acquire`` called to the slot granted, per cycle,
  queueing included (so it grows with contention; the uncontended figure is the round trip);
- ``worker_cpu_us_per_cycle``: the workers' CPU time (user+system) / cycles: what a message
  pays in its worker for a master slot; ``local_cpu_us_per_cycle`` is the same loop with the
  in-process :class:`chatd.worker.slots.LocalSlots`, for comparison;
- ``master_cpu_us_per_grant``: the master's CPU time / cycles (it handles an acquire and a
  release per cycle): what bounds the daemon's grant rate (one core).

Usage::

    .venv/bin/python scripts/slot_bench.py [--workers 2] [--concurrency 32]
        [--max-parallel 8] [--duration 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


async def _cycles(slots: Any, concurrency: int, start_at: float, duration: float) -> dict[str, Any]:
    """Run acquire/hold/release cycles from ``concurrency`` tasks in the measured window."""
    latencies: list[float] = []
    done = 0
    await asyncio.sleep(max(0.0, start_at - time.time()))
    end = time.monotonic() + duration
    cpu0 = time.process_time()

    async def loop() -> None:
        nonlocal done
        while time.monotonic() < end:
            t0 = time.perf_counter()
            backend = await slots.acquire(lambda p: None)
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0)
            slots.release(backend)
            done += 1

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    cpu = time.process_time() - cpu0
    return {
        "cycles": done,
        "cpu_s": cpu,
        "p50": _percentile(latencies, 50),
        "p99": _percentile(latencies, 99),
        "sum": sum(latencies),
    }


def bench_worker(spec: Any) -> NoReturn:
    """The stand-in worker (forked by the master): slots only, then idle until stopped."""
    import uvloop

    from chatd.worker.link import MasterLink
    from chatd.worker.slots import MasterSlots

    async def main() -> None:
        link = MasterLink.from_spec(spec)
        slots = MasterSlots(spec.cfg.llm.backends, link.send)
        stop = asyncio.Event()

        def on_command(msg: dict[str, Any]) -> None:
            if msg.get("t") in MasterSlots.MESSAGES:
                slots.on_message(msg)
            elif msg.get("t") in ("drain", "stop"):
                stop.set()

        await link.start(on_command, stop.set)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        link.send_ready()
        link.start_reporting(lambda: {"messages_total": 0}, 1.0)
        env = os.environ
        result = await _cycles(
            slots,
            int(env["SLOT_BENCH_CONCURRENCY"]),
            float(env["SLOT_BENCH_START"]),
            float(env["SLOT_BENCH_DURATION"]),
        )
        out = Path(env["SLOT_BENCH_DIR"]) / f"worker-{os.getpid()}.json"
        out.with_suffix(".tmp").write_text(json.dumps(result))
        out.with_suffix(".tmp").rename(out)  # whole, or not there yet
        await stop.wait()
        link.close()

    uvloop.run(main())
    os._exit(0)


def local_baseline(concurrency: int, max_parallel: int, duration: float) -> dict[str, Any]:
    """The same cycles on LocalSlots, in this process (no master, no link)."""
    import uvloop

    from chatd.config import BackendConfig
    from chatd.worker.slots import LocalSlots

    slots = LocalSlots([BackendConfig(url="http://x", max_parallel=max_parallel)], 100000)
    return uvloop.run(_cycles(slots, concurrency, time.time(), duration))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32, help="tasks per worker")
    ap.add_argument("--max-parallel", type=int, default=8, help="slots of the one backend")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="slot-bench-"))
    (tmp / "chatd.toml").write_text(
        f'[server]\nbind = "127.0.0.1:0"\nworkers = {args.workers}\n'
        f'[control]\nsocket = "{tmp}/ctl.sock"\n[log]\nlevel = "warning"\n'
        f"[llm]\nmax_queue = 100000\n"
        f'[[llm.backends]]\nurl = "http://127.0.0.1:9"\nmax_parallel = {args.max_parallel}\n'
    )
    start_at = time.time() + 2.0
    env = {
        **os.environ,
        "CHATD_TEST_WORKER": "slot_bench:bench_worker",
        "PYTHONPATH": f"{ROOT / 'scripts'}:{ROOT}",
        "SLOT_BENCH_DIR": str(tmp),
        "SLOT_BENCH_CONCURRENCY": str(args.concurrency),
        "SLOT_BENCH_START": str(start_at),
        "SLOT_BENCH_DURATION": str(args.duration),
    }
    master = subprocess.Popen(
        [str(BIN / "chatd"), "--config", str(tmp / "chatd.toml")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "chatd.log", "wb"),  # noqa: SIM115 - lives as long as the master
    )
    try:
        proc = psutil.Process(master.pid)
        time.sleep(max(0.0, start_at - time.time()))
        m0 = proc.cpu_times()
        time.sleep(args.duration)
        m1 = proc.cpu_times()
        deadline = time.time() + 10
        while len(list(tmp.glob("worker-*.json"))) < args.workers and time.time() < deadline:
            time.sleep(0.1)
        results = [json.loads(p.read_text()) for p in tmp.glob("worker-*.json")]
    finally:
        master.send_signal(signal.SIGTERM)
        master.wait(20)
    if len(results) < args.workers:
        print(f"only {len(results)} workers reported; see {tmp / 'chatd.log'}")
        return 1
    cycles = sum(r["cycles"] for r in results)
    master_cpu = (m1.user + m1.system) - (m0.user + m0.system)
    local = local_baseline(args.concurrency, args.max_parallel, min(args.duration, 2.0))
    report = {
        "workers": args.workers,
        "concurrency_per_worker": args.concurrency,
        "max_parallel": args.max_parallel,
        "duration_s": args.duration,
        "cycles": cycles,
        "grants_per_s": round(cycles / args.duration),
        "acquire_us": {  # the workers' own percentiles: the worst worker's
            "p50": round(max(r["p50"] for r in results) * 1e6, 1),
            "p99": round(max(r["p99"] for r in results) * 1e6, 1),
            "mean": round(sum(r["sum"] for r in results) / max(1, cycles) * 1e6, 1),
        },
        "worker_cpu_us_per_cycle": round(sum(r["cpu_s"] for r in results) / cycles * 1e6, 1),
        "master_cpu_us_per_grant": round(master_cpu / cycles * 1e6, 1),
        "master_cpu_percent": round(master_cpu / args.duration * 100, 1),
        "local_cpu_us_per_cycle": round(local["cpu_s"] / max(1, local["cycles"]) * 1e6, 1),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
