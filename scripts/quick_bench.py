#!/usr/bin/env python3
"""quick_bench: a self-contained, bounded measurement of chatd on this machine.

Not a test and not the load generator (``chatd-bench`` comes later): one script that starts
what it measures (a fake Ollama, chatd, optionally the real SmolLM2 model), all on loopback,
in temporary directories, measures, prints a readable report, writes every figure as JSON
(``--out``) and stops everything it started, by PID.

Usage::

    python scripts/quick_bench.py [throughput|direct|idle|store|real|all]
        [--connections N] [--rate R] [--duration S] [--workers W] [--find-max] [--out FILE]
        [--clients P] [--warmup S] [--drain S] [--idle-connections N] [--real-samples N]
        [--log-level L] [--profile FILE [--profile-mode gil|all] [--profile-native]]
        [--perf FILE] [--chatd-prelude CODE] [--time-limit S]

Examples (what the first report was made with)::

    python scripts/quick_bench.py all --out all.json
    python scripts/quick_bench.py all --find-max --out all_findmax.json
    python scripts/quick_bench.py throughput --workers 1 --rate 1000 --duration 10 \
        --profile w1.speedscope.json --perf w1.perf.data --out prof.json

What each figure means and how it is measured
---------------------------------------------

Load model (``throughput`` and ``direct``). ``--connections`` C connections, spread over
``--clients`` P client processes (multiprocessing; each runs uvloop + asyncio with websockets
or aiohttp), send messages *open loop* at a total rate R msg/s: connection i sends its k-th
message at the intended time ``t0 + i/R + k*C/R``, whatever happened to earlier messages, so
arrivals are uniform at R/s overall. Every latency is measured from the message's *intended*
send time, not from when the client managed to send it: a server (or client) stall then shows
as latency instead of silently lowering the offered load (coordinated omission). The first
``--warmup`` seconds are sent but not measured; the measured window lasts ``--duration``.
After the last send the clients wait up to ``--drain`` s for outstanding replies.

``throughput`` (through chatd): each connection opens its own session (``hello`` ->
``welcome``), then sends ``message{id,text}`` frames; the fake backend answers with zero delay
and 8 tokens (it writes the whole reply in one write), so this measures chatd's own cost.

- ``achieved_rps``: ``reply`` frames received inside the measured window / window length.
- ``reply_ms`` p50/p95/p99/max: intended send time -> ``reply`` frame received, for the
  messages whose intended send time falls in the window.
- ``ack_ms``: intended send time -> ``ack`` (the message is committed to SQLite).
- ``errors``: ``error`` frames by code, plus ``lost`` (neither reply nor error at the end of
  the drain), ``bad_reply`` (reply text differs from the fake's deterministic answer) and
  connections that failed to open. Zero errors means all of these are zero.
- ``send_lag_ms``: how late the client actually sent, relative to the intended time (p99 and
  max). A large lag means the *client* could not keep up (its CPU is reported too).
- ``cpu``: CPU seconds (user+system, psutil/getrusage, all threads) used during the measured
  window by each chatd worker, the master, the fake backend, the client processes and this
  script; the machine's total busy CPU over the same window (psutil.cpu_times) and, by
  difference, what *other* processes on this shared machine used. The machine has only
  ``nproc`` cores shared by all of them: read ``clients_pct`` and ``others_s`` before blaming
  chatd for a ceiling.
- ``worker_cpu_us_per_msg``: sum of the chatd workers' CPU seconds in the window / replies
  received in the window, in microseconds.
- ``server``: ``chatctl status --json`` taken after the run: per worker ``latency_ms`` (the
  server's own view, message accepted -> reply stored), ``store.commit_p50_ms/p99_ms``,
  commits, connections and messages (how SO_REUSEPORT spread the load).

``direct``: the same load (same C, R, window, same request body that chatd would send: the
model, the session's last 40 messages as history, ``stream: true``, ``keep_alive``) POSTed
straight to the fake's ``/api/chat`` with aiohttp (one keep-alive pool per client process, no
limit), measuring intended -> first body chunk (``first_ms``) and intended -> end of stream
(``reply_ms``). ``overhead`` then divides chatd's figures by these, measured in the same run.

``--find-max``: steps the rate up (500, 1000, 1500, ... msg/s, ``--step-duration`` s each,
a fresh chatd per step so the server-side stats are per step) and reports the highest rate
with reply p99 < 50 ms and zero errors; a failing step is run once more (one stall on this
shared machine should not end the search alone; both attempts are reported) and the search
stops at the first step that fails twice. Done for
``throughput`` and ``direct`` (both, with ``all``).

``idle``: a fresh chatd; a client process first opens and closes 20 connections (so one-time
allocations are not counted), then ``--idle-connections`` N connections each do
``hello``/``welcome`` and stay open. ``rss_per_conn_kb`` = (sum over the workers of their RSS
after - before) / N, RSS read with psutil from the worker pids that ``chatctl status`` lists;
USS likewise. The script raises its own RLIMIT_NOFILE before starting chatd, so the workers
inherit it.

``store``: the worker store statistics from ``chatctl status`` after the throughput run
(``commit_p50_ms``/``commit_p99_ms`` is the latency of one group commit, from its first
statement to its commit, over a uniform sample of every commit since the worker started,
which here is the run; ``appends_per_commit`` = 2 appends per message / commits). Plus a
direct measurement of chatd's own ``SqliteStore`` alone in a uvloop process on a fresh file:
the same message rate open loop over C sessions (one ``append_user`` then one
``append_final`` per message), reporting the await latency of each append from the
intended time, the commit latencies and the store's CPU per message; then a 3 s closed loop
with C concurrent sessions for its capacity.

``real``: the real SmolLM2-135M model (llama.cpp server, started with
``chatd.local_model.start_local_model``) behind a fresh chatd (``api = "openai"``). Time to
first token through chatd (on a new connection: ``hello``; send ``message``; time until the
first ``token`` frame) versus a direct streaming POST to the model's
``/v1/chat/completions`` with the same messages (time until the first SSE chunk with
non-empty ``delta.content``). One warm-up each, then ``--real-samples`` samples each,
alternating which goes first; after the first token the reply is cancelled (chatd:
``cancel``; direct: the connection is closed) so a sample takes ~0.1 s instead of a whole
reply. Medians are reported. The model's threads run on the same cores as everything else.

Profiling (``--profile``, ``--perf``): during the measured window of the ``throughput`` run,
``py-spy record`` samples the first worker (speedscope file; by default ``--gil``, i.e. only
samples of the thread holding the GIL, and ``--nonblocking``), and ``perf record`` (cpu-clock)
samples its on-CPU time, C and kernel functions included. The report lists the top functions
of each. Read py-spy's shares as *wall time holding the GIL*: on an oversubscribed machine a
worker preempted inside a system call (a socket write wakes the client, which takes the CPU)
keeps its sample there, so lines that make system calls are over-weighted; perf's shares are
on-CPU only. Per-thread CPU seconds of every worker (event loop vs the store's threads) come
from psutil, named with ``py-spy dump``.

Clocks: client timestamps use ``time.perf_counter()``; uvloop's ``loop.time()`` has a 1 ms
resolution and would quantize every latency. Timers still fire on libuv's millisecond clock,
so a send can be up to ~1 ms late: that lateness is in ``send_lag_ms`` and, by design (from
the intended time), in the latencies; ``reply_from_actual_send_ms`` excludes it.

Noise: the machine is shared. Each run records the load average, the CPU used by every other
process during the window (``others_s``, ``others_top``) and a hash of chatd's sources at the
start and the end (``chatd_sources_*``): other engineers edit the tree while benchmarks run.
To measure one fixed version, copy the ``chatd`` package somewhere and run the script with
``PYTHONPATH`` pointing there (and a working directory outside the repo): chatd, the fake and
the store benchmark then all import that copy, and the hash is taken over it.

What-if experiments without editing the tree: ``--chatd-prelude CODE`` runs CODE in the chatd
master before it starts (workers are forked from it), e.g. a different group-commit window.

Every phase is bounded (timeouts everywhere, and ``--time-limit`` for the whole script);
only loopback addresses are used; every process the script started is stopped at the end
(SIGTERM, then SIGKILL by PID).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import uvloop
import websockets
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

REPO = Path(__file__).resolve().parent.parent
# Appended, not prepended: the venv's editable install (or a PYTHONPATH pointing at a frozen
# copy of the chatd package, to measure one version while the tree is being edited) wins.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

import chatd  # noqa: E402
from chatd.fake_ollama import expected_reply  # noqa: E402
from chatd.store.sqlite import SqliteStore  # noqa: E402

CHATD_SRC = Path(chatd.__file__).resolve().parent  # the package measured (children inherit
# PYTHONPATH, so chatd, the fake and the store benchmark all run this same copy)

BIN = Path(sys.executable).parent  # the venv's bin: chatd, chatctl, chatd-fake-ollama
MODEL = "qwen2.5-coder:7b"  # the fake's default model name
REAL_MODEL = "smollm2:135m"
TEXT = "hello world from quick bench"  # every load message; the fake's answer is known
TOKENS = 8
HISTORY_MESSAGES = 40  # chatd sends 2 * history_turns (default 20) messages of context
P99_LIMIT_MS = 50.0  # --find-max: a step passes with reply p99 below this and zero errors
NOFILE_WANTED = 65536
WS_OPTS: dict[str, Any] = {
    "compression": None,  # chatd's default ([server] compression = false)
    "ping_interval": None,  # no client pings: they would add frames to the measurement
    "max_size": None,
    "open_timeout": 20,
    "close_timeout": 2,
}
HELLO = b'{"type":"hello"}'


# ---------------------------------------------------------------------------------------
# Small helpers: percentiles, CPU accounting, process bookkeeping
# ---------------------------------------------------------------------------------------


def pct(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank, of an already sorted list (nan if empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(len(sorted_values) * q / 100.0))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary(values: Iterable[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean/count of latencies in milliseconds, rounded for the report."""
    v = sorted(values)
    if not v:
        return {"count": 0}
    return {
        "count": len(v),
        "p50": round(pct(v, 50), 3),
        "p95": round(pct(v, 95), 3),
        "p99": round(pct(v, 99), 3),
        "max": round(v[-1], 3),
        "mean": round(statistics.fmean(v), 3),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), 0 if it is gone."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread (OS thread id) of a process; {} if it is gone."""
    try:
        return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}
    except psutil.Error:
        return {}


def thread_names(pid: int) -> dict[int, str]:
    """OS thread id -> Python thread name, from ``py-spy dump --json`` (a ~50 ms pause of the
    process, taken outside the measured window); {} without py-spy."""
    spy = BIN / "py-spy"
    if not spy.exists():
        return {}
    try:
        r = subprocess.run(
            [str(spy), "dump", "--json", "-p", str(pid)],
            capture_output=True,
            timeout=20,
            check=False,
        )
        return {t["os_thread_id"]: t["thread_name"] for t in json.loads(r.stdout)}
    except (subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
        return {}


def all_process_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (name, CPU seconds) of every process on the machine (to see who else ran)."""
    out = {}
    for p in psutil.process_iter(["name", "cpu_times"]):
        t = p.info["cpu_times"]
        if t is not None:
            out[p.pid] = (p.info["name"] or "?", t.user + t.system)
    return out


def others_cpu(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], ours: set[int]
) -> tuple[float, list[tuple[str, float]]]:
    """CPU seconds used between two snapshots by processes that are not ours, and the top
    three of them (a process that started and ended in between is not seen)."""
    used = []
    for pid, (name, cpu) in after.items():
        if pid in ours:
            continue
        d = cpu - before.get(pid, (name, 0.0))[1]
        if d > 0:
            used.append((f"{name}[{pid}]", round(d, 3)))
    used.sort(key=lambda x: -x[1])
    return round(sum(d for _, d in used), 3), used[:3]


def machine_busy_seconds() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, all cores summed; total CPU seconds; the part
    of busy spent in interrupts and softirqs, e.g. the loopback network stack, which no
    process is charged for)."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = t.user + t.nice + t.system + t.idle  # guest time is already inside user
    total += sum(getattr(t, f, 0.0) for f in ("iowait", "irq", "softirq", "steal"))
    irq = getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return total - idle, total, irq


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# Every client timestamp comes from this clock. Not loop.time(): uvloop's is libuv's
# millisecond clock, which would quantize sub-millisecond latencies to whole milliseconds.
clock = time.perf_counter


def rusage_cpu() -> float:
    """CPU seconds of the calling process (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Reaper:
    """Everything this script started, stopped in reverse order at exit, by PID only."""

    def __init__(self) -> None:
        self._stops: list[tuple[str, Callable[[], None]]] = []

    def add(self, what: str, stop: Callable[[], None]) -> None:
        self._stops.append((what, stop))

    def remove(self, stop: Callable[[], None]) -> None:
        self._stops = [(w, s) for w, s in self._stops if s is not stop]

    def run_all(self) -> None:
        while self._stops:
            what, stop = self._stops.pop()
            try:
                stop()
            except Exception as exc:  # keep stopping the others
                print(f"quick_bench: stopping {what} failed: {exc!r}", file=sys.stderr)


REAPER = Reaper()


def stop_popen(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM one process we started, then SIGKILL it (by its PID) if it does not exit."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def stop_mp(proc: mp.process.BaseProcess, timeout: float = 5.0) -> None:
    """Join a client process; SIGKILL it by PID if it does not end in time."""
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


# ---------------------------------------------------------------------------------------
# The processes under test: fake Ollama and chatd
# ---------------------------------------------------------------------------------------


class FakeBackend:
    """``chatd-fake-ollama --port 0 --tokens 8`` as a subprocess (zero delay)."""

    def __init__(self, tokens: int = TOKENS) -> None:
        self.proc = subprocess.Popen(
            [
                BIN / "chatd-fake-ollama",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--tokens",
                f"{tokens}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        REAPER.add("fake ollama", self.stop)
        self.url = self._read_url(15.0)

    def _read_url(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        prefix = b"chatd-fake-ollama listening on "
        buf = b""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout.fileno(), selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise RuntimeError("the fake Ollama did not start in time")
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError("the fake Ollama exited at start")
                buf += chunk
        line = buf.split(b"\n", 1)[0]
        if not line.startswith(prefix):
            raise RuntimeError(f"unexpected first line from the fake: {line!r}")
        return line[len(prefix) :].decode().strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def reset_stats(self) -> None:
        _post_json(f"{self.url}/_fake/config", {"reset_stats": True})

    def stop(self) -> None:
        stop_popen(self.proc)
        REAPER.remove(self.stop)


def _post_json(url: str, body: dict[str, Any]) -> Any:
    import urllib.request

    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


class ChatdProc:
    """A chatd master (and its workers) on 127.0.0.1, with its own temp dir, config and log.

    The config is the shipped defaults except what a load test needs: ``messages_per_minute``
    raised (the default 60/min per connection would rate-limit the load), ``max_queue`` and
    the backend's ``max_parallel`` raised so nothing queues or answers ``busy`` for lack of
    slots, and ``graceful_timeout`` short so stopping is quick.
    """

    def __init__(
        self,
        workers: int,
        backend_url: str,
        *,
        api: str = "ollama",
        model: str = MODEL,
        log_level: str = "info",
        first_token_timeout: float = 10.0,
        prelude: str | None = None,
    ) -> None:
        self.prelude = prelude
        self.tmp = Path(tempfile.mkdtemp(prefix="quick_bench-chatd-"))
        self.socket = str(self.tmp / "control.sock")
        self.log_path = self.tmp / "chatd.log"
        sections: dict[str, dict[str, Any]] = {
            # Port 0: the master binds a free port; we read it back from `chatctl status`.
            "server": {"bind": "127.0.0.1:0", "workers": workers, "graceful_timeout": 5.0},
            "control": {"socket": self.socket},
            "llm": {
                "model": model,
                "max_queue": 100000,
                "first_token_timeout": first_token_timeout,
            },
            "sessions": {"store": f"sqlite://{self.tmp / 'sessions.db'}"},
            "limits": {"messages_per_minute": 1_000_000_000},
            "log": {"level": log_level},
        }
        lines = []
        for name, values in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
            lines.append("")
        lines += ["[[llm.backends]]", f'url = "{backend_url}"', f'api = "{api}"']
        lines += ["max_parallel = 256", ""]
        self.config_text = "\n".join(lines)
        self.config = self.tmp / "chatd.toml"
        self.config.write_text(self.config_text)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        # Every worker seen, pid -> start time, for a last-resort SIGKILL that cannot hit a
        # reused pid (another engineer's chatd may run on this machine too).
        self.pids_seen: dict[int, float] = {}

    def start(self, timeout: float = 30.0) -> ChatdProc:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps its own copy
        try:
            cmd = [str(BIN / "chatd")]
            if self.prelude:  # a what-if: run this code in the master before chatd starts
                code = f"{self.prelude}\nimport sys\nfrom chatd.cli import main\nsys.exit(main())"
                cmd = [sys.executable, "-c", code]
            self.proc = subprocess.Popen(
                [*cmd, "--config", str(self.config)],
                cwd=self.tmp,  # for `python -c`, sys.path[0] is the cwd: not the repo
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in our terminal reaches us, not chatd
            )
        finally:
            log.close()
        REAPER.add("chatd", self.stop)
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st and st["workers"] and all(w["state"] == "ready" for w in st["workers"]):
                self.port = int(st["master"]["bind"].rsplit(":", 1)[1])
                self._remember(w["pid"] for w in st["workers"])
                # The readiness probe also wants a healthy backend (workers check at start).
                if self._ready():
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"chatd exited at start; log: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"chatd did not become ready; log: {self.log_tail()}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.http}/readyz", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, Any] | None:
        """``chatctl --socket SOCK status --json`` (a subprocess: call it outside windows)."""
        try:
            r = subprocess.run(
                [str(BIN / "chatctl"), "--socket", self.socket, "status", "--json"],
                capture_output=True,
                timeout=10,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None
        if r.returncode not in (0, 1) or not r.stdout:
            return None
        st: dict[str, Any] = json.loads(r.stdout)
        self._remember(w["pid"] for w in st.get("workers", []) if w.get("pid"))
        return st

    def _remember(self, pids: Iterable[int]) -> None:
        for pid in pids:
            if pid not in self.pids_seen:
                with contextlib.suppress(psutil.Error):
                    self.pids_seen[pid] = psutil.Process(pid).create_time()

    def worker_pids(self) -> list[int]:
        st = self.status()
        if not st:
            raise RuntimeError("chatctl status does not answer")
        return sorted(w["pid"] for w in st["workers"] if w.get("pid"))

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the master (it drains its workers); SIGKILL master and workers by PID if
        that takes more than 15 s. The temp dir is removed."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
            for pid, started in self.pids_seen.items():  # workers outliving their master
                with contextlib.suppress(psutil.Error):
                    p = psutil.Process(pid)
                    if p.create_time() == started:  # the same process, not a reused pid
                        p.kill()
        REAPER.remove(self.stop)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Client processes (multiprocessing): the load, open loop, latency from intended times
# ---------------------------------------------------------------------------------------


@dataclass
class LoadJob:
    """What one client process does; ``conns`` are global connection indexes."""

    kind: str  # "chatd" (WebSocket) or "direct" (POST /api/chat to the fake)
    url: str
    conns: list[int]
    rate: float  # total, all client processes together
    connections: int  # total
    warmup: float
    duration: float
    drain: float


@dataclass(slots=True)
class _ConnState:
    """One connection's schedule and what came back (times from the loop's clock)."""

    index: int
    intended: list[float]
    sent: list[float] = field(default_factory=list)
    ack: list[float] = field(default_factory=list)
    reply: list[float] = field(default_factory=list)
    error: list[str | None] = field(default_factory=list)
    answered: int = 0
    bad_reply: int = 0
    token_frames: int = 0
    other_frames: int = 0
    closed: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        n = len(self.intended)
        self.sent = [math.nan] * n
        self.ack = [math.nan] * n
        self.reply = [math.nan] * n
        self.error = [None] * n
        if not n:
            self.done.set()

    def finish(self, k: int) -> None:
        self.answered += 1
        if self.answered >= len(self.intended):
            self.done.set()


def _schedule(job: LoadJob, start: float) -> list[_ConnState]:
    """Open-loop arrival times: connection i sends at ``start + i/R + k*C/R`` (uniform total)."""
    end = start + job.warmup + job.duration
    period = job.connections / job.rate
    states = []
    for i in job.conns:
        first = start + i / job.rate
        n = max(0, math.ceil((end - first) / period))
        states.append(_ConnState(i, [first + k * period for k in range(n)]))
    return states


def _results(
    job: LoadJob, states: list[_ConnState], start: float, cpu_window: list[float], extra: dict
) -> dict[str, Any]:
    """Latencies (ms from intended time) of the messages intended inside the window, counts."""
    w0, w1 = start + job.warmup, start + job.warmup + job.duration
    reply_ms: list[float] = []  # from the intended send time (what a user sees)
    ack_ms: list[float] = []
    lag_ms: list[float] = []  # actual send - intended send: the client's own lateness
    service_ms: list[float] = []  # reply - actual send (the server's share, no client lag)
    errors: Counter[str] = Counter()
    scheduled = replies = replies_in_window = lost = bad = 0
    token_frames = other_frames = 0
    for st in states:
        bad += st.bad_reply
        token_frames += st.token_frames
        other_frames += st.other_frames
        for k, t in enumerate(st.intended):
            scheduled += 1
            r, e = st.reply[k], st.error[k]
            if not math.isnan(r):
                replies += 1
                if w0 <= r < w1:
                    replies_in_window += 1
            elif e is not None:
                errors[e] += 1
            else:
                lost += 1
            if w0 <= t < w1:
                if not math.isnan(r):
                    reply_ms.append((r - t) * 1000.0)
                if not math.isnan(st.ack[k]):
                    ack_ms.append((st.ack[k] - t) * 1000.0)
                if not math.isnan(st.sent[k]):
                    lag_ms.append((st.sent[k] - t) * 1000.0)
                    if not math.isnan(r):
                        service_ms.append((r - st.sent[k]) * 1000.0)
    return {
        "scheduled": scheduled,
        "replies": replies,
        "replies_in_window": replies_in_window,
        "errors": dict(errors),
        "lost": lost,
        "bad_reply": bad,
        "token_frames": token_frames,
        "other_frames": other_frames,
        "reply_ms": reply_ms,
        "ack_ms": ack_ms,
        "send_lag_ms": lag_ms,
        "service_ms": service_ms,
        "cpu_s": cpu_window[1] - cpu_window[0] if len(cpu_window) == 2 else math.nan,
        "closed": [st.closed for st in states if st.closed][:3],
        **extra,
    }


def _cpu_marks(loop: asyncio.AbstractEventLoop, job: LoadJob, start: float) -> list[float]:
    """This process's CPU seconds at the start and the end of the measured window."""
    marks: list[float] = []
    now = clock()
    loop.call_later(start + job.warmup - now, lambda: marks.append(rusage_cpu()))
    loop.call_later(start + job.warmup + job.duration - now, lambda: marks.append(rusage_cpu()))
    return marks


async def _wait_go(pipe: Connection) -> float | None:
    """Block until the parent says go (returns the wall-clock start) or abort (None)."""
    if not pipe.poll(120):
        return None
    msg = pipe.recv()
    return float(msg[1]) if msg[0] == "go" else None


async def _chatd_load(job: LoadJob, pipe: Connection) -> dict[str, Any]:
    """One client process of ``throughput``: C/P WebSocket sessions, open-loop messages."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(50)  # connect 50 at a time: the listen backlog stays short
    expected = expected_reply(TEXT, TOKENS)

    async def open_one() -> Any:
        async with gate:
            ws = await ws_connect(job.url, **WS_OPTS)
            await ws.send(HELLO, text=True)
            welcome = orjson.loads(await asyncio.wait_for(ws.recv(decode=False), 20))
            if welcome.get("type") != "welcome":
                raise RuntimeError(f"no welcome: {welcome}")
            return ws

    opened = await asyncio.gather(*(open_one() for _ in job.conns), return_exceptions=True)
    failed = [repr(x) for x in opened if isinstance(x, BaseException)]
    pipe.send(("ready", len(opened) - len(failed), failed[:3]))
    wall_start = await _wait_go(pipe)
    if wall_start is None:
        return {"aborted": True}
    start = clock() + (wall_start - time.time())
    states = _schedule(job, start)
    marks = _cpu_marks(loop, job, start)
    pairs = [
        (ws, st) for ws, st in zip(opened, states, strict=True) if not isinstance(ws, BaseException)
    ]
    for ws, st in zip(opened, states, strict=True):
        if isinstance(ws, BaseException):  # a connection that never opened: all lost
            st.closed = f"connect failed: {ws!r}"
            st.done.set()

    async def sender(ws: Any, st: _ConnState) -> None:
        head = b'{"type":"message","text":"' + TEXT.encode() + b'","id":"'
        for k, t in enumerate(st.intended):
            delay = t - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            st.sent[k] = clock()
            try:
                await ws.send(head + str(k).encode() + b'"}', text=True)
            except ConnectionClosed as exc:
                st.closed = f"closed while sending: {exc}"
                st.done.set()
                return

    async def receiver(ws: Any, st: _ConnState) -> None:
        try:
            while True:
                raw = await ws.recv(decode=False)
                now = clock()
                f = orjson.loads(raw)
                typ = f.get("type")
                if typ == "token":
                    st.token_frames += 1
                elif typ == "ack":
                    st.ack[int(f["id"])] = now
                elif typ == "reply":
                    k = int(f["id"])
                    st.reply[k] = now
                    if f.get("text") != expected or f.get("done_reason") != "stop":
                        st.bad_reply += 1
                    st.finish(k)
                elif typ == "error" and "id" in f:
                    k = int(f["id"])
                    st.error[k] = str(f.get("code"))
                    st.finish(k)
                else:
                    st.other_frames += 1
        except ConnectionClosed as exc:
            st.closed = st.closed or f"closed by the server: {exc}"
            st.done.set()

    senders = [asyncio.create_task(sender(ws, st)) for ws, st in pairs]
    receivers = [asyncio.create_task(receiver(ws, st)) for ws, st in pairs]
    await asyncio.gather(*senders)
    drain_until = start + job.warmup + job.duration + job.drain
    pending = [asyncio.create_task(st.done.wait()) for st in states]
    await asyncio.wait(pending, timeout=max(0.1, drain_until - clock()))
    for t in [*pending, *receivers]:
        t.cancel()
    await asyncio.gather(*pending, *receivers, return_exceptions=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            await asyncio.gather(*(ws.close() for ws, _ in pairs), return_exceptions=True)
    return _results(job, states, start, marks, {"connect_failed": len(failed)})


async def _direct_load(job: LoadJob, pipe: Connection) -> dict[str, Any]:
    """One client process of ``direct``: the same schedule, POST /api/chat to the fake."""
    loop = asyncio.get_running_loop()
    reply_text = expected_reply(TEXT, TOKENS)
    connector = aiohttp.TCPConnector(limit=0)  # as chatd's relay: no pool limit
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=30),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    url = job.url.rstrip("/") + "/api/chat"
    # Warm the pool: one request per connection, so connection set-up is not measured.
    body0 = orjson.dumps({"model": MODEL, "messages": [], "stream": True, "keep_alive": "5m"})
    warm = []
    for _ in job.conns:
        warm.append(session.post(url, data=body0, headers={"Content-Type": "application/json"}))
    failed = 0
    for w in warm:
        try:
            async with w as resp:
                await resp.read()
        except aiohttp.ClientError:
            failed += 1
    pipe.send(("ready", len(job.conns) - failed, []))
    wall_start = await _wait_go(pipe)
    if wall_start is None:
        await session.close()
        return {"aborted": True}
    start = clock() + (wall_start - time.time())
    states = _schedule(job, start)
    marks = _cpu_marks(loop, job, start)
    first: dict[tuple[int, int], float] = {}

    async def request(st: _ConnState, k: int, body: bytes, history: deque[dict[str, str]]) -> None:
        try:
            async with session.post(
                url, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                if resp.status != 200:
                    st.error[k] = f"http_{resp.status}"
                    await resp.read()
                    return
                buf = bytearray()
                async for chunk in resp.content.iter_any():
                    if not buf:
                        first[(st.index, k)] = clock()
                    buf += chunk
                st.reply[k] = clock()
                st.ack[k] = first.get((st.index, k), st.reply[k])  # "ack" = first chunk here
                last = orjson.loads(bytes(buf).rstrip(b"\n").rsplit(b"\n", 1)[-1])
                text = b"".join(
                    orjson.loads(line)["message"]["content"].encode()
                    for line in bytes(buf).split(b"\n")
                    if line
                ).decode()
                if not last.get("done") or text != reply_text:
                    st.bad_reply += 1
                history.append({"role": "assistant", "content": text})
        except (aiohttp.ClientError, OSError, ValueError, KeyError) as exc:
            st.error[k] = type(exc).__name__
        finally:
            st.finish(k)

    async def sender(st: _ConnState) -> None:
        # The same body chatd sends: the session's last 40 messages, then this turn.
        history: deque[dict[str, str]] = deque(maxlen=HISTORY_MESSAGES)
        tasks = []
        for k, t in enumerate(st.intended):
            delay = t - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            st.sent[k] = clock()
            history.append({"role": "user", "content": TEXT})
            body = orjson.dumps(
                {"model": MODEL, "messages": list(history), "stream": True, "keep_alive": "5m"}
            )
            tasks.append(asyncio.create_task(request(st, k, body, history)))
        await asyncio.gather(*tasks, return_exceptions=True)

    senders = [asyncio.create_task(sender(st)) for st in states]
    drain_until = start + job.warmup + job.duration + job.drain
    await asyncio.wait(senders, timeout=max(1.0, drain_until - clock()))
    for t in senders:
        t.cancel()
    await asyncio.gather(*senders, return_exceptions=True)
    await session.close()
    return _results(job, states, start, marks, {"connect_failed": failed})


def _client_main(job: LoadJob, pipe: Connection) -> None:
    """Entry point of a client process: run the load on uvloop, send the results back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    try:
        fn = _chatd_load if job.kind == "chatd" else _direct_load
        result = uvloop.run(fn(job, pipe))
        pipe.send(("result", result))
    except BaseException:
        with contextlib.suppress(Exception):
            pipe.send(("error", traceback.format_exc()))
    finally:
        pipe.close()


def _start_children(target: Callable[..., None], args_list: list[tuple[Any, ...]]) -> list[Any]:
    """Fork one process per args tuple with a pipe; returns [(process, parent end)]."""
    ctx = mp.get_context("fork")
    out = []
    for args in args_list:
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(target=target, args=(*args, child_end), daemon=True)
        p.start()
        child_end.close()
        REAPER.add(f"client process {p.pid}", lambda p=p: stop_mp(p, 1.0))
        out.append((p, parent_end))
    return out


def _expect(pipe: Connection, kind: str, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise RuntimeError(f"a client process sent no {kind!r} within {timeout:.0f} s")
    msg = pipe.recv()
    if msg[0] == "error":
        raise RuntimeError(f"a client process failed:\n{msg[1]}")
    if msg[0] != kind:
        raise RuntimeError(f"a client process sent {msg[0]!r}, expected {kind!r}")
    return msg


# ---------------------------------------------------------------------------------------
# One load run (throughput through chatd, or direct to the fake), CPU accounted
# ---------------------------------------------------------------------------------------


def run_load(
    kind: str,
    args: argparse.Namespace,
    rate: float,
    duration: float,
    fake: FakeBackend,
    chatd: ChatdProc | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """Run one open-loop load at ``rate`` msg/s for ``duration`` s (plus warm-up and drain)."""
    url = chatd.url if chatd is not None else fake.url
    n_clients = max(1, min(args.clients, args.connections))
    jobs = [
        LoadJob(
            kind=kind,
            url=url,
            conns=list(range(p, args.connections, n_clients)),
            rate=rate,
            connections=args.connections,
            warmup=args.warmup,
            duration=duration,
            drain=args.drain,
        )
        for p in range(n_clients)
    ]
    fake.reset_stats()
    st_before = chatd.status() if chatd is not None else None
    worker_pids = sorted(w["pid"] for w in st_before["workers"]) if st_before else []
    master_pid = chatd.proc.pid if chatd is not None and chatd.proc is not None else None
    children = _start_children(_client_main, [(job,) for job in jobs])
    ready = [_expect(pipe, "ready", 90) for _, pipe in children]
    opened = sum(r[1] for r in ready)
    names = {pid: thread_names(pid) for pid in worker_pids}  # before the load starts
    wall_start = time.time() + 0.5
    for _, pipe in children:
        pipe.send(("go", wall_start))
    load_before = loadavg()

    # Sample every process's CPU at the window's edges (psutil only: cheap, no subprocess).
    watched = {f"worker {pid}": pid for pid in worker_pids}
    if master_pid:
        watched["master"] = master_pid
    watched["fake"] = fake.pid
    for p, _ in children:
        watched[f"client {p.pid}"] = p.pid
    watched["script"] = os.getpid()
    time.sleep(max(0.0, wall_start + args.warmup - time.time()))
    spy = None
    if profile and worker_pids:
        spy = subprocess.Popen(
            [str(BIN / "py-spy"), "record", "-p", str(worker_pids[0]), "-d", str(int(duration))]
            + ["-r", str(args.profile_rate), "--format", "speedscope", "-o", profile]
            + (["--gil"] if args.profile_mode == "gil" else [])
            + (["--native"] if args.profile_native else [])
            + ([] if args.profile_blocking else ["--nonblocking"]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        REAPER.add("py-spy", lambda: stop_popen(spy, 2.0))
        watched["py-spy"] = spy.pid
    everyone0 = all_process_cpu()
    perf = None
    if args.perf and worker_pids:
        # perf samples on-CPU time only (cpu-clock), so unlike py-spy it is not skewed by
        # preemption; with CPython 3.11 it sees C functions, not Python ones.
        perf = subprocess.Popen(
            [
                *("perf", "record", "-F", "499", "-g", "-p", str(worker_pids[0])),
                *("-o", args.perf, "--", "sleep", str(duration)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        REAPER.add("perf", lambda: stop_popen(perf, 5.0))
        watched["perf"] = perf.pid
    cpu0 = {k: cpu_seconds(pid) for k, pid in watched.items()}
    threads0 = {pid: thread_cpu(pid) for pid in worker_pids}
    busy0, total0, irq0 = machine_busy_seconds()
    time.sleep(max(0.0, wall_start + args.warmup + duration - time.time()))
    cpu1 = {k: cpu_seconds(pid) for k, pid in watched.items()}
    threads1 = {pid: thread_cpu(pid) for pid in worker_pids}
    everyone1 = all_process_cpu()
    others_s, others_top = others_cpu(everyone0, everyone1, set(watched.values()))
    busy1, total1, irq1 = machine_busy_seconds()
    load_after = loadavg()

    results = [_expect(pipe, "result", args.drain + 60)[1] for _, pipe in children]
    for p, _ in children:
        stop_mp(p)
    spy_err = ""
    if spy is not None:
        try:
            _, err = spy.communicate(timeout=30)
            spy_err = err.decode(errors="replace").strip().splitlines()[-1:]
        except subprocess.TimeoutExpired:
            stop_popen(spy, 2.0)
    if perf is not None:
        try:
            perf.wait(30)
        except subprocess.TimeoutExpired:
            stop_popen(perf, 5.0)
    time.sleep(1.2)  # workers report their stats every second
    st_after = chatd.status() if chatd is not None else None

    # Merge the client processes' results.
    merged: dict[str, Any] = {"errors": Counter()}
    for key in ("scheduled", "replies", "replies_in_window", "lost", "bad_reply"):
        merged[key] = sum(r[key] for r in results)
    for key in ("token_frames", "other_frames", "connect_failed"):
        merged[key] = sum(r[key] for r in results)
    for r in results:
        merged["errors"].update(r["errors"])
    reply_ms = [x for r in results for x in r["reply_ms"]]
    ack_ms = [x for r in results for x in r["ack_ms"]]
    lag = sorted(x for r in results for x in r["send_lag_ms"])
    service_ms = [x for r in results for x in r["service_ms"]]
    n_err = sum(merged["errors"].values()) + merged["lost"] + merged["bad_reply"]
    n_err += merged["connect_failed"]
    cpu = {k: round(cpu1[k] - cpu0[k], 3) for k in watched}
    workers_s = sum(v for k, v in cpu.items() if k.startswith("worker "))
    clients_s = sum(v for k, v in cpu.items() if k.startswith("client "))
    ours = sum(cpu.values())
    machine_busy = busy1 - busy0
    ncpu = psutil.cpu_count() or 1
    in_window = merged["replies_in_window"]
    out: dict[str, Any] = {
        "kind": kind,
        "rate": rate,
        "connections": args.connections,
        "connections_opened": opened,
        "client_processes": n_clients,
        "warmup_s": args.warmup,
        "duration_s": duration,
        "achieved_rps": round(in_window / duration, 1),
        "reply_ms": summary(reply_ms),
        ("ack_ms" if kind == "chatd" else "first_ms"): summary(ack_ms),
        "reply_from_actual_send_ms": summary(service_ms),
        "send_lag_ms": {
            "p50": round(pct(lag, 50), 3) if lag else None,
            "p99": round(pct(lag, 99), 3) if lag else None,
            "max": round(lag[-1], 3) if lag else None,
        },
        "scheduled": merged["scheduled"],
        "replies": merged["replies"],
        "replies_in_window": in_window,
        "errors": {
            "by_code": dict(merged["errors"]),
            "lost": merged["lost"],
            "bad_reply": merged["bad_reply"],
            "connect_failed": merged["connect_failed"],
            "total": n_err,
            "closed": [c for r in results for c in r.get("closed", [])][:3],
        },
        "frames": {"token": merged["token_frames"], "other": merged["other_frames"]},
        "cpu": {
            "per_process_s": cpu,
            "client_self_reported_s": [round(r["cpu_s"], 3) for r in results],
            "workers_s": round(workers_s, 3),
            "clients_s": round(clients_s, 3),
            "clients_pct_of_one_core": round(100 * clients_s / duration, 1),
            "workers_pct_of_one_core": round(100 * workers_s / duration, 1),
            "machine_busy_s": round(machine_busy, 3),
            "machine_busy_pct": round(100 * machine_busy / max(1e-9, total1 - total0), 1),
            "irq_softirq_s": round(irq1 - irq0, 3),
            # Busy time that is neither ours nor interrupts, by difference. On this VM the
            # per-process and the per-machine accounting disagree by up to ~15% (this can be
            # negative), so the per-process count of the other processes is given too.
            "unattributed_s": round(machine_busy - (irq1 - irq0) - ours, 3),
            "others_s": others_s,
            "others_top": others_top,
            "cores": ncpu,
        },
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    if in_window:
        out["worker_cpu_us_per_msg"] = round(workers_s / in_window * 1e6, 1)
        out["fake_cpu_us_per_msg"] = round(cpu["fake"] / in_window * 1e6, 1)
        out["client_cpu_us_per_msg"] = round(clients_s / in_window * 1e6, 1)
    # Per worker thread: the event loop (MainThread) vs the store's writer and reader.
    out["cpu"]["worker_threads_s"] = {
        str(pid): {
            names[pid].get(tid, str(tid)): round(t1 - threads0[pid].get(tid, 0.0), 3)
            for tid, t1 in threads1[pid].items()
        }
        for pid in worker_pids
    }
    if st_after is not None and st_before is not None:
        out["server"] = _server_view(st_before, st_after)
    if perf is not None:
        out["perf"] = summarize_perf(args.perf, worker_pids[0])
    if spy is not None:
        out["profile"] = {
            "file": profile,
            "py_spy": spy_err,
            "mode": args.profile_mode
            + ("+native" if args.profile_native else "")
            + ("+blocking" if args.profile_blocking else "+nonblocking"),
            "rate_hz": args.profile_rate,
            "worker_pid": worker_pids[0],
        }
    return out


def _server_view(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per worker: connections, messages, server-side latency and store stats (chatctl)."""
    prev = {w["pid"]: w for w in before["workers"]}
    rows = []
    for w in after["workers"]:
        b = prev.get(w["pid"], {})
        store, store0 = w.get("store", {}), b.get("store", {})
        messages = w.get("messages_total", 0) - b.get("messages_total", 0)
        commits = store.get("commits", 0) - store0.get("commits", 0)
        rows.append(
            {
                "pid": w["pid"],
                "connections": w.get("connections_total", 0) - b.get("connections_total", 0),
                "messages": messages,
                "replies": w.get("replies_total", 0) - b.get("replies_total", 0),
                "errors_by_code": w.get("errors_by_code"),
                "latency_ms": w.get("latency_ms"),
                "ttft_ms": w.get("ttft_ms"),
                "rss_mb": round(w.get("rss_bytes", 0) / 2**20, 1),
                "store": {
                    "commits": commits,
                    "commit_p50_ms": round(store.get("commit_p50_ms", math.nan), 3),
                    "commit_p99_ms": round(store.get("commit_p99_ms", math.nan), 3),
                    "busy_retries": store.get("busy_retries", 0) - store0.get("busy_retries", 0),
                    "appends_per_commit": round(2 * messages / commits, 2) if commits else None,
                },
            }
        )
    return {"workers": rows, "totals_latency_ms": after["totals"].get("latency_ms")}


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


def section_throughput(args: argparse.Namespace, fake: FakeBackend) -> dict[str, Any]:
    chatd = ChatdProc(
        args.workers, fake.url, log_level=args.log_level, prelude=args.chatd_prelude
    ).start()
    try:
        res = run_load("chatd", args, args.rate, args.duration, fake, chatd, args.profile)
        res["chatd_config"] = chatd.config_text
    finally:
        chatd.stop()
    if args.profile and os.path.exists(args.profile):
        res.setdefault("profile", {})["top"] = summarize_speedscope(args.profile)
    return res


def section_direct(args: argparse.Namespace, fake: FakeBackend) -> dict[str, Any]:
    return run_load("direct", args, args.rate, args.duration, fake)


def find_max(kind: str, args: argparse.Namespace, fake: FakeBackend) -> dict[str, Any]:
    """Step the rate up; a fresh chatd per step. Stop at the first failing step."""
    steps = []
    best = None
    rate = args.step
    deadline = time.monotonic() + args.find_max_budget
    while rate <= args.max_rate and time.monotonic() < deadline:
        # A failing step is run once more (a fresh chatd): one stall, a WAL checkpoint or a
        # burst from another process on this shared machine, should not end the search
        # alone. Both attempts are recorded (``attempt`` 1 and 2).
        for attempt in (1, 2):
            chatd = None
            try:
                if kind == "chatd":
                    chatd = ChatdProc(
                        args.workers, fake.url, log_level=args.log_level, prelude=args.chatd_prelude
                    ).start()
                res = run_load(kind, args, rate, args.step_duration, fake, chatd)
            finally:
                if chatd is not None:
                    chatd.stop()
            p99 = res["reply_ms"].get("p99", math.inf)
            ok = res["errors"]["total"] == 0 and p99 < P99_LIMIT_MS
            if ok or attempt == 2:
                break
            steps.append(_step(rate, False, res, attempt))
            _print_step(kind, steps[-1])
        steps.append(_step(rate, ok, res, attempt))
        _print_step(kind, steps[-1])
        if not ok:
            break
        best = rate
        rate += args.step
    return {
        "max_rate_ok": best,
        "criterion": f"p99 < {P99_LIMIT_MS} ms, 0 errors (a failing step is tried twice)",
        "steps": steps,
    }


def _step(rate: float, ok: bool, res: dict[str, Any], attempt: int) -> dict[str, Any]:
    """One find-max step's summary."""
    return {
        "rate": rate,
        "attempt": attempt,
        "ok": ok,
        "achieved_rps": res["achieved_rps"],
        "reply_ms": res["reply_ms"],
        "errors": res["errors"]["total"],
        "send_lag_p99_ms": res["send_lag_ms"]["p99"],
        "worker_cpu_us_per_msg": res.get("worker_cpu_us_per_msg"),
        "fake_cpu_us_per_msg": res.get("fake_cpu_us_per_msg"),
        "workers_pct": res["cpu"]["workers_pct_of_one_core"],
        "clients_pct": res["cpu"]["clients_pct_of_one_core"],
        "machine_busy_pct": res["cpu"]["machine_busy_pct"],
        "others_s": res["cpu"]["others_s"],
        "unattributed_s": res["cpu"]["unattributed_s"],
        "loadavg": res["loadavg_after"],
    }


def section_idle(args: argparse.Namespace, fake: FakeBackend) -> dict[str, Any]:
    """RSS per idle connection: (sum of worker RSS after - before) / N."""
    chatd = ChatdProc(
        args.workers, fake.url, log_level=args.log_level, prelude=args.chatd_prelude
    ).start()
    try:
        pids = chatd.worker_pids()
        children = _start_children(_idle_main, [(chatd.url, args.idle_connections)])
        proc, pipe = children[0]
        _expect(pipe, "warm", 60)
        time.sleep(1.0)
        before = _mem(pids)
        pipe.send(("open",))
        msg = _expect(pipe, "open", 180)
        time.sleep(1.5)  # let the workers settle and report
        after = _mem(pids)
        st = chatd.status() or {"workers": []}
        conns = {w["pid"]: w.get("connections") for w in st["workers"]}
        pipe.send(("close",))
        _expect(pipe, "closed", 60)
        stop_mp(proc)
    finally:
        chatd.stop()
    n = msg[1]
    d_rss = sum(after[p]["rss"] - before[p]["rss"] for p in pids)
    d_uss = sum(after[p]["uss"] - before[p]["uss"] for p in pids)
    return {
        "requested": args.idle_connections,
        "opened": n,
        "failed": msg[2],
        "workers": [
            {
                "pid": p,
                "connections": conns.get(p),
                "rss_before_mb": round(before[p]["rss"] / 2**20, 2),
                "rss_after_mb": round(after[p]["rss"] / 2**20, 2),
                "uss_delta_mb": round((after[p]["uss"] - before[p]["uss"]) / 2**20, 2),
            }
            for p in pids
        ],
        "rss_per_conn_kb": round(d_rss / max(1, n) / 1024, 2),
        "uss_per_conn_kb": round(d_uss / max(1, n) / 1024, 2),
        "client_rss_per_conn_kb": round(msg[3] / max(1, n) / 1024, 2),
        "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "loadavg": loadavg(),
    }


def _mem(pids: list[int]) -> dict[int, dict[str, int]]:
    out = {}
    for p in pids:
        m = psutil.Process(p).memory_full_info()
        out[p] = {"rss": m.rss, "uss": m.uss}
    return out


def _idle_main(url: str, n: int, pipe: Connection) -> None:
    """Client process of ``idle``: warm up with 20 connections, then hold ``n`` open."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)

    async def main() -> None:
        gate = asyncio.Semaphore(50)

        async def open_one() -> Any:
            async with gate:
                ws = await ws_connect(url, **WS_OPTS)
                await ws.send(HELLO, text=True)
                welcome = orjson.loads(await asyncio.wait_for(ws.recv(decode=False), 20))
                if welcome.get("type") != "welcome":
                    raise RuntimeError(f"no welcome: {welcome}")
                return ws

        warm = await asyncio.gather(*(open_one() for _ in range(20)), return_exceptions=True)
        await asyncio.gather(
            *(w.close() for w in warm if not isinstance(w, BaseException)), return_exceptions=True
        )
        pipe.send(("warm",))
        if not pipe.poll(120):
            return
        pipe.recv()
        rss0 = psutil.Process().memory_info().rss
        conns = await asyncio.gather(*(open_one() for _ in range(n)), return_exceptions=True)
        ok = [c for c in conns if not isinstance(c, BaseException)]
        bad = [repr(c) for c in conns if isinstance(c, BaseException)]
        pipe.send(("open", len(ok), bad[:3], psutil.Process().memory_info().rss - rss0))
        # Wait (the loop keeps running, so server pings would be answered) for "close".
        loop = asyncio.get_running_loop()
        for _ in range(1200):
            if pipe.poll(0):
                break
            await asyncio.sleep(0.1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(20):
                await asyncio.gather(*(c.close() for c in ok), return_exceptions=True)
        del loop
        pipe.send(("closed",))

    try:
        uvloop.run(main())
    except BaseException:
        with contextlib.suppress(Exception):
            pipe.send(("error", traceback.format_exc()))
    finally:
        pipe.close()


# -- store: chatctl figures come with the throughput run; this is chatd's store alone ----


def _store_main(
    path: str, rate: float, sessions: int, duration: float, window: float, pipe: Connection
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    try:
        pipe.send(("result", uvloop.run(_store_bench(path, rate, sessions, duration, window))))
    except BaseException:
        with contextlib.suppress(Exception):
            pipe.send(("error", traceback.format_exc()))
    finally:
        pipe.close()


async def _store_bench(
    path: str, rate: float, sessions: int, duration: float, window: float
) -> dict[str, Any]:
    """chatd's SqliteStore in a uvloop process: open loop at ``rate`` messages/s, then closed.

    ``window`` is the group-commit window (chatd's default is 1 ms; 0 is measured as a
    what-if: batches then form only while the previous commit runs)."""
    store = SqliteStore(path, ttl=86400, window=window)
    await store.open()
    reply = expected_reply(TEXT, TOKENS)
    meta = {"done_reason": "stop", "stats": {"ttft_ms": 1.0, "total_ms": 1.0, "tokens": TOKENS}}
    try:
        ids = await asyncio.gather(*(store.create_session("") for _ in range(sessions)))
        # Open loop: message k of session i intended at start + i/rate + k*sessions/rate.
        start = clock() + 0.2
        user_ms: list[float] = []
        final_ms: list[float] = []
        errors = 0

        async def message(sid: str, k: int, t: float) -> None:
            nonlocal errors
            await asyncio.sleep(max(0.0, t - clock()))
            try:
                await store.append_user(sid, f"m{k}", TEXT, MODEL)
                t1 = clock()
                user_ms.append((t1 - t) * 1000.0)
                await store.append_final(sid, f"m{k}", "reply", reply, meta)
                final_ms.append((clock() - t1) * 1000.0)
            except Exception:
                errors += 1

        tasks = []
        period = sessions / rate
        for i, sid in enumerate(ids):
            t, k = start + i / rate, 0
            while t < start + duration:
                tasks.append(message(sid, k, t))
                t, k = t + period, k + 1
        s0 = store.statistics()
        c0 = rusage_cpu()
        await asyncio.gather(*tasks)
        c1 = rusage_cpu()
        s1 = store.statistics()
        open_loop = {
            "rate": rate,
            "sessions": sessions,
            "duration_s": duration,
            "messages": len(tasks),
            "errors": errors,
            "append_user_ms_from_intended": summary(user_ms),
            "append_final_ms": summary(final_ms),
            "commits": s1.commits - s0.commits,
            "appends_per_commit": round(2 * len(tasks) / max(1, s1.commits - s0.commits), 2),
            "commit_p50_ms": round(s1.commit_p50_ms, 3),
            "commit_p99_ms": round(s1.commit_p99_ms, 3),
            "cpu_us_per_msg": round((c1 - c0) / max(1, len(tasks)) * 1e6, 1),
        }
        # Closed loop: every session appends user+final back to back, as fast as it can.
        stop_at = clock() + 3.0
        done = 0

        async def hammer(sid: str) -> None:
            nonlocal done
            k = 0
            while clock() < stop_at:
                await store.append_user(sid, f"c{k}", TEXT, MODEL)
                await store.append_final(sid, f"c{k}", "reply", reply, meta)
                done += 1
                k += 1

        c0, t0 = rusage_cpu(), clock()
        await asyncio.gather(*(hammer(sid) for sid in ids))
        elapsed = clock() - t0
        closed_loop = {
            "concurrency": sessions,
            "messages_per_s": round(done / elapsed, 1),
            "cpu_us_per_msg": round((rusage_cpu() - c0) / max(1, done) * 1e6, 1),
        }
    finally:
        await store.close()
    return {"window_ms": window * 1000, "open_loop": open_loop, "closed_loop": closed_loop}


def section_store_direct(args: argparse.Namespace) -> dict[str, Any]:
    """The store alone, one process at a time: chatd's 1 ms window, then a 0 window."""
    out: dict[str, Any] = {}
    for name, window in (("default", 0.001), ("window_0", 0.0)):
        tmp = Path(tempfile.mkdtemp(prefix="quick_bench-store-"))
        try:
            job = (str(tmp / "s.db"), args.rate, args.connections, 5.0, window)
            proc, pipe = _start_children(_store_main, [job])[0]
            out[name] = _expect(pipe, "result", 120)[1]
            stop_mp(proc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out[name]["loadavg"] = loadavg()
    return out


# -- real: SmolLM2 through chatd vs direct ----------------------------------------------


def section_real(args: argparse.Namespace) -> dict[str, Any]:
    from chatd.local_model import start_local_model

    log = tempfile.NamedTemporaryFile(prefix="quick_bench-model-", suffix=".log", delete=False)  # noqa: SIM115
    t_start = time.monotonic()
    proc, url = start_local_model(0, stderr=log, timeout=120)
    REAPER.add("local model", lambda: stop_popen(proc))
    model_start_s = time.monotonic() - t_start
    chatd = None
    relay_ttft: list[float] = []
    try:
        chatd = ChatdProc(
            args.workers,
            url,
            api="openai",
            model=REAL_MODEL,
            log_level=args.log_level,
            first_token_timeout=60.0,
        ).start(timeout=60)
        samples = uvloop.run(_real_samples(chatd.url, url, args.real_samples))
        # chatd's own view: its relay logs (at info), per request, the time from sending
        # the request to the first piece of text; the warm-up request comes first.
        pattern = r"relay backend=.* ttft_ms=([0-9.]+)"
        relay_ttft = [float(m) for m in re.findall(pattern, chatd.log_tail(10**7))]
    finally:
        if chatd is not None:
            chatd.stop()
        stop_popen(proc)
        log.close()
        with contextlib.suppress(OSError):
            os.unlink(log.name)
    via = [s for s in samples["chatd"] if s is not None]
    direct = [s for s in samples["direct"] if s is not None]
    out: dict[str, Any] = {
        "model": REAL_MODEL,
        "model_start_s": round(model_start_s, 2),
        "model_threads": os.cpu_count(),
        "text": TEXT,
        "samples": args.real_samples,
        "chatd_ttft_ms": [round(x, 1) for x in via],
        "direct_ttft_ms": [round(x, 1) for x in direct],
        "chatd_ack_ms": [round(x, 2) for x in samples["ack"]],
        "chatd_relay_ttft_ms_incl_warmup": relay_ttft,
        "failures": samples["failures"],
        "loadavg": loadavg(),
    }
    if via and direct:
        out["chatd_ttft_median_ms"] = round(statistics.median(via), 1)
        out["direct_ttft_median_ms"] = round(statistics.median(direct), 1)
        out["added_ms_median"] = round(statistics.median(via) - statistics.median(direct), 1)
        out["ratio_median"] = round(statistics.median(via) / statistics.median(direct), 3)
    return out


async def _real_samples(ws_url: str, model_url: str, n: int) -> dict[str, Any]:
    """One warm-up each, then ``n`` samples each, alternating which path goes first."""
    messages = [{"role": "user", "content": TEXT}]
    out: dict[str, Any] = {"chatd": [], "direct": [], "ack": [], "failures": []}

    async def via_chatd(record: bool) -> None:
        async with asyncio.timeout(120):
            async with ws_connect(ws_url, **WS_OPTS) as ws:
                await ws.send(HELLO, text=True)
                await ws.recv(decode=False)  # welcome: a new session, so no history is sent
                t0 = time.perf_counter()
                frame = orjson.dumps({"type": "message", "id": "m1", "text": TEXT})
                await ws.send(frame, text=True)
                ttft = None
                while True:
                    f = orjson.loads(await ws.recv(decode=False))
                    if f["type"] == "ack" and record:
                        out["ack"].append((time.perf_counter() - t0) * 1000.0)
                    elif f["type"] == "token" and ttft is None:
                        ttft = (time.perf_counter() - t0) * 1000.0
                        # Stop the generation: the next sample must not share the CPU with it.
                        await ws.send(b'{"type":"cancel","id":"m1"}', text=True)
                    elif f["type"] in ("reply", "error"):
                        if f["type"] == "error" or ttft is None:
                            raise RuntimeError(f"no token before {f}")
                        break
        if record:
            out["chatd"].append(ttft)

    async def direct() -> float:
        body = orjson.dumps(
            {
                "model": REAL_MODEL,
                "messages": messages,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        # A new connection per request: llama.cpp closes it after every streamed response.
        conn = aiohttp.TCPConnector(force_close=True)
        async with (
            asyncio.timeout(120),
            aiohttp.ClientSession(connector=conn) as s,
        ):
            t0 = time.perf_counter()
            async with s.post(
                model_url + "/v1/chat/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as resp:
                resp.raise_for_status()
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if not line.startswith(b"data: {"):
                            continue
                        choices = orjson.loads(line[6:]).get("choices") or [{}]
                        if (choices[0].get("delta") or {}).get("content"):
                            return (time.perf_counter() - t0) * 1000.0  # closes: stops it
        raise RuntimeError("the stream ended without content")

    async def one(path: str, record: bool) -> None:
        try:
            if path == "chatd":
                await via_chatd(record)
            else:
                ttft = await direct()
                if record:
                    out["direct"].append(ttft)
        except Exception as exc:
            out["failures"].append(f"{path}: {exc!r}")
        await asyncio.sleep(0.3)  # let the cancelled generation free the model's slot

    await one("chatd", False)
    await one("direct", False)
    for i in range(n):
        order = ("chatd", "direct") if i % 2 == 0 else ("direct", "chatd")
        for path in order:
            await one(path, True)
    return out


# -- profile summary ----------------------------------------------------------------------


def summarize_perf(path: str, pid: int) -> dict[str, Any]:
    """On-CPU shares from ``perf record``: by library (kernel, libpython, uvloop, sqlite...),
    the top C functions, and the system calls (kernel entry points, their callees included)."""

    def report(*extra: str) -> list[tuple[str, float]]:
        try:
            r = subprocess.run(
                ["perf", "report", "-i", path, "--stdio", *extra],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return []
        rows = []
        for line in r.stdout.splitlines():
            m = re.match(r"\s+([0-9.]+)%\s+(?:[0-9.]+%\s+)?(.+?)\s*$", line)
            if m and not line.lstrip().startswith("#"):
                rows.append((re.sub(r"\s+", " ", m.group(2)), float(m.group(1))))
        return rows

    by_dso = report("--no-children", "--sort", "dso", "-g", "none")
    by_sym = report("--no-children", "--sort", "dso,sym", "-g", "none")
    syscalls = [
        (k, v)
        for k, v in report("--children", "--sort", "sym", "-g", "none")
        if "__x64_sys_" in k or "__do_sys_" in k
    ]
    by_thread = report("--no-children", "--sort", "pid", "-g", "none")  # "TID:comm" rows
    per_thread = {}
    for name, _ in by_thread[:3]:
        tid = name.split(":", 1)[0]
        if tid.isdigit():
            per_thread[name] = report("--no-children", "--tid", tid, "--sort", "dso", "-g", "none")[
                :6
            ]
    return {
        "file": path,
        "pid": pid,
        "by_dso": by_dso[:12],
        "by_symbol": by_sym[:25],
        "syscalls_inclusive": syscalls[:15],
        "by_thread": by_thread[:8],
        "by_thread_dso": per_thread,
    }


# Source lines where a thread waits rather than works. py-spy's idle detection misses
# some of them (a blocking SimpleQueue.get, time.sleep in the store's writer thread), so in
# "all" mode samples whose leaf is such a line are dropped. In "gil" mode they cannot appear.
_IDLE_LINE = re.compile(r"\bq\.get\(|\.get\(block=True\)|time\.sleep\(|\.wait\(|select\(")


def summarize_speedscope(path: str, top: int = 15) -> dict[str, Any]:
    """Top costs of a py-spy speedscope file, as shares of the (non-idle) sampled time.

    py-spy writes one sampled profile per thread (weights in seconds); stacks go from the
    root to the leaf. ``self_by_function``: samples whose leaf is that function (where the CPU
    was, C code called from it included: a write() called by transport.write counts for
    the Python function calling it); ``self_by_line``: the same per source line;
    ``inclusive``: samples where the function is anywhere on the stack, counted once.
    A leaf ``Runner.run`` on the main thread is uvloop's own C code (libuv callbacks, socket
    reads) running under ``run_until_complete``.
    """
    import linecache

    doc = json.loads(Path(path).read_text())
    frames = doc["shared"]["frames"]

    def short(file: str) -> str:
        file = file.split("site-packages/")[-1].split(f"{CHATD_SRC.parent}/")[-1]
        return file.split(f"{REPO}/")[-1].split("python3.11/")[-1]

    def func(i: int) -> str:
        f = frames[i]
        return f"{f['name']} ({short(f.get('file') or '?')})"

    def line(i: int) -> str:
        f = frames[i]
        return f"{f['name']} ({short(f.get('file') or '?')}:{f.get('line')})"

    def idle(i: int) -> bool:
        f = frames[i]
        text = linecache.getline(f.get("file") or "", f.get("line") or 0)
        return bool(_IDLE_LINE.search(text))

    self_f: Counter[str] = Counter()
    self_l: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    pkg: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    dropped = 0.0
    for prof in doc["profiles"]:
        thread = str(prof.get("name", "?")).split('"')[1:2] or [str(prof.get("name"))]
        for stack, weight in zip(prof["samples"], prof["weights"], strict=True):
            if not stack:
                continue
            leaf = stack[-1]
            if idle(leaf):
                dropped += weight
                continue
            threads[thread[0]] += weight
            self_f[func(leaf)] += weight
            self_l[line(leaf)] += weight
            file = short(frames[leaf].get("file") or "?")
            pkg[file.split("/")[0] if "/" in file else file] += weight
            for name in {func(i) for i in stack}:
                incl[name] += weight
    total = sum(threads.values()) or 1.0

    def share(c: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in c.most_common(n)]

    return {
        "sampled_s": round(total, 2),
        "idle_dropped_s": round(dropped, 2),
        "threads": share(threads, 10),
        "self_by_function": share(self_f, top),
        "self_by_line": share(self_l, top),
        "inclusive": share(incl, top * 2),
        "by_package": share(pkg, 12),
    }


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _lat(s: dict[str, Any]) -> str:
    if not s.get("count"):
        return "no samples"
    return (
        f"p50 {s['p50']:.2f}  p95 {s['p95']:.2f}  p99 {s['p99']:.2f}  max {s['max']:.1f} ms"
        f"  (n={s['count']})"
    )


def _print_load(title: str, r: dict[str, Any]) -> None:
    cpu = r["cpu"]
    e = r["errors"]
    lag = r["send_lag_ms"]
    print(
        f"\n== {title}: {r['connections']} connections, offered {r['rate']:g} msg/s, "
        f"{r['duration_s']:g} s measured (+{r['warmup_s']:g} s warm-up), "
        f"{r['client_processes']} client processes"
    )
    print(
        f"  achieved      {r['achieved_rps']:.1f} replies/s  (replies {r['replies']}"
        f" of {r['scheduled']} sent)"
    )
    print(f"  send->reply   {_lat(r['reply_ms'])}")
    key = "ack_ms" if "ack_ms" in r else "first_ms"
    label = "send->ack    " if key == "ack_ms" else "send->1st chk"
    print(f"  {label} {_lat(r[key])}")
    print(f"  (from actual send) reply {_lat(r['reply_from_actual_send_ms'])}")
    print(
        f"  errors        {e['total']}  (by code {e['by_code']}, lost {e['lost']}, "
        f"bad reply {e['bad_reply']}, connect failed {e['connect_failed']})"
    )
    print(
        f"  client lag    p50 {lag['p50']} p99 {lag['p99']} ms, max {lag['max']} ms"
        "  (actual send - intended send)"
    )
    per = ", ".join(f"{k} {v:.2f}" for k, v in cpu["per_process_s"].items())
    print(f"  CPU s         {per}")
    print(
        f"  CPU summary   workers {cpu['workers_pct_of_one_core']}% of a core, clients "
        f"{cpu['clients_pct_of_one_core']}% of a core; machine busy "
        f"{cpu['machine_busy_pct']}% of {cpu['cores']} cores (irq+softirq "
        f"{cpu['irq_softirq_s']:.2f} s); other processes {cpu['others_s']:.2f} s "
        f"{cpu['others_top']}, unattributed {cpu['unattributed_s']:.2f} s (short-lived "
        "processes, accounting skew)"
    )
    if "worker_cpu_us_per_msg" in r and r["kind"] == "chatd":
        print(
            f"  per message   worker {r['worker_cpu_us_per_msg']} us CPU, fake "
            f"{r['fake_cpu_us_per_msg']} us, client {r['client_cpu_us_per_msg']} us"
        )
    elif "fake_cpu_us_per_msg" in r:
        print(
            f"  per message   fake {r['fake_cpu_us_per_msg']} us CPU, client "
            f"{r['client_cpu_us_per_msg']} us"
        )
    for pid, threads in cpu.get("worker_threads_s", {}).items():
        per = ", ".join(f"{k} {v:.2f}" for k, v in threads.items() if v >= 0.005)
        print(f"  worker {pid} threads CPU s: {per}")
    print(f"  frames        token {r['frames']['token']}, other {r['frames']['other']}")
    print(f"  loadavg       before {r['loadavg_before']}, after {r['loadavg_after']}")
    for w in r.get("server", {}).get("workers", []):
        s = w["store"]
        lat = w.get("latency_ms") or {}
        print(
            f"  worker {w['pid']}: {w['connections']} conns, {w['messages']} msgs, "
            f"server latency p50 {lat.get('p50')} p99 {lat.get('p99')} ms; store "
            f"{s['commits']} commits ({s['appends_per_commit']} appends/commit), commit p50 "
            f"{s['commit_p50_ms']} p99 {s['commit_p99_ms']} ms, busy retries "
            f"{s['busy_retries']}; rss {w['rss_mb']} MB"
        )
    perf = r.get("perf")
    if perf:
        print(f"  perf (on-CPU) of worker {perf['pid']}: {perf['file']}")
        print(f"   by thread: {perf['by_thread']}")
        for name, rows in perf.get("by_thread_dso", {}).items():
            print(f"   thread {name}: {rows}")
        print(f"   by library: {perf['by_dso']}")
        print("   top C functions (self):")
        for k, v in perf["by_symbol"][:15]:
            print(f"    {v:5.1f}%  {k}")
        print("   system calls (inclusive):")
        for k, v in perf["syscalls_inclusive"][:10]:
            print(f"    {v:5.1f}%  {k}")
    prof = r.get("profile")
    if prof and prof.get("top"):
        top = prof["top"]
        print(
            f"  profile {prof['file']} (mode {prof.get('mode')}: {top['sampled_s']} s of samples"
            f", idle dropped {top['idle_dropped_s']} s; share by thread {top['threads']})"
        )
        print("   self time by function (% of sampled time):")
        for k, v in top["self_by_function"][:12]:
            print(f"    {v:5.1f}%  {k}")
        print("   self time by line:")
        for k, v in top["self_by_line"][:10]:
            print(f"    {v:5.1f}%  {k}")
        print("   inclusive (on the stack):")
        for k, v in top["inclusive"][:20]:
            print(f"    {v:5.1f}%  {k}")
        print("   by package/file of the leaf frame:")
        for k, v in top["by_package"][:8]:
            print(f"    {v:5.1f}%  {k}")


def _print_step(kind: str, s: dict[str, Any]) -> None:
    r = s["reply_ms"]
    print(
        f"  [{kind} find-max] {s['rate']:>6g} msg/s #{s.get('attempt', 1)}: "
        f"{'OK  ' if s['ok'] else 'FAIL'} "
        f"achieved {s['achieved_rps']:.0f}/s, p50 {r.get('p50')} p99 {r.get('p99')} ms, "
        f"errors {s['errors']}, workers {s['workers_pct']}% clients {s['clients_pct']}% "
        f"machine {s['machine_busy_pct']}% others {s.get('others_s')} s "
        f"(+{s.get('unattributed_s')} s unattributed) loadavg {s['loadavg']}",
        flush=True,
    )


def print_report(res: dict[str, Any]) -> None:
    m = res["meta"]
    print("\n================ quick_bench report ================")
    print(f"command: {m['command']}")
    print(
        f"machine: {m['cores']} cores ({m['cpu_model']}), {m['mem_gb']} GB; loadavg at start "
        f"{m['loadavg_start']}; other processes at start used {m['others_busy_pct_start']}% "
        "of the machine (1 s sample)"
    )
    print(
        f"python {m['python']}, websockets {m['websockets']}, aiohttp {m['aiohttp']}, "
        f"uvloop {m['uvloop']}; chatd workers {m['workers']}, log level {m['log_level']}"
        + (f"; WHAT-IF prelude: {m['chatd_prelude']!r}" if m.get("chatd_prelude") else "")
    )
    print("NOTE: client processes, the fake backend and chatd share these cores.")
    start, end = m.get("chatd_sources_start", {}), m.get("chatd_sources_end", {})
    print(
        f"chatd sources: {start}"
        + (f" -> CHANGED DURING THE RUN to {end}" if end and end != start else "")
    )
    if "throughput" in res:
        _print_load("throughput (through chatd)", res["throughput"])
    if "direct" in res:
        _print_load("direct (same load straight to the fake /api/chat)", res["direct"])
    if "overhead" in res:
        o = res["overhead"]
        print("\n== chatd overhead vs direct (same run)")
        for k, v in o.items():
            print(f"  {k:28s} {v}")
    for kind in ("throughput", "direct"):
        fm = res.get("find_max", {}).get(kind)
        if fm:
            print(
                f"\n== find-max {kind}: highest rate OK = {fm['max_rate_ok']} msg/s "
                f"({fm['criterion']})"
            )
            for s in fm["steps"]:
                _print_step(kind, s)
    if "store" in res:
        st = res["store"]
        print("\n== store")
        for w in st.get("under_throughput", []):
            print(f"  under throughput, worker {w['pid']}: {w['store']}")
        for variant in st.get("direct", {}).values():
            ol, cl = variant["open_loop"], variant["closed_loop"]
            print(
                f"  SqliteStore alone (window {variant['window_ms']:g} ms), open loop "
                f"{ol['rate']:g} msg/s over {ol['sessions']} "
                f"sessions ({ol['messages']} messages, errors {ol['errors']}):"
            )
            print(f"    append_user from intended: {_lat(ol['append_user_ms_from_intended'])}")
            print(f"    append_final:              {_lat(ol['append_final_ms'])}")
            print(
                f"    {ol['commits']} commits, {ol['appends_per_commit']} appends/commit, "
                f"commit p50 {ol['commit_p50_ms']} p99 {ol['commit_p99_ms']} ms, "
                f"{ol['cpu_us_per_msg']} us CPU per message (user+final)"
            )
            print(
                f"  SqliteStore alone, closed loop x{cl['concurrency']}: "
                f"{cl['messages_per_s']} messages/s, {cl['cpu_us_per_msg']} us CPU/msg"
            )
    if "idle" in res:
        i = res["idle"]
        print(
            f"\n== idle: {i['opened']}/{i['requested']} connections open after hello "
            f"(failed {i['failed']})"
        )
        print(
            f"  RSS per idle connection {i['rss_per_conn_kb']} KB (USS {i['uss_per_conn_kb']} "
            f"KB), client side {i['client_rss_per_conn_kb']} KB; RLIMIT_NOFILE "
            f"{i['rlimit_nofile']}"
        )
        for w in i["workers"]:
            print(
                f"  worker {w['pid']}: {w['connections']} conns, RSS {w['rss_before_mb']} -> "
                f"{w['rss_after_mb']} MB (USS +{w['uss_delta_mb']} MB)"
            )
    if "real" in res:
        r = res["real"]
        print(
            f"\n== real model {r['model']} (llama.cpp, {r['model_threads']} threads on the "
            f"same cores; started in {r['model_start_s']} s)"
        )
        print(f"  TTFT via chatd  median {r.get('chatd_ttft_median_ms')} ms  {r['chatd_ttft_ms']}")
        print(
            f"  TTFT direct     median {r.get('direct_ttft_median_ms')} ms  {r['direct_ttft_ms']}"
        )
        print(
            f"  added by chatd  {r.get('added_ms_median')} ms (ratio {r.get('ratio_median')}); "
            f"ack {r['chatd_ack_ms']} ms; failures {r['failures']}; loadavg {r['loadavg']}"
        )
        print(
            "  chatd's relay, request sent -> first text (its log, warm-up first): "
            f"{r['chatd_relay_ttft_ms_incl_warmup']} ms"
        )
    print(f"\nfinished in {res['meta']['elapsed_s']} s; loadavg at end {loadavg()}")


def overhead(t: dict[str, Any], d: dict[str, Any]) -> dict[str, Any]:
    """chatd / direct ratios from the same run."""
    out: dict[str, Any] = {}
    for q in ("p50", "p95", "p99"):
        a, b = t["reply_ms"].get(q), d["reply_ms"].get(q)
        if a and b:
            out[f"reply_{q}_ratio"] = round(a / b, 2)
            out[f"reply_{q}_added_ms"] = round(a - b, 3)
    if t.get("worker_cpu_us_per_msg") and d.get("fake_cpu_us_per_msg"):
        out["chatd_worker_cpu_vs_fake_cpu_per_msg"] = round(
            t["worker_cpu_us_per_msg"] / d["fake_cpu_us_per_msg"], 2
        )
    return out


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def raise_nofile() -> tuple[int, int]:
    """Raise our RLIMIT_NOFILE soft limit (children, chatd included, inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(hard, NOFILE_WANTED)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def source_fingerprint() -> dict[str, Any]:
    """A hash of chatd's sources and the newest modification time: other engineers edit the
    tree while benchmarks run, so every result says which code it measured (no git here)."""
    import hashlib

    h = hashlib.sha256()
    newest = 0.0
    for f in sorted(CHATD_SRC.rglob("*.py")):
        h.update(str(f.relative_to(CHATD_SRC)).encode() + b"\0" + f.read_bytes())
        newest = max(newest, f.stat().st_mtime)
    return {
        "path": str(CHATD_SRC),
        "sha256": h.hexdigest()[:16],
        "newest_mtime": time.strftime("%H:%M:%S", time.localtime(newest)),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def meta(args: argparse.Namespace) -> dict[str, Any]:
    busy0, total0, _ = machine_busy_seconds()
    time.sleep(1.0)
    busy1, total1, _ = machine_busy_seconds()
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cores": psutil.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg_start": loadavg(),
        "others_busy_pct_start": round(100 * (busy1 - busy0) / max(1e-9, total1 - total0), 1),
        "python": platform.python_version(),
        "websockets": websockets.__version__,
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop.__version__,
        "workers": args.workers,
        "log_level": args.log_level,
        "chatd_prelude": args.chatd_prelude,
        "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "chatd_sources_start": source_fingerprint(),
        "args": vars(args),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="quick_bench.py",
        description="Measure chatd: throughput, overhead vs direct, idle RSS, store, real TTFT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["throughput", "direct", "idle", "store", "real", "all"],
    )
    p.add_argument("--connections", type=int, default=100, help="load connections (sessions)")
    p.add_argument("--rate", type=float, default=1000.0, help="total offered msg/s")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not measured")
    p.add_argument("--drain", type=float, default=5.0, help="seconds to wait for late replies")
    p.add_argument("--workers", type=int, default=2, help="chatd worker processes")
    p.add_argument("--clients", type=int, default=2, help="client processes")
    p.add_argument("--find-max", action="store_true", help="step the rate up (see docstring)")
    p.add_argument("--step", type=float, default=500.0, help="find-max: first rate and step")
    p.add_argument("--max-rate", type=float, default=10000.0, help="find-max: highest rate")
    p.add_argument("--step-duration", type=float, default=8.0, help="find-max: seconds/step")
    p.add_argument("--find-max-budget", type=float, default=300.0, help="find-max: s per kind")
    p.add_argument("--idle-connections", type=int, default=1000)
    p.add_argument("--real-samples", type=int, default=5)
    p.add_argument("--log-level", default="info", help="chatd [log] level (info = shipped)")
    p.add_argument(
        "--chatd-prelude",
        help="what-if experiments without editing the tree: Python code run in the chatd "
        "master before it starts (workers are forked from it), e.g. "
        "'import chatd.store.sqlite as s; s.SqliteStore.__init__.__kwdefaults__[\"window\"] = 0'",
    )
    p.add_argument("--profile", help="py-spy speedscope output of worker 1 during throughput")
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native")
    p.add_argument("--perf", help="perf record (cpu-clock, 499 Hz) worker 1 into this file")
    p.add_argument(
        "--profile-blocking",
        action="store_true",
        help="let py-spy pause the worker for each sample (its default); without this flag "
        "--nonblocking is used: pausing adds latency and, as seen here, over-counts lines "
        "that make system calls",
    )
    p.add_argument(
        "--profile-mode",
        choices=["gil", "all"],
        default="gil",
        help="gil: py-spy --gil, only samples of the thread holding the GIL (on-CPU Python "
        "and C code); all: every non-idle sample (py-spy's idle detection misses some waits)",
    )
    p.add_argument("--time-limit", type=float, default=1800.0, help="whole script, seconds")
    p.add_argument("--out", help="write every figure as JSON here")
    args = p.parse_args(argv)
    if args.connections < 1 or args.rate <= 0 or args.duration <= 0 or args.workers < 1:
        p.error("--connections, --rate, --duration and --workers must be positive")
    return args


def _on_alarm(signum: int, frame: Any) -> None:
    raise TimeoutError("quick_bench: --time-limit reached")


def _on_term(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nofile = raise_nofile()  # before chatd starts: its workers inherit the limit
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGTERM, _on_term)
    signal.alarm(int(args.time_limit))
    t0 = time.monotonic()
    res: dict[str, Any] = {"meta": meta(args)}
    res["meta"]["rlimit_nofile"] = nofile
    what = args.what
    fake: FakeBackend | None = None
    code = 0
    try:
        if what in ("throughput", "direct", "idle", "store", "all"):
            fake = FakeBackend(TOKENS)
            res["meta"]["fake_url"] = fake.url
        assert fake is not None or what == "real"
        if what in ("throughput", "store", "all"):
            print("-- throughput through chatd ...", flush=True)
            assert fake is not None
            res["throughput"] = section_throughput(args, fake)
            res["store"] = {
                "under_throughput": [
                    {"pid": w["pid"], "store": w["store"]}
                    for w in res["throughput"].get("server", {}).get("workers", [])
                ]
            }
            if what in ("store", "all"):
                print("-- the store alone ...", flush=True)
                res["store"]["direct"] = section_store_direct(args)
        if what in ("direct", "all"):
            print("-- direct to the fake ...", flush=True)
            assert fake is not None
            res["direct"] = section_direct(args, fake)
        if "throughput" in res and "direct" in res:
            res["overhead"] = overhead(res["throughput"], res["direct"])
        if args.find_max and what in ("throughput", "direct", "all"):
            assert fake is not None
            res["find_max"] = {}
            kinds = (
                ["chatd", "direct"]
                if what == "all"
                else ["chatd" if what == "throughput" else "direct"]
            )
            for kind in kinds:
                print(f"-- find-max {kind} ...", flush=True)
                name = "throughput" if kind == "chatd" else "direct"
                res["find_max"][name] = find_max(kind, args, fake)
            fm = res["find_max"]
            if fm.get("throughput", {}).get("max_rate_ok") and fm.get("direct", {}).get(
                "max_rate_ok"
            ):
                res.setdefault("overhead", {})["max_rate_ratio_chatd_vs_direct"] = round(
                    fm["throughput"]["max_rate_ok"] / fm["direct"]["max_rate_ok"], 2
                )
        if what in ("idle", "all"):
            print("-- idle connections ...", flush=True)
            assert fake is not None
            res["idle"] = section_idle(args, fake)
        if what in ("real", "all"):
            print("-- real model ...", flush=True)
            res["real"] = section_real(args)
    except (KeyboardInterrupt, TimeoutError) as exc:
        print(f"quick_bench: interrupted ({exc!r}); reporting what was measured", file=sys.stderr)
        res["interrupted"] = repr(exc)
        code = 2
    except Exception:
        traceback.print_exc()
        res["failed"] = traceback.format_exc()
        code = 1
    finally:
        signal.alarm(0)
        REAPER.run_all()
    res["meta"]["elapsed_s"] = round(time.monotonic() - t0, 1)
    res["meta"]["loadavg_end"] = loadavg()
    res["meta"]["chatd_sources_end"] = source_fingerprint()
    try:
        print_report(res)
    except Exception:  # a partial result must still be written
        traceback.print_exc()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
        print(f"JSON written to {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
