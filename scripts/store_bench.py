#!/usr/bin/env python3
"""store_bench: what ``[sessions] min_replicas_acks`` costs an acknowledgement, measured.

Starts a Redis master and one replica on loopback (``redis-server``, AOF on with
``appendfsync everysec`` as docs/operations.md recommends, in a temp dir), then appends user
messages through the real :class:`chatd.store.redis.RedisStore` (its group commit, its Lua
append, and the ``WAIT`` when ``min_replicas_acks`` > 0) from ``--concurrency`` tasks, each on a
session of its own, for ``--duration`` seconds per case. The cases: ``min_replicas_acks`` 0
and 1, each at concurrency 1 (one message at a time: the latency an ack waits) and at
``--concurrency`` (many at once: the group commit shares one WAIT per batch).

Per case it prints, and writes as JSON with ``--out``: appends acknowledged per second, and the
append latency (call to return: what a client's ``ack`` waits for in the store) p50/p99 in ms.
On loopback a replica confirms within microseconds; across a network add about one round trip
between the master and its replica to every WAIT.

Usage::

    .venv/bin/python scripts/store_bench.py [--duration 3] [--concurrency 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatd.store.redis import RedisStore  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(dir: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    dir.mkdir()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "yes", "--dir", str(dir), "--repl-diskless-sync-delay", "0"]
    proc = subprocess.Popen([*argv, *extra], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return proc
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"redis-server did not start on port {port}")


def _wait_synced(replica_port: int) -> None:
    import redis

    deadline = time.monotonic() + 10
    with redis.Redis(port=replica_port, decode_responses=True) as r:
        while r.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync")
            time.sleep(0.02)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else 0.0


async def _case(url: str, acks: int, concurrency: int, duration: float) -> dict[str, Any]:
    store = RedisStore(url, 3600, min_replicas_acks=acks)
    await store.open()
    latencies: list[float] = []
    try:
        sessions = [await store.create_session("") for _ in range(concurrency)]
        for s in sessions:  # warm up: connections open, scripts cached
            await store.append_user(s, "warm", "x", "m")
        end = time.monotonic() + duration

        async def appender(session: str) -> None:
            n = 0
            while time.monotonic() < end:
                started = time.perf_counter()
                await store.append_user(session, f"m{n}", "a message of a usual length", "m")
                latencies.append((time.perf_counter() - started) * 1000)
                n += 1

        started = time.monotonic()
        await asyncio.gather(*(appender(s) for s in sessions))
        elapsed = time.monotonic() - started
    finally:
        await store.close()
    return {
        "min_replicas_acks": acks,
        "concurrency": concurrency,
        "appends_per_s": round(len(latencies) / elapsed),
        "p50_ms": round(_pct(latencies, 0.50), 3),
        "p99_ms": round(_pct(latencies, 0.99), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per case (3)")
    parser.add_argument("--concurrency", type=int, default=64, help="appenders at once (64)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is not installed", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="chatd-store-bench-"))
    master_port, replica_port = _free_port(), _free_port()
    procs = [_start(tmp / "master", master_port)]
    try:
        procs.append(
            _start(tmp / "replica", replica_port, "--replicaof", "127.0.0.1", str(master_port))
        )
        _wait_synced(replica_port)
        url = f"redis://127.0.0.1:{master_port}/0"
        results = []
        for concurrency in (1, args.concurrency):
            for acks in (0, 1):
                got = asyncio.run(_case(url, acks, concurrency, args.duration))
                results.append(got)
                print(
                    f"min_replicas_acks={acks} concurrency={concurrency:3d}: "
                    f"{got['appends_per_s']:6d} appends/s, p50 {got['p50_ms']:.3f} ms, "
                    f"p99 {got['p99_ms']:.3f} ms"
                )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
