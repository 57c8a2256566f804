#!/usr/bin/env python3
"""measure_supervisor: replacement time after SIGKILL, and reloads under load. Not a test.

Starts what it measures (a fake Ollama on a thread, a real chatd with the real worker, on
loopback, in a temporary directory), prints the figures, and stops everything it started.

Usage::

    .venv/bin/python scripts/measure_supervisor.py [kill|reload|all]
        [--kills 20] [--reloads 10] [--clients 8] [--token-ms 20]

``kill``: each round SIGSTOPs worker 1 (so that connections queue on its slot's socket),
opens 16 plain HTTP requests (``GET /healthz``; worker 2 answers those hashed to its socket),
SIGKILLs worker 1 and times until the first request queued on its socket is answered, i.e.
by the replacement the master forked. Median and worst of ``--kills`` rounds.

``reload``: ``--clients`` clients chat without pause (tests/system/test_reload.py's Chatter:
resume after 1001, resend unacknowledged messages with the same id) while ``chatctl reload``
runs ``--reloads`` times; prints messages, acks, replies, reconnects, errors, messages
answered twice or never, and the duration of each ``chatctl reload``.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread  # noqa: E402
from tests.support import BIN, Chatd, wait_for  # noqa: E402
from tests.system.test_reload import Chatter  # noqa: E402


def _requests(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: m\r\n\r\n")
        socks.append(s)
    return socks


def measure_kills(d: Chatd, rounds: int) -> None:
    samples = []
    for _ in range(rounds):
        st = wait_for(d.all_ready, 10, "ready workers")
        target = st["workers"][0]["pid"]
        os.kill(target, signal.SIGSTOP)
        socks = _requests(d.port, 16)
        time.sleep(0.05)  # worker 2 answers its share
        waiting = [s for s in socks if not select.select([s], [], [], 0)[0]]
        begin = time.perf_counter()
        os.kill(target, signal.SIGKILL)
        readable, _, _ = select.select(waiting, [], [], 10) if waiting else ([], [], [])
        if waiting and readable:
            samples.append(time.perf_counter() - begin)
        for s in socks:
            s.close()
    ms = sorted(x * 1000 for x in samples)
    print(
        f"SIGKILL -> replacement answered a connection queued on its slot: {len(ms)} kills, "
        f"median {statistics.median(ms):.1f} ms, worst {ms[-1]:.1f} ms, best {ms[0]:.1f} ms"
    )


def measure_reloads(d: Chatd, reloads: int, clients: int) -> None:
    chatters = [Chatter(d.url, f"c{i}") for i in range(clients)]
    for c in chatters:
        c.start()
    wait_for(lambda: all(c.replied() >= 2 for c in chatters), 20, "clients chatting")
    durations, failures = [], 0
    for _ in range(reloads):
        begin = time.perf_counter()
        r = subprocess.run(
            [str(BIN / "chatctl"), "--socket", d.socket, "reload"], capture_output=True, text=True
        )
        durations.append((time.perf_counter() - begin) * 1000)
        failures += r.returncode != 0
        before = sum(c.replied() for c in chatters)
        wait_for(lambda b=before: sum(c.replied() for c in chatters) >= b + 20, 20, "chatting")
    for c in chatters:
        c.halt.set()
    for c in chatters:
        c.join(30)
    sent = sum(len(c.sent) for c in chatters)
    acked = sum(len(c.acked) for c in chatters)
    replied = sum(c.replied() for c in chatters)
    twice = sum(1 for c in chatters for s in c.replies.values() if len(s) > 1)
    never = sum(1 for c in chatters for i in c.acked if not c.replies[i])
    errors = [e for c in chatters for e in c.errors]
    stuck = [c.name for c in chatters if c.failure is not None]
    st = d.status() or {}
    print(
        f"{reloads} reloads under load ({clients} clients): {sent} messages, {acked} acked, "
        f"{replied} replied, {sum(c.reconnects for c in chatters)} reconnects, "
        f"{len(errors)} errors {[e.get('code') for e in errors]}, {twice} answered twice, "
        f"{never} acked but never answered, clients failed: {stuck}, "
        f"chatctl reload failures: {failures}, generation now {st['master']['generation']}"
    )
    print(
        f"chatctl reload duration: median {statistics.median(durations):.0f} ms, "
        f"worst {max(durations):.0f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="?", default="all", choices=["kill", "reload", "all"])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--token-ms", type=int, default=20)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="chatd-m-") as tmp,
        FakeOllamaThread(FakeOllama(tokens=5, token_ms=args.token_ms)) as fake,
    ):
        d = Chatd(Path(tmp), fake.url, workers=2, log={"level": "warning"})
        try:
            d.start()
            if args.what in ("kill", "all"):
                measure_kills(d, args.kills)
            if args.what in ("reload", "all"):
                measure_reloads(d, args.reloads, args.clients)
            d.stop()
        finally:
            d.kill_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
