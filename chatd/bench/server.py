"""What ``chatd-bench`` measures: its own fake Ollama and chatd, or a running chatd.

Own (the default): ``chatd-fake-ollama`` (zero delay, 8 tokens per reply) and a chatd master
on 127.0.0.1 port 0, in a temporary directory, with the shipped defaults except what a load
test needs (per-connection rate limit and queue raised, so the load is not refused by
policy). Everything started is stopped by its PID (SIGTERM, then SIGKILL).

Running (``--url ws://…/ws --control-socket PATH``): nothing is started; server-side figures
come from ``chatctl --socket PATH status --json``; the fake-only knobs (latency spike,
backend hang) need ``--fake-url`` naming the fake Ollama behind that chatd.

Server-side figures: :func:`server_figures` reads RSS and CPU of the master and every worker.
The workers' ``rss_bytes`` and ``cpu_percent`` are what ``chatctl status --json`` reports; the
master's pid comes from the same document, its RSS and everyone's cumulative CPU seconds
from psutil (``status`` has no CPU seconds), so CPU over a window is a difference of two
readings.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from chatd.dev.local_model.launch import stop_process

BIN = Path(sys.executable).parent  # the venv's bin: chatd, chatctl, chatd-fake-ollama
MODEL = "qwen2.5-coder:7b"  # the fake's default model name
TOKENS = 8
NOFILE_WANTED = 65536


def raise_nofile() -> int:
    """Raise our RLIMIT_NOFILE soft limit (chatd, started after, inherits it); the new one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(hard, NOFILE_WANTED)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def post_json(url: str, body: dict[str, Any], timeout: float = 5.0) -> Any:
    """POST a JSON body, return the decoded JSON answer."""
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def kill_leftovers(started: Mapping[int, float]) -> None:
    """SIGKILL each pid of ``started`` (pid -> psutil create_time) still alive as the same
    process (not a reused pid): workers that outlived a master or parent we stopped."""
    for pid, created in started.items():
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.create_time() == created:
                p.send_signal(signal.SIGKILL)


class FakeBackend:
    """``chatd-fake-ollama --port 0`` as a subprocess; ``url`` is read from its first line."""

    def __init__(self, tokens: int = TOKENS) -> None:
        self.proc = subprocess.Popen(
            [
                str(BIN / "chatd-fake-ollama"),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--tokens",
                str(tokens),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            self.url = self._read_url(15.0)
        except BaseException:
            stop_process(self.proc)
            raise

    def _read_url(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        prefix = b"chatd-fake-ollama listening on "
        buf = b""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise RuntimeError("the fake Ollama did not start in time")
                chunk = os.read(fd, 4096)
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

    def stop(self) -> None:
        stop_process(self.proc)


def fake_config(fake_url: str, **knobs: Any) -> Any:
    """Set the fake's run-time knobs (``POST /_fake/config``: ``extra_latency_ms``, ``hang``,
    ``status``, ``first_token_ms``, ``token_ms``, ``tokens``, ``reset_stats`` …)."""
    return post_json(f"{fake_url.rstrip('/')}/_fake/config", knobs)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


class Target:
    """A chatd to load: ``url`` (``ws://…/ws``), its control socket, and maybe its fake."""

    def __init__(self, url: str, control_socket: str, fake_url: str | None = None) -> None:
        self.url = url
        self.control_socket = control_socket
        self.fake_url = fake_url
        self.fake_pid: int | None = None

    def status(self) -> dict[str, Any] | None:
        """``chatctl --socket SOCK status --json`` (a subprocess), or None if it fails."""
        try:
            r = subprocess.run(
                [str(BIN / "chatctl"), "--socket", self.control_socket, "status", "--json"],
                capture_output=True,
                timeout=10,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None
        if r.returncode not in (0, 1) or not r.stdout:
            return None
        try:
            doc: dict[str, Any] = json.loads(r.stdout)
        except ValueError:
            return None
        return doc

    def worker_pids(self) -> list[int]:
        """The pids of the workers serving a slot (empty when status does not answer)."""
        st = self.status() or {}
        return sorted(int(w["pid"]) for w in st.get("workers", []) if w.get("pid"))

    def stop(self) -> None:
        """Nothing to stop for a running chatd."""


class OwnChatd(Target):
    """A fake Ollama (or a given backend) and a chatd master with ``workers`` workers,
    started for the run."""

    def __init__(
        self,
        workers: int = 2,
        first_token_timeout: float = 5.0,
        *,
        backend_url: str | None = None,
        api: str = "ollama",
        model: str = MODEL,
        max_parallel: int = 256,
        max_queue: int = 100000,
        extra: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Start chatd (and the fake, unless ``backend_url`` names a backend to use instead,
        spoken to with ``api``; then ``fake_url`` and ``fake_pid`` are None). ``max_parallel``
        is that backend's slots, ``max_queue`` the daemon's queue for them; ``extra`` adds or
        overrides config keys per section (``{"sessions": {"history_turns": 0}}``)."""
        raise_nofile()  # before chatd starts: its workers inherit the limit
        self.fake = FakeBackend() if backend_url is None else None
        self.backend = (backend_url or "", api, model, max_parallel, max_queue)
        self.extra = extra or {}
        self.tmp = Path(tempfile.mkdtemp(prefix="chatd-bench-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids_seen: dict[int, float] = {}
        fake_url = self.fake.url if self.fake is not None else None
        super().__init__("", str(self.tmp / "control.sock"), fake_url)
        self.fake_pid = self.fake.pid if self.fake is not None else None
        try:
            self._start(workers, first_token_timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, workers: int, first_token_timeout: float, timeout: float = 30.0) -> None:
        url, api, model, max_parallel, max_queue = self.backend
        url = self.fake.url if self.fake is not None else url
        sections: dict[str, dict[str, Any]] = {
            "server": {"bind": "127.0.0.1:0", "workers": workers, "graceful_timeout": 3.0},
            "control": {"socket": self.control_socket},
            "llm": {
                "model": model,
                "max_queue": max_queue,
                "first_token_timeout": first_token_timeout,
            },
            "sessions": {"store": f"sqlite://{self.tmp / 'sessions.db'}"},
            # Not refused by policy: no rate limit, and room for ``idle --conns 10000`` on one
            # worker (the default max_connections is 10,000 per worker).
            "limits": {"messages_per_minute": 1_000_000_000, "max_connections": 1_000_000},
            "log": {"level": "warning"},
        }
        for name, values in self.extra.items():
            sections[name] = {**sections.get(name, {}), **values}
        lines: list[str] = []
        for name, values in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
            lines.append("")
        lines += ["[[llm.backends]]", f"url = {_toml_value(url)}", f"api = {_toml_value(api)}"]
        lines += [f"max_parallel = {max_parallel}", ""]
        config = self.tmp / "chatd.toml"
        config.write_text("\n".join(lines))
        self.log_path = self.tmp / "chatd.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "chatd"), "--config", str(config)],
                cwd=self.tmp,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in our terminal reaches us, not chatd
            )
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st and st["workers"] and all(w["state"] == "ready" for w in st["workers"]):
                port = int(st["master"]["bind"].rsplit(":", 1)[1])
                self.url = f"ws://127.0.0.1:{port}/ws"
                if self._ready(port):
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"chatd exited at start; log: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"chatd did not become ready; log: {self.log_tail()}")
            time.sleep(0.1)

    @staticmethod
    def _ready(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def status(self) -> dict[str, Any] | None:
        st = super().status()
        writer = (st or {}).get("master", {}).get("store_writer") or {}
        # Remember every worker (and the store writer), for stop().
        for w in [*(st or {}).get("workers", []), writer]:
            pid = w.get("pid")
            if pid and pid not in self.pids_seen:
                with contextlib.suppress(psutil.Error):
                    self.pids_seen[pid] = psutil.Process(pid).create_time()
        return st

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except (OSError, AttributeError):
            return ""

    def stop(self) -> None:
        """SIGTERM the master (it drains its workers), SIGKILL by PID after 15 s; workers
        that outlived it are killed by PID when their start time still matches."""
        if self.proc is not None:
            stop_process(self.proc, 15.0)
            kill_leftovers(self.pids_seen)
            self.proc = None
        if self.fake is not None:
            self.fake.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def chatd_pids(status: dict[str, Any]) -> dict[str, int]:
    """``{"master": pid, "worker 1": pid, …, "store writer/PID": pid}`` from a status
    document (workers serving a slot and those draining or starting, and the SQLite store's
    writer process, which does the workers' writes: its CPU counts with theirs)."""
    out: dict[str, int] = {}
    mpid = status.get("master", {}).get("pid")
    if mpid:
        out["master"] = int(mpid)
    wpid = (status.get("master", {}).get("store_writer") or {}).get("pid")
    if wpid:
        out[f"store writer/{wpid}"] = int(wpid)
    for w in [*status.get("workers", []), *status.get("other_workers", [])]:
        if w.get("pid"):
            out[f"worker {w.get('id', '?')}/{w['pid']}"] = int(w["pid"])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all threads); 0 when it is gone."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process in bytes; 0 when it is gone."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def server_figures(status: dict[str, Any] | None) -> dict[str, Any]:
    """RSS (MB) and CPU (% of one core, as chatd reports it) of the master and each worker,
    and the totals, from one ``chatctl status --json`` document. The master's RSS is read
    with psutil (the status document reports workers' RSS, not its own)."""
    if not status:
        return {"available": False}
    procs: dict[str, dict[str, float]] = {}
    master_pid = status.get("master", {}).get("pid")
    if master_pid:
        procs["master"] = {"pid": master_pid, "rss_mb": rss_bytes(int(master_pid)) / 2**20}
    for w in [*status.get("workers", []), *status.get("other_workers", [])]:
        procs[f"worker {w.get('id', '?')}"] = {
            "pid": w.get("pid") or 0,
            "rss_mb": (w.get("rss_bytes") or 0) / 2**20,
            "cpu_percent": float(w.get("cpu_percent") or 0.0),
        }
    totals = status.get("totals", {})
    return {
        "available": True,
        "processes": {k: {kk: round(vv, 2) for kk, vv in v.items()} for k, v in procs.items()},
        "rss_mb_total": round(sum(p["rss_mb"] for p in procs.values()), 2),
        "worker_restarts_total": totals.get("worker_restarts_total", 0),
        "errors_by_code": totals.get("errors_by_code", {}),
        "queue": status.get("queue", {}),
        "server_latency_ms": totals.get("latency_ms"),
        # The session store's write lock, as the workers saw it: batches that found it held
        # (and were tried again) and their slowest commits.
        "store": {
            "busy_retries": sum(
                int((w.get("store") or {}).get("busy_retries") or 0)
                for w in status.get("workers", [])
            ),
            "lock_waits": sum(
                int((w.get("store") or {}).get("lock_waits") or 0)
                for w in status.get("workers", [])
            ),
            "commit_p99_ms": max(
                (
                    float((w.get("store") or {}).get("commit_p99_ms") or 0.0)
                    for w in status.get("workers", [])
                ),
                default=0.0,
            ),
        },
    }
