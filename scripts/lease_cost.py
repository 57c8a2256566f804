#!/usr/bin/env python3
"""lease_cost: the store writes the message leases cost at 1,000 msg/s, measured (issue #14).

Every acknowledged message is leased to the worker generating it; each worker renews the
leases of its running generations every ``RENEW_S`` (one store call per session with a running
generation, all in one round trip) and sweeps for lapsed ones every ``SWEEP_S``
(``chatd.store.base``, ``chatd.worker.generation``). Shorter leases make a host's death cost
less wait, and more renewals. This measures them under the seed's peak load.

Starts, in a temp dir: the fake Ollama with replies of ``--reply-s`` seconds (one token at
the end: a reply must outlive a few renewals for them to show; chatd-bench counts these
replies as "bad", their text being shorter than it expects), a chatd of 2 workers on the store
(``--store redis``: a private redis-server, no persistence; ``sqlite``: a file), then runs
``chatd-bench run peak`` against it in this process (100 connections, 1,000 msg/s, open loop)
for ``--duration`` seconds after its warm-up. Counted over the middle of the measured window:

- redis: every command Redis ran (``MONITOR``, by ``redis-cli``), by name; ``EVALSHA`` by
  script (the SHA1 of each of ``chatd.store.redis_lua.SCRIPTS``, of the chatd measured), and
  the commands the scripts ran (``lua``), the writes among them being what the AOF and the
  replicas receive;
- sqlite: the write transactions that changed something, from the workers' ``store.commits``
  (``chatctl status``); renewals are one UPDATE per worker and round whatever the sessions.

``--code DIR`` runs the chatd found in DIR instead (its master and workers): e.g. the commit before
fast takeover, ``mkdir /tmp/head && git archive HEAD | tar -x -C /tmp/head``, for the figures
before. MONITOR costs Redis some CPU; the counts do not depend on it.

``--sqlite-round LEASES`` times, instead, what one renewal round of one worker costs the
SQLite file: LEASES messages over 100 sessions renewed in one tick (one UPDATE, in the write
lock every worker of the host shares).

Usage::

    .venv/bin/python scripts/lease_cost.py [--store redis|sqlite] [--reply-s 2]
        [--duration 20] [--code DIR] [--json]
    .venv/bin/python scripts/lease_cost.py --sqlite-round 1000
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatd.bench.scenarios import run_scenario  # noqa: E402
from chatd.bench.server import Target  # noqa: E402

BIN = Path(sys.executable).parent
WRITES = {"HSET", "ZADD", "XADD", "HINCRBY", "EXPIRE", "ZREM", "HDEL", "SET", "DEL"}


# chatd's main, from the tree named by argv[1] (this venv's editable install of chatd would
# win over PYTHONPATH: its finder is dropped first).
_CHATD = """import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path.insert(0, sys.argv.pop(1))
from chatd.cli import main
sys.argv[0] = "chatd"
sys.exit(main())"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port}")


def _scripts(code: Path) -> dict[str, str]:
    """SHA1 -> script name, for the chatd in ``code``."""
    spec = importlib.util.spec_from_file_location("lua", code / "chatd" / "store" / "redis_lua.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {hashlib.sha1(b.encode()).hexdigest(): n for n, b in module.SCRIPTS.items()}


class Monitor:
    """Every command Redis runs, with its time (Redis's clock, which is this host's):
    ``redis-cli monitor`` into a file (C, not this process: it shares the cores with the
    load), read once the load is over."""

    def __init__(self, port: int, names: dict[str, str], path: Path) -> None:
        self.names, self.path = names, path
        with open(path, "wb") as out:
            argv = ["redis-cli", "-p", str(port), "monitor"]
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL)

    def counts(self, start: float, end: float) -> Counter[str]:
        """Commands run in [start, end), by name ("EVALSHA renew", "lua HSET", ...)."""
        self.proc.terminate()
        self.proc.wait(10)
        seen: Counter[str] = Counter()
        with open(self.path, errors="replace") as f:
            for line in f:
                when, _, rest = line.partition(" ")
                try:
                    if not start <= float(when) < end:
                        continue
                except ValueError:  # "OK", or a line cut short
                    continue
                client, _, command = rest.partition("] ")
                words = command.split(" ", 2)
                name = words[0].strip().strip('"').upper()
                if name == "EVALSHA" and len(words) > 1:
                    name = f"EVALSHA {self.names.get(words[1].strip(chr(34)), '?')}"
                elif client.endswith("lua"):
                    name = f"lua {name}"
                seen[name] += 1
        return seen


def _commits(target: Target) -> int:
    st = target.status() or {}
    return sum(int((w.get("store") or {}).get("commits") or 0) for w in st.get("workers", []))


def measure(store: str, reply_s: float, duration: float, code: Path) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="lease-cost-"))
    procs: list[subprocess.Popen[bytes]] = []
    monitor: Monitor | None = None
    try:
        fake_port = _free_port()
        # One token, the whole reply, after reply_s: what is measured is the store, and the
        # streaming of many tokens to 1,000 clients a second would need more than 2 cores.
        fake = [str(BIN / "chatd-fake-ollama"), "--host", "127.0.0.1", "--port", str(fake_port)]
        fake += ["--tokens", "1", "--token-ms", "0", "--first-token-ms", str(reply_s * 1000)]
        procs.append(subprocess.Popen(fake, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_port(fake_port, "the fake Ollama")
        if store == "redis":
            redis_port = _free_port()
            argv = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1"]
            argv += ["--save", "", "--appendonly", "no", "--dir", str(tmp)]
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))
            _wait_port(redis_port, "redis-server")
            url = f"redis://127.0.0.1:{redis_port}/0"
        else:
            url = f"sqlite://{tmp / 'sessions.db'}"
        control = str(tmp / "control.sock")
        (tmp / "chatd.toml").write_text(
            '[server]\nbind = "127.0.0.1:0"\nworkers = 2\n'
            f'[control]\nsocket = "{control}"\n'
            '[llm]\nmodel = "qwen2.5-coder:7b"\nmax_queue = 100000\nfirst_token_timeout = 10.0\n'
            f'[sessions]\nstore = "{url}"\n'
            "[limits]\nmessages_per_minute = 1000000000\nmax_connections = 1000000\n"
            '[log]\nlevel = "warning"\n'
            f'[[llm.backends]]\nurl = "http://127.0.0.1:{fake_port}"\nmax_parallel = 100000\n'
        )
        with open(tmp / "chatd.log", "ab") as log:
            chatd = subprocess.Popen(
                [sys.executable, "-c", _CHATD, str(code), "--config", str(tmp / "chatd.toml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(chatd)
        target = Target("", control)
        deadline = time.monotonic() + 30
        while True:
            st = target.status()
            if st and st["workers"] and all(w["state"] == "ready" for w in st["workers"]):
                target.url = f"ws://127.0.0.1:{st['master']['bind'].rsplit(':', 1)[1]}/ws"
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"chatd did not start: see {tmp / 'chatd.log'}")
            time.sleep(0.1)
        target.fake_url = f"http://127.0.0.1:{fake_port}"
        if store == "redis":
            monitor = Monitor(redis_port, _scripts(code), tmp / "monitor.txt")
        # The measured window of the scenario starts after its warm-up (2 s for peak): a
        # thread samples the SQLite commits there; MONITOR's records are cut to it after.
        warmup, started = 2.0, time.time()
        window = (started + warmup + 1.0, started + warmup + duration - 1.0)
        commits: list[int] = []

        def sample() -> None:
            for when in window:
                time.sleep(max(0.0, when - time.time()))
                commits.append(_commits(target))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = run_scenario("peak", target, duration=duration, direct=False)
        sampler.join()
        seconds = window[1] - window[0]
        chatd_figures = result["chatd"]
        out: dict[str, Any] = {
            "store": store,
            "code": str(code),
            "reply_s": reply_s,
            "window_s": round(seconds, 1),
            "scheduled": chatd_figures["scheduled"],
            "answered": chatd_figures["answered"],
            "throughput_per_s": chatd_figures["throughput_per_s"],
            "errors": chatd_figures["errors"],
            "reply_ms_p50_p99": [chatd_figures["reply_ms"].get(k) for k in ("p50", "p99")],
        }
        if monitor is not None:
            counts = monitor.counts(*window)
            per_s = {k: round(v / seconds, 1) for k, v in counts.most_common()}
            out["redis_per_s"] = per_s
            out["redis_commands_per_s"] = round(
                sum(v for k, v in counts.items() if not k.startswith("lua ")) / seconds, 1
            )
            out["redis_script_writes_per_s"] = round(
                sum(v for k, v in counts.items() if k.split()[-1] in WRITES and "lua" in k)
                / seconds,
                1,
            )
        else:
            out["sqlite_commits_per_s"] = round((commits[1] - commits[0]) / seconds, 1)
        return out
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                if p is procs[-1]:
                    os.killpg(p.pid, signal.SIGTERM)
                else:
                    p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def sqlite_round(leases: int, sessions: int, rounds: int = 20) -> dict[str, Any]:
    """One worker's renewal round on SQLite, timed: ``leases`` running messages over
    ``sessions`` sessions renewed in one tick (one UPDATE, holding the host's write lock)."""
    import asyncio

    from chatd.store.sqlite import SqliteStore

    tmp = Path(tempfile.mkdtemp(prefix="lease-cost-"))

    async def run() -> list[float]:
        store = SqliteStore(str(tmp / "sessions.db"), 3600)
        await store.open()
        try:
            by_session: dict[str, list[str]] = {}
            for _ in range(sessions):
                s = await store.create_session("")
                ids = [f"m{i}" for i in range(leases // sessions)]
                await asyncio.gather(*(store.append_user(s, m, "q", "m") for m in ids))
                by_session[s] = ids
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                await asyncio.gather(*(store.renew(s, ids, 2.0) for s, ids in by_session.items()))
                times.append((time.perf_counter() - t0) * 1000.0)
            return sorted(times)
        finally:
            await store.close()

    try:
        times = asyncio.run(run())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "store": "sqlite",
        "leases": leases,
        "sessions": sessions,
        "round_ms_p50": round(times[len(times) // 2], 2),
        "round_ms_max": round(times[-1], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", choices=["redis", "sqlite"], default="redis")
    ap.add_argument("--reply-s", type=float, default=2.0, help="seconds per reply (2)")
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds (20)")
    ap.add_argument("--code", type=Path, default=ROOT, help="the chatd to run (this tree)")
    ap.add_argument("--json", action="store_true", help="one JSON document")
    ap.add_argument(
        "--sqlite-round",
        type=int,
        metavar="LEASES",
        help="instead: time one SQLite renewal round of LEASES leases over 100 sessions",
    )
    args = ap.parse_args()
    if args.sqlite_round:
        out = sqlite_round(args.sqlite_round, 100)
    else:
        out = measure(args.store, args.reply_s, args.duration, args.code.resolve())
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
