"""The master as a real process: fork, SO_REUSEPORT slots, reaping, signals, chatctl.

The master runs as ``python -m chatd`` with the stand-in worker of ``dummy_worker.py`` (through
the ``CHATD_TEST_WORKER`` hook), which answers plain HTTP ``worker SLOT pid PID``. Real signals,
real sockets on loopback, free ports, and the real ``chatctl`` script.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from chatd.ctl.main import NotRunning, request
from tests.support import free_port, t, wait_for

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TEST_WORKER = "tests.system.dummy_worker:run"


class Daemon:
    """One ``chatd`` master subprocess with its own config, socket and log."""

    def __init__(
        self, workdir: Path, *, workers: int = 2, graceful_timeout: float = 5.0, **server: Any
    ) -> None:
        self.dir = workdir
        self.port = free_port()
        self.socket = str(workdir / "ctl.sock")
        self.log_path = workdir / "chatd.log"
        self.config = workdir / "chatd.toml"
        self.boot_delay_file = workdir / "boot-delay"
        self.boot_fail_file = workdir / "boot-fail"
        self.env: dict[str, str] = {}
        self.write_config(workers=workers, graceful_timeout=graceful_timeout, **server)
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(
        self, *, control_mode: str = "0660", level: str = "debug", **server: Any
    ) -> None:
        """(Re)write the config file: ``[server]`` keys (bind is ours unless given), mode, level."""
        server = {"bind": f"127.0.0.1:{self.port}", "workers": 2, **server}
        lines = ["[server]"] + [f"{k} = {json.dumps(v)}" for k, v in server.items()]
        lines += ["[control]", f'socket = "{self.socket}"', f'mode = "{control_mode}"']
        lines += ["[log]", f'level = "{level}"']
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, wait: bool = True) -> Daemon:
        env = {
            **os.environ,
            "CHATD_TEST_WORKER": TEST_WORKER,
            "PYTHONPATH": str(ROOT),
            "DUMMY_BOOT_DELAY_FILE": str(self.boot_delay_file),
            "DUMMY_BOOT_FAIL_FILE": str(self.boot_fail_file),
            **self.env,
        }
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chatd", "--config", str(self.config)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            wait_for(self.ready_status, 10, f"2 ready workers; log:\n{self.log()}")
        return self

    def status(self) -> dict[str, Any] | None:
        try:
            reply = request(self.socket, {"t": "status"}, timeout=t(5))
        except (NotRunning, OSError):
            return None
        assert reply["ok"] is True, reply
        data: dict[str, Any] = reply["data"]
        return data

    def ready_status(self) -> dict[str, Any] | None:
        st = self.status()
        running = st is not None and st["master"]["state"] == "running"
        if running and st and all(w["state"] == "ready" for w in st["workers"]):
            return st
        return None

    def workers(self) -> list[dict[str, Any]]:
        st = self.status()
        assert st is not None
        workers: list[dict[str, Any]] = st["workers"]
        return workers

    def pids(self) -> list[int]:
        st = self.status()
        assert st is not None
        return [w["pid"] for w in st["workers"]]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(t(timeout))

    def kill_group(self) -> None:
        """Cleanup: SIGKILL the process group this test started (master and workers)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def daemon(workdir: Path, daemons: list[Daemon]) -> Daemon:
    d = Daemon(workdir)
    daemons.append(d)
    return d.start()


def http_get(port: int, timeout: float = 5) -> str:
    """One HTTP/1.1 request on a new connection; returns the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=t(timeout)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        return read_response(s)


def read_response(s: socket.socket) -> str:
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), head
    return body


def open_requests(port: int, count: int) -> list[socket.socket]:
    """``count`` connections, each with its request already sent (queued if nobody accepts)."""
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=t(10))
        s.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        socks.append(s)
    return socks


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # Still there: a zombie waiting for its new parent counts as gone.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1].startswith("Z")
    return False


def chatctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "chatctl"), *args], capture_output=True, text=True, timeout=t(30)
    )


# -- start ---------------------------------------------------------------------------------------


def test_two_ready_workers(daemon: Daemon) -> None:
    """`chatctl status --json`: two ready workers with distinct pids, children of the master."""
    r = chatctl("--socket", daemon.socket, "status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert daemon.proc is not None
    assert st["master"]["pid"] == daemon.proc.pid
    assert st["master"]["bind"] == f"127.0.0.1:{daemon.port}"
    assert st["master"]["generation"] == 1
    workers = st["workers"]
    assert [w["id"] for w in workers] == [1, 2]
    assert [w["state"] for w in workers] == ["ready", "ready"]
    assert len({w["pid"] for w in workers}) == 2
    for w in workers:
        with open(f"/proc/{w['pid']}/stat") as f:
            assert int(f.read().split(") ")[1].split()[1]) == daemon.proc.pid  # ppid
        assert w["restarts"] == 0 and w["generation"] == 1
        for key in ("uptime_s", "connections", "messages_total", "errors_total", "rss_bytes"):
            assert key in w
    assert st["queue"] == {"depth": 0, "max": 512}
    assert st["totals"]["worker_restarts_total"] == 0
    assert [b["url"] for b in st["backends"]] == ["http://127.0.0.1:11434"]


def test_status_table_and_titles(daemon: Daemon) -> None:
    """Plain `chatctl status` prints a row per worker; processes carry chatd's titles."""
    wait_for(lambda: all(w["last_heartbeat_s"] is not None for w in daemon.workers()), 5, "stats")
    r = chatctl("--socket", daemon.socket, "status")
    assert r.returncode == 0, r.stderr
    for pid in daemon.pids():
        assert str(pid) in r.stdout
    assert "RESTARTS" in r.stdout
    assert daemon.proc is not None
    with open(f"/proc/{daemon.proc.pid}/cmdline", "rb") as f:
        assert f.read().startswith(f"chatd: master [{daemon.config}]".encode())
    with open(f"/proc/{daemon.pids()[1]}/cmdline", "rb") as f:
        assert f.read().startswith(b"chatd: worker 2 gen 1")


def test_connections_reach_both_workers(daemon: Daemon) -> None:
    """SO_REUSEPORT spreads new connections over both slots' sockets."""
    bodies = [http_get(daemon.port) for _ in range(64)]
    slots = {body.split()[1] for body in bodies}
    assert slots == {"1", "2"}, bodies
    pids = {int(body.split()[3]) for body in bodies}
    assert pids == set(daemon.pids())


# -- replacing workers ---------------------------------------------------------------------------


def test_killed_worker_is_replaced_and_its_queue_is_served(daemon: Daemon) -> None:
    """SIGKILL a worker: a new pid takes its slot, restarts=1, and connections that queued on
    the slot while no worker served it are served by the replacement, none reset."""
    old = daemon.pids()[0]
    daemon.boot_delay_file.write_text("0.5")  # the replacement waits before it serves
    os.kill(old, signal.SIGKILL)
    time.sleep(0.05)  # the old worker is dead, the new one not serving yet
    socks = open_requests(daemon.port, 24)
    bodies = [read_response(s) for s in socks]
    for s in socks:
        s.close()
    st = wait_for(daemon.ready_status, 5, "the replacement ready")
    new = st["workers"][0]
    assert new["pid"] != old and new["id"] == 1
    assert new["restarts"] == 1 and st["workers"][1]["restarts"] == 0
    assert st["totals"]["worker_restarts_total"] == 1
    assert any(f"worker 1 pid {new['pid']}" in b for b in bodies), bodies
    assert f"worker 1 (pid {old}) killed by signal 9 (SIGKILL)" in daemon.log()


def test_worker_exit_code_is_logged(daemon: Daemon) -> None:
    """A worker that exits by itself is replaced, and its exit code is logged."""
    old = daemon.pids()[1]
    os.kill(old, signal.SIGINT)  # the dummy worker exits 0 on SIGINT
    wait_for(lambda: daemon.ready_status() and daemon.pids()[1] != old, 5, "a new worker 2")
    assert f"worker 2 (pid {old}) exited with code 0" in daemon.log()


def test_crash_loop_backs_off_and_recovers(daemon: Daemon) -> None:
    """Workers that exit before `ready` again and again make the slot crash-looping (chatctl
    exit 1, retries backed off); once they boot again the slot is ready (exit 0)."""
    old = daemon.pids()[0]
    daemon.boot_fail_file.write_text("")
    os.kill(old, signal.SIGKILL)
    st = wait_for(
        lambda: (s := daemon.status()) and s["workers"][0]["state"] == "crash-looping" and s,
        5,
        "slot 1 crash-looping",
    )
    assert st["workers"][1]["state"] == "ready"
    assert chatctl("--socket", daemon.socket, "status").returncode == 1
    assert "before it was ready, 3 times in a row; next try in 0.5s" in daemon.log()
    daemon.boot_fail_file.unlink()
    st = wait_for(daemon.ready_status, 5, "slot 1 ready again")
    assert st["workers"][0]["restarts"] == 4  # the killed worker and three failed boots
    assert chatctl("--socket", daemon.socket, "status").returncode == 0


# -- stopping ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_stop_signals(daemon: Daemon, sig: signal.Signals) -> None:
    """SIGTERM (drain), SIGINT and SIGQUIT (fast): the master exits 0, no worker is left, the
    control socket file is gone."""
    pids = daemon.pids()
    assert daemon.proc is not None
    daemon.proc.send_signal(sig)
    assert daemon.wait(10) == 0, daemon.log()
    wait_for(lambda: all(gone(p) for p in pids), 5, "no worker left")
    assert not os.path.exists(daemon.socket)
    expected = "graceful stop" if sig == signal.SIGTERM else "fast stop"
    assert expected in daemon.log()


def test_graceful_timeout_kills_stuck_workers(workdir: Path, daemons: list[Daemon]) -> None:
    """Workers that ignore the drain are SIGKILLed when graceful_timeout has passed."""
    d = Daemon(workdir, graceful_timeout=1.0)
    d.env["DUMMY_IGNORE_DRAIN"] = "1"
    daemons.append(d)
    d.start()
    pids = d.pids()
    assert d.proc is not None
    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait(10) == 0
    assert time.monotonic() - started >= 1.0
    assert all(gone(p) for p in pids)
    assert "killing" in d.log() and "killed by signal 9" in d.log()


def test_workers_exit_when_the_master_dies(daemon: Daemon) -> None:
    """SIGKILL the master: its workers see EOF on their link and exit by themselves."""
    pids = daemon.pids()
    assert daemon.proc is not None
    daemon.proc.kill()
    daemon.proc.wait()
    wait_for(lambda: all(gone(p) for p in pids), 5, "the workers to exit")


# -- refusing to start ---------------------------------------------------------------------------


@pytest.mark.parametrize("reuseport", [False, True], ids=["plain", "reuseport"])
def test_taken_port(workdir: Path, daemons: list[Daemon], reuseport: bool) -> None:
    """A port that another socket listens on (with SO_REUSEPORT too) fails the start at once:
    exit 1, a clear message, and no control socket left behind."""
    d = Daemon(workdir)
    daemons.append(d)
    with socket.socket() as taken:
        if reuseport:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", d.port))
        taken.listen()
        started = time.monotonic()
        d.start(wait=False)
        assert d.wait(10) == 1
        elapsed = time.monotonic() - started
    log = d.log()
    assert f"cannot listen on 127.0.0.1:{d.port}: the port is already in use" in log, log
    assert f"held by pid {os.getpid()}" in log  # the holder is named
    assert "started" not in log  # no worker was forked
    assert not os.path.exists(d.socket)
    assert elapsed < t(5)


def test_second_master_on_the_same_control_socket(daemon: Daemon, daemons: list[Daemon]) -> None:
    """A second master with the same control socket refuses to start and leaves the first alone."""
    other_dir = Path(tempfile.mkdtemp(prefix="chatd-"))
    try:
        second = Daemon(other_dir)
        second.config.write_text(
            daemon.config.read_text().replace(str(daemon.port), str(second.port))
        )
        daemons.append(second)
        second.start(wait=False)
        assert second.wait(10) == 1
        assert "another chatd master is running" in second.log()
        assert daemon.ready_status() is not None
    finally:
        shutil.rmtree(other_dir, ignore_errors=True)


def test_stale_control_socket_is_replaced(workdir: Path, daemons: list[Daemon]) -> None:
    """A socket file left by a dead master is removed and the master starts."""
    d = Daemon(workdir)
    daemons.append(d)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(d.socket)
    stale.close()  # the file stays, nobody listens
    d.start()
    assert "removing the stale control socket" in d.log()


# -- chatctl and the control socket --------------------------------------------------------------


def test_chatctl_when_nothing_runs(workdir: Path) -> None:
    """chatctl status exits 3 with a message when there is no socket, or nobody on it."""
    missing = chatctl("--socket", str(workdir / "none.sock"), "status")
    assert missing.returncode == 3
    assert "not running" in missing.stderr
    path = str(workdir / "dead.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)
    refused = chatctl("--socket", path, "status", "--json")
    assert refused.returncode == 3
    assert refused.stdout == ""
    env_run = subprocess.run(
        [str(BIN / "chatctl"), "status"],
        capture_output=True,
        text=True,
        timeout=t(30),
        env={**os.environ, "CHATD_CONTROL_SOCKET": path},
    )
    assert env_run.returncode == 3 and path in env_run.stderr


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\x00\x00\x03\xc1\xc1\xc1", b"\xff\xff\xff\xff", b"\x00\x00\x00\x01\x07"],
    ids=["undecodable", "oversized", "not-a-map"],
)
def test_garbage_closes_only_that_connection(daemon: Daemon, garbage: bytes) -> None:
    """Garbage on one control connection closes it; another connection and the master are fine."""
    from chatd.proto.control import Decoder, encode

    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as good,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad,
    ):
        good.settimeout(t(5))
        bad.settimeout(t(5))
        good.connect(daemon.socket)
        bad.connect(daemon.socket)
        bad.sendall(garbage)
        assert bad.recv(100) == b""  # closed by the master
        good.sendall(encode({"t": "nonsense", "id": 1}) + encode({"t": "status", "id": 2}))
        decoder, replies = Decoder(), list[dict[str, Any]]()
        while len(replies) < 2:
            replies += decoder.feed(good.recv(65536))
    assert replies[0] == {
        "t": "nonsense",
        "id": 1,
        "ok": False,
        "error": "unknown command 'nonsense' (expected one of: reload, scale, status, stop)",
    }
    assert replies[1]["ok"] is True and replies[1]["id"] == 2
    assert daemon.ready_status() is not None
    assert "closing this connection" in daemon.log()


# -- layering ------------------------------------------------------------------------------------


def test_master_modules_import_no_event_loop() -> None:
    """Importing every module of chatd.master brings in neither asyncio nor uvloop."""
    code = (
        "import importlib, pkgutil, sys, chatd.master as m\n"
        "names = [i.name for i in pkgutil.iter_modules(m.__path__, 'chatd.master.')]\n"
        "assert 'chatd.master.arbiter' in names, names\n"
        "for name in names: importlib.import_module(name)\n"
        "print(sorted({'asyncio', 'uvloop'} & set(sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


# -- measurement (printed, not asserted) ---------------------------------------------------------


@pytest.mark.slow
def test_replacement_latency(daemon: Daemon) -> None:
    """Time from SIGKILL of a worker to its replacement serving a connection queued on its slot.

    Each round: SIGSTOP worker 1 so connections queue on its socket; open 16 requests (worker 2
    answers about half); SIGKILL worker 1; time until the first queued request is answered.
    Prints the median of 20 rounds.
    """
    samples = []
    for _ in range(20):
        target = daemon.pids()[0]
        os.kill(target, signal.SIGSTOP)
        socks = open_requests(daemon.port, 16)
        time.sleep(0.05)  # let worker 2 answer its share
        waiting = [s for s in socks if not select.select([s], [], [], 0)[0]]
        assert waiting, "no connection hashed to the stopped worker's socket"
        begin = time.perf_counter()
        os.kill(target, signal.SIGKILL)
        readable, _, _ = select.select(waiting, [], [], t(5))
        samples.append(time.perf_counter() - begin)
        assert readable
        for s in socks:
            assert read_response(s).startswith("worker ")
            s.close()
        wait_for(daemon.ready_status, 5, "the replacement ready")
    median_ms = statistics.median(samples) * 1000
    print(
        f"\nSIGKILL -> replacement served a queued connection: median {median_ms:.1f} ms, "
        f"min {min(samples) * 1000:.1f} ms, max {max(samples) * 1000:.1f} ms (20 kills)"
    )
