#!/usr/bin/env python3
"""syscalls: the system calls per message of chatd's workers and of the bare relay's, counted.

Starts chatd-bench's own chatd (2 workers, SQLite, a zero-delay fake Ollama) and sends it the
peak load (100 connections, ``--rate`` msg/s open loop, chatd-bench's raw clients) for
``--seconds`` + 10 s; in the middle, ``perf stat`` counts the system calls of its worker
processes and of its store writer (every thread; ``--own-writes``: no writer, each worker
writes the file itself) for ``--seconds``, through the kernel's ``syscalls`` tracepoints
(no ptrace: the workers run at their usual speed). Then the same against the bare relay
(:mod:`chatd.bench.bare`) on the same fake. Prints, per message (the count / (rate ×
seconds)), every system call counted and the total.

Needs ``perf`` and root (or ``kernel.perf_event_paranoid`` ≤ 1). docs/benchmarks.md ("The
tail, round two") has its figures. Usage::

    .venv/bin/python scripts/syscalls.py [--rate 1000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time

from chatd.bench import scenarios
from chatd.bench.bare import BareRelay
from chatd.bench.maxrate import zero_delay
from chatd.bench.scenarios import Scenario
from chatd.bench.server import OwnChatd, Target

CALLS = [
    "write",
    "pwrite64",
    "pread64",
    "read",
    "fcntl",
    "flock",
    "epoll_pwait",
    "epoll_wait",
    "futex",
    "getpid",
    "sendto",
    "recvfrom",
    "writev",
    "fdatasync",
    "fsync",
]
TOTAL = "raw_syscalls:sys_enter"


def workers(target: Target) -> list[int]:
    """The workers' pids, and the SQLite store writer's (it makes their writes)."""
    status = target.status() or {}
    writer = (status.get("master") or {}).get("store_writer") or {}
    pids = [int(w["pid"]) for w in status.get("workers", [])]
    return pids + ([int(writer["pid"])] if writer.get("pid") else [])


def count(target: Target, url: str, rate: float, seconds: float) -> dict[str, float]:
    """System calls per message of ``target``'s workers under ``rate`` msg/s."""
    events = ",".join([TOTAL, *(f"syscalls:sys_enter_{c}" for c in CALLS)])
    out: dict[str, str] = {}

    def perf() -> None:
        time.sleep(5.0)  # the load's warm-up and first seconds
        pids = ",".join(map(str, workers(target)))
        argv = ["perf", "stat", "-x,", "-e", events, "-p", pids, "--", "sleep", str(seconds)]
        out["perf"] = subprocess.run(argv, capture_output=True, text=True, check=True).stderr

    counter = threading.Thread(target=perf)
    counter.start()
    sc = Scenario("syscalls", "system calls per message", 100, rate, seconds + 10.0)
    scenarios.run_load(sc, target, "raw", url, (1.0, seconds + 10.0, 5.0), 2)
    counter.join()
    per: dict[str, float] = {}
    for line in out.get("perf", "").splitlines():
        fields = line.split(",")
        if len(fields) > 3 and fields[0].strip().isdigit():
            name = fields[2].removeprefix("syscalls:sys_enter_")
            per["all" if name == TOTAL else name] = int(fields[0]) / (rate * seconds)
    return per


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument(
        "--own-writes",
        action="store_true",
        help="each worker writes the SQLite file itself ([sessions] sqlite_writer = false)",
    )
    args = p.parse_args()
    extra = {"sessions": {"sqlite_writer": False}} if args.own_writes else {}
    chatd = OwnChatd(2, extra=extra)
    try:
        assert chatd.fake_url is not None
        zero_delay(chatd.fake_url)
        ours = count(chatd, chatd.url, args.rate, args.seconds)
        bare = BareRelay(chatd.fake_url, 2)
        try:
            theirs = count(bare, bare.url, args.rate, args.seconds)
        finally:
            bare.stop()
    finally:
        chatd.stop()
    print(f"| per message at {args.rate:g} msg/s | chatd | bare relay |")
    print("|---|---|---|")
    for name in ["all", *CALLS]:
        a, b = ours.get(name, 0.0), theirs.get(name, 0.0)
        if a or b:
            print(f"| {name} | {a:.1f} | {b:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
