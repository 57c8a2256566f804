"""chatd under a real systemd 252: the shipped unit, installed by the shipped installer.

``sdharness.sh`` boots systemd as PID 1 of private pid + mount + cgroup namespaces on an overlay
over the host's ``/`` (every write goes to a tmpfs; the host keeps nothing). Inside it,
``scripts/install.sh --wheelhouse`` installs chatd (user, venv, links, config, unit), the fake
Ollama runs as a transient unit, and every check goes through what a sysadmin uses:
``systemctl``, ``journalctl``, ``chatctl``, files, and a WebSocket client on the shared network.

A test drop-in shortens ``WatchdogSec`` (3 s) and ``TimeoutStartSec``, and turns a system call
the filter forbids into a kill (``SystemCallErrorNumber=kill``), so that a hardening option the
daemon does not survive cannot hide behind an EPERM.

Needs root and namespaces; skipped with the reason otherwise. The tests share one booted
systemd and run in file order; each starts the unit again if an earlier one left it stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from chatd.dev.fake_ollama.main import expected_reply
from tests.support import Client, fake_config, free_port, http_get, system_python, t, wait_for

pytestmark = [pytest.mark.system, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).with_name("sdharness.sh")
UNIT = "chatd.service"
WORKERS = 2
TOKENS = 8  # chatd-fake-ollama's default
DROP_IN = """\
# tests/system/test_systemd.py: a quick watchdog, fail fast, and kill on a forbidden syscall.
[Unit]
StartLimitBurst=100
[Service]
WatchdogSec=3
TimeoutStartSec=30
SystemCallErrorNumber=kill
"""
TIMINGS: dict[str, float] = {}


class Box:
    """The booted systemd: run commands inside it, read and write its files."""

    def __init__(self, state: Path, sd_pid: int, port: int, fake_port: int) -> None:
        self.state, self.sd_pid, self.port, self.fake_port = state, sd_pid, port, fake_port
        self.installed: subprocess.CompletedProcess[str] | None = None  # install.sh's run
        self.verified: subprocess.CompletedProcess[str] | None = None  # systemd-analyze's

    def run(
        self, *cmd: str, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(HARNESS), "run", str(self.state), *cmd],
            capture_output=True,
            text=True,
            timeout=t(timeout),
            input=input,
        )

    def ok(self, *cmd: str, timeout: float = 30) -> str:
        r = self.run(*cmd, timeout=timeout)
        assert r.returncode == 0, f"{' '.join(cmd)}: exit {r.returncode}\n{r.stdout}{r.stderr}"
        return r.stdout

    def path(self, inside: str) -> Path:
        """A path of the container's filesystem, as the host reaches it."""
        return Path(f"/proc/{self.sd_pid}/root{inside}")

    def prop(self, name: str, unit: str = UNIT) -> str:
        return self.ok("systemctl", "show", "-P", name, unit).strip()

    def props(self, *names: str) -> dict[str, str]:
        out = self.ok("systemctl", "show", *(f"-p{n}" for n in names), UNIT)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, since: float | None = None, unit: str = UNIT) -> str:
        """``journalctl -u chatd -o cat`` (the messages only), optionally since a host time."""
        cmd = ["journalctl", "-u", unit, "-o", "cat", "--no-pager"]
        if since is not None:
            cmd += ["--since", f"@{since:.6f}"]
        return self.ok(*cmd)

    def wait_journal(self, text: str, since: float, timeout: float = 10) -> str:
        def found() -> str | None:
            journal = self.journal(since)
            return journal if text in journal else None

        return wait_for(  # type: ignore[no-any-return]
            found,
            timeout,
            f"{text!r} in journalctl -u chatd",
            interval=0.1,
        )

    def status(self) -> tuple[int, dict[str, Any] | None]:
        """``chatctl status --json`` run inside as root: (exit code, document or None).

        The socket is named: without it chatctl reads /etc/chatd/chatd.toml to find it, and
        exits 78 while that file is broken (some tests break it on purpose)."""
        r = self.run("chatctl", "--socket", "/run/chatd/control.sock", "status", "--json")
        return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else None)

    def all_ready(self) -> dict[str, Any] | None:
        code, doc = self.status()
        workers = doc["workers"] if code == 0 and doc else []
        ready = len(workers) == WORKERS and all(w["state"] == "ready" for w in workers)
        return doc if ready else None

    def write_config(self, *, level: str = "info", fmt: str = "text", extra: str = "") -> None:
        """/etc/chatd/chatd.toml (root:chatd 0640, as installed: written in place)."""
        self.path("/etc/chatd/chatd.toml").write_text(
            f"""# written by tests/system/test_systemd.py
[server]
bind = "127.0.0.1:{self.port}"
workers = {WORKERS}
graceful_timeout = 5.0
worker_timeout = 10.0

[llm]
model = "qwen2.5-coder:7b"

[[llm.backends]]
url = "http://127.0.0.1:{self.fake_port}"
max_parallel = 4

[log]
level = "{level}"
format = "{fmt}"
{extra}"""
        )

    def ensure_active(self) -> None:
        """The unit running with the good config (after an earlier test stopped or broke it)."""
        if self.prop("ActiveState") != "active" or not self.all_ready():
            self.write_config()
            self.run("systemctl", "reset-failed", UNIT)
            self.ok("systemctl", "restart", UNIT, timeout=60)
        wait_for(self.all_ready, 20, "every worker ready", interval=0.1)


def _answers(url: str) -> bool:
    try:
        return http_get(url, 1)[0] == 200
    except OSError:
        return False


def _nofile(limits: str) -> tuple[int, int]:
    """(soft, hard) "Max open files" of a /proc/PID/limits text."""
    row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    soft, hard = row.split()[3:5]
    return int(soft), int(hard)


def _timed(name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.monotonic()
    try:
        return fn()
    finally:
        TIMINGS[name] = round(time.monotonic() - t0, 2)


@pytest.fixture(scope="module")
def box(wheelhouse: Path) -> Iterator[Box]:
    r = subprocess.run([str(HARNESS), "check"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(
            f"NOT TESTED: chatd under a real systemd: {r.stderr.strip()} "
            "(run `make test` as root on a VM or a privileged runner)"
        )
    python = system_python()
    if python is None:
        pytest.skip(
            f"NOT TESTED: chatd under a real systemd: no Python "
            f"{sys.version_info[0]}.{sys.version_info[1]} outside /root and /home for the "
            f"user chatd (this venv's is {sys.base_prefix}, which ProtectHome=yes hides)"
        )
    state = Path(tempfile.mkdtemp(prefix="sdh.", dir="/tmp"))
    fake_port, port = free_port(), free_port()
    binds = sorted({str(REPO), sys.prefix, os.path.realpath(sys.base_prefix), str(wheelhouse)})
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            [str(HARNESS), "boot", str(state), *(a for b in binds for a in ("--bind", b))],
            capture_output=True,
            text=True,
            timeout=t(90),
        )
        assert r.returncode == 0, f"sdharness.sh boot failed:\n{r.stdout}{r.stderr}"
        b = Box(state, int(r.stdout.split()[-1]), port, fake_port)
        TIMINGS["boot"] = round(time.monotonic() - t0, 2)
        b.installed = _timed(
            "install",
            lambda: b.run(
                f"{REPO}/scripts/install.sh", "--wheelhouse", str(wheelhouse), "--python", python
            ),
        )
        b.verified = b.run("systemd-analyze", "verify", f"/etc/systemd/system/{UNIT}")
        # The backend: the installed fake Ollama, as a transient unit of that systemd.
        b.ok(
            "systemd-run", "--unit=fake-ollama", "--property=DynamicUser=yes",
            "/usr/local/bin/chatd-fake-ollama", "--port", str(fake_port),
        )  # fmt: skip
        wait_for(
            lambda: _answers(f"http://127.0.0.1:{fake_port}/"),
            15,
            "the fake Ollama answering",
            interval=0.1,
        )
        drop_in = b.path(f"/etc/systemd/system/{UNIT}.d/test.conf")
        drop_in.parent.mkdir(parents=True, exist_ok=True)
        drop_in.write_text(DROP_IN)
        b.write_config()
        b.ok("systemctl", "daemon-reload")
        yield b
    finally:
        subprocess.run([str(HARNESS), "down", str(state)], capture_output=True, timeout=60)
        shutil.rmtree(state, ignore_errors=True)
        print(f"\nchatd under systemd: timings (s): {TIMINGS}", file=sys.__stderr__)


# -- install -------------------------------------------------------------------------------------


def test_installer_lays_down_a_unit_that_verifies_clean(box: Box) -> None:
    """install.sh (real root of the container): user, venv, links, config, unit, daemon-reload;
    `systemd-analyze verify` of the installed unit prints nothing (ExecStart paths resolve)."""
    install = box.installed
    assert install is not None
    assert install.returncode == 0, install.stdout + install.stderr
    for line in (
        "created    user chatd",
        "installed  /opt/chatd",
        "linked     /usr/local/bin/chatctl -> /opt/chatd/bin/chatctl",
        "installed  /etc/systemd/system/chatd.service",
        "done       systemctl daemon-reload",
    ):
        assert line in install.stdout, install.stdout
    verify = box.verified
    assert verify is not None
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stderr
    assert box.ok("id", "-un", "chatd").strip() == "chatd"
    assert "/usr/sbin/nologin" in box.ok("getent", "passwd", "chatd")
    assert box.ok("stat", "-c", "%U:%G %a", "/var/lib/chatd").strip() == "chatd:chatd 750"
    assert box.ok("stat", "-c", "%U:%G %a", "/etc/chatd/chatd.toml").strip() == "root:chatd 640"


# -- start, status, hardening --------------------------------------------------------------------


def test_start_returns_once_every_worker_is_ready(box: Box) -> None:
    """`systemctl start chatd` blocks until READY=1; right after it, chatctl status shows every
    worker ready (exit 0), and `systemctl status` shows active (running) and the STATUS= line."""
    r = _timed("start", lambda: box.run("systemctl", "start", UNIT, timeout=60))
    assert r.returncode == 0, r.stderr + box.journal()
    code, doc = box.status()
    assert code == 0 and doc is not None, doc
    assert [w["state"] for w in doc["workers"]] == ["ready"] * WORKERS
    assert doc["master"]["systemd"] is True and doc["master"]["generation"] == 1
    status = box.run("systemctl", "status", UNIT, "--no-pager").stdout
    assert "Active: active (running)" in status, status
    assert f'Status: "{WORKERS}/{WORKERS} workers ready, ' in status, status
    assert "generation 1" in status


def test_the_daemon_runs_under_the_hardening(box: Box) -> None:
    """Master and workers: user chatd, no capability at all, no_new_privs, a seccomp filter,
    the unit's LimitNOFILE (as far as the host lets systemd raise it); the filesystem is
    read-only but for /var/lib/chatd and /run/chatd, /root is empty, /tmp is private;
    `systemd-analyze security` rates the unit OK (its exposure goes to the timings line)."""
    box.ensure_active()
    main = box.prop("MainPID")
    doc = box.all_ready()
    assert doc is not None
    uid = box.ok("id", "-u", "chatd").strip()
    for pid in [main, *(str(w["pid"]) for w in doc["workers"])]:
        st = dict(line.split(":", 1) for line in box.ok("cat", f"/proc/{pid}/status").splitlines())
        assert st["Uid"].split()[0] == uid, (pid, st["Uid"])
        assert st["CapEff"].strip() == st["CapBnd"].strip() == "0000000000000000"
        assert st["NoNewPrivs"].strip() == "1" and st["Seccomp"].strip() == "2"
    assert box.prop("LimitNOFILE") == "1048576"
    # Without CAP_SYS_RESOURCE (some sandboxes) systemd clamps to its own hard limit.
    pid1 = dict(line.split(":", 1) for line in box.ok("cat", "/proc/1/status").splitlines())
    can_raise = int(pid1["CapBnd"], 16) & (1 << 24)  # CAP_SYS_RESOURCE
    pid1_hard = _nofile(box.ok("cat", "/proc/1/limits"))[1]
    assert _nofile(box.ok("cat", f"/proc/{main}/limits")) == (
        (1048576, 1048576) if can_raise else (min(1048576, pid1_hard),) * 2
    )
    # The filesystem as the daemon sees it (its mount namespace): read-only but for its
    # state and runtime directories, an empty /root, a private /tmp.
    ns = ("nsenter", "-t", main, "-m")
    assert "Read-only file system" in box.run(*ns, "touch", "/etc/chatd/x").stderr
    assert "Read-only file system" in box.run(*ns, "touch", "/opt/chatd/x").stderr
    box.ok(
        *ns,
        "sh",
        "-c",
        "touch /var/lib/chatd/x /run/chatd/x /tmp/x && rm /var/lib/chatd/x /run/chatd/x",
    )
    assert box.run("test", "-e", "/tmp/x").returncode != 0  # its /tmp is not the system's
    assert box.ok(*ns, "ls", "-A", "/root").strip() == ""
    security = box.run("systemd-analyze", "security", UNIT, "--no-pager").stdout
    verdict = security.strip().splitlines()[-1]
    assert "Overall exposure level for chatd.service" in verdict and verdict.endswith(
        ("OK :-)", "SAFE :-)")
    ), verdict
    TIMINGS["exposure"] = float(verdict.split(":")[1].split()[0])


# -- chat and the journal -----------------------------------------------------------------------


def test_chat_through_the_unit_logs_connections_and_relays(box: Box) -> None:
    """A WebSocket client chats with the daemon; the journal of the unit has one line for the
    connection opened and one for the connection closed; a successful relay is a DEBUG line,
    not in the journal at the shipped level (info): one per message would flood it."""
    box.ensure_active()
    since = time.time()
    c = Client(f"ws://127.0.0.1:{box.port}/ws")
    try:
        session = c.hello()["session"]
        frames = c.ask("m1", "hello from systemd")
        assert frames[-1]["type"] == "reply", frames
        assert frames[-1]["text"] == expected_reply("hello from systemd", TOKENS)
    finally:
        c.close()
    journal = box.wait_journal("connection closed from 127.0.0.1 session", since)
    assert "connection open from 127.0.0.1" in journal
    assert "relay backend=" not in journal, journal
    assert f"session {session[:12]}" in journal


# -- reload --------------------------------------------------------------------------------------


def test_reload_applies_a_new_config_and_a_broken_one_changes_nothing(box: Box) -> None:
    """`systemctl reload chatd` runs chatctl reload synchronously:
    1. a valid file (JSON lines, level warning): exit 0, same MainPID, generation + 1, the new
       workers log JSON and drop their INFO lines (no "connection open" any more);
    2. a broken file: the reload job fails, the journal names every problem, the daemon keeps
       serving with the same MainPID and generation, and `systemctl status` says so."""
    box.ensure_active()
    main = box.prop("MainPID")
    doc = box.all_ready()
    assert doc is not None
    gen = doc["master"]["generation"]
    box.write_config(level="warning", fmt="json")
    since = time.time()
    r = _timed("reload", lambda: box.run("systemctl", "reload", UNIT, timeout=60))
    assert r.returncode == 0, r.stderr + box.journal()
    doc = box.all_ready()  # synchronous: ready at once, no polling
    assert doc is not None and doc["master"]["generation"] == gen + 1, doc
    assert {w["generation"] for w in doc["workers"]} == {gen + 1}
    assert box.prop("MainPID") == main and box.prop("ActiveState") == "active"
    box.wait_journal("Reloaded chatd.service", since)
    since = time.time()
    c = Client(f"ws://127.0.0.1:{box.port}/ws")
    c.hello()
    c.close()
    time.sleep(0.5)  # what the workers would log about it has reached journald by now

    box.write_config(level="warning", fmt="json", extra="bogus = 1\n")
    r = _timed("reload_broken", lambda: box.run("systemctl", "reload", UNIT, timeout=60))
    assert r.returncode != 0 and "failed" in r.stderr, r
    journal = box.wait_journal("Reload failed for chatd.service", since)
    assert "chatctl: reload refused, nothing was changed" in journal, journal
    assert "log.bogus: unknown key" in journal, journal
    assert "connection open" not in journal, journal  # level warning applied to new workers
    refused = [json.loads(x) for x in journal.splitlines() if x.startswith("{")]
    assert any(d["level"] == "ERROR" and "reload refused" in d["msg"] for d in refused), journal
    assert box.prop("MainPID") == main and box.prop("ActiveState") == "active"
    doc = box.all_ready()
    assert doc is not None and doc["master"]["generation"] == gen + 1
    assert http_get(f"http://127.0.0.1:{box.port}/metrics")[0] == 200
    status = box.run("systemctl", "status", UNIT, "--no-pager").stdout
    assert "last reload failed" in status, status

    box.write_config()  # back to text lines at level info
    assert box.run("systemctl", "reload", UNIT, timeout=60).returncode == 0


def test_control_socket_is_for_root_chatd_and_its_group(box: Box) -> None:
    """/run/chatd is chatd:chatd 0750 and the socket 0660: a member of group chatd may use
    chatctl; anybody else gets permission denied (exit 4)."""
    box.ensure_active()
    assert box.ok("stat", "-c", "%U:%G %a", "/run/chatd").strip() == "chatd:chatd 750"
    assert box.ok("stat", "-c", "%U:%G %a", "/run/chatd/control.sock").strip() == "chatd:chatd 660"
    box.run("useradd", "--groups", "chatd", "--no-create-home", "opsadmin")
    sock = "--socket=/run/chatd/control.sock"
    member = box.run("runuser", "-u", "opsadmin", "--", "chatctl", sock, "status")
    assert member.returncode == 0 and "workers ready" in member.stdout, member
    other = box.run("runuser", "-u", "nobody", "--", "chatctl", sock, "status")
    assert other.returncode == 4 and "Permission denied" in other.stderr, other


# -- crashes -------------------------------------------------------------------------------------


def test_sigkill_of_a_worker_replaces_it_and_the_unit_stays_up(box: Box) -> None:
    box.ensure_active()
    main, restarts = box.prop("MainPID"), box.prop("NRestarts")
    doc = box.all_ready()
    assert doc is not None
    victim = doc["workers"][0]["pid"]
    since = time.time()
    box.ok("kill", "-KILL", str(victim))
    doc = wait_for(
        lambda: (d := box.all_ready()) and d["workers"][0]["pid"] != victim and d,
        10,
        "a new worker on slot 1",
        interval=0.1,
    )
    assert doc["workers"][0]["restarts"] >= 1
    assert box.props("MainPID", "NRestarts", "ActiveState") == {
        "MainPID": main,
        "NRestarts": restarts,
        "ActiveState": "active",
    }
    box.wait_journal(f"worker 1 (pid {victim}) killed by signal 9 (SIGKILL); replacing it", since)


def test_sigkill_of_the_master_restarts_the_unit_and_sessions_survive(box: Box) -> None:
    """Restart=on-failure brings the master back (NRestarts + 1, a new MainPID, every worker
    ready); a session made before resumes with its history, read from /var/lib/chatd."""
    box.ensure_active()
    c = Client(f"ws://127.0.0.1:{box.port}/ws")
    try:
        session = c.hello()["session"]
        assert c.ask("k1", "remember me")[-1]["type"] == "reply"
    finally:
        c.close()
    main, restarts = box.prop("MainPID"), int(box.prop("NRestarts"))
    since = time.time()
    box.ok("kill", "-KILL", main)
    _timed(
        "master_sigkill_to_ready",
        lambda: wait_for(
            lambda: box.prop("NRestarts") == str(restarts + 1) and box.all_ready(),
            20,
            "the unit restarted with every worker ready",
            interval=0.1,
        ),
    )
    assert box.prop("MainPID") != main and box.prop("ActiveState") == "active"
    journal = box.wait_journal("Main process exited, code=killed, status=9/KILL", since)
    assert "Scheduled restart job" in journal, journal
    c = Client(f"ws://127.0.0.1:{box.port}/ws")
    try:
        welcome = c.hello(session, last_seq=0)
        assert welcome["resumed"] is True and welcome["last_seq"] == 2, welcome
        replay = [c.recv(), c.recv()]
        assert [f["type"] for f in replay] == ["ack", "reply"]
        assert replay[1]["text"] == expected_reply("remember me", TOKENS)
    finally:
        c.close()
    # The rows are in the file, and the documented online backup (as the user chatd) has them.
    rows = box.ok(
        "runuser", "-u", "chatd", "--", "/opt/chatd/bin/python3", "-c",
        "import sqlite3, sys; print(sqlite3.connect('/var/lib/chatd/sessions.db').execute("
        "'SELECT count(*) FROM events WHERE session = ?', (sys.argv[1],)).fetchone()[0])",
        session,
    )  # fmt: skip
    assert rows.strip() == "2"
    if box.run("sh", "-c", "command -v sqlite3").returncode == 0:
        box.ok(
            "runuser", "-u", "chatd", "--", "sqlite3", "/var/lib/chatd/sessions.db",
            ".backup /var/lib/chatd/backup.db",
        )  # fmt: skip
        count = box.ok(
            "sqlite3", "/var/lib/chatd/backup.db",
            f"SELECT count(*) FROM events WHERE session = '{session}'",
        )  # fmt: skip
        assert count.strip() == "2"


def test_the_watchdog_restarts_a_stopped_master(box: Box) -> None:
    """SIGSTOP the master: no WATCHDOG=1 for WatchdogSec (3 s in the test drop-in), so systemd
    logs a watchdog timeout, aborts it and restarts the unit."""
    box.ensure_active()
    main, restarts = box.prop("MainPID"), int(box.prop("NRestarts"))
    since = time.time()
    box.ok("kill", "-STOP", main)
    _timed(
        "watchdog_to_restart",
        lambda: wait_for(
            lambda: box.prop("NRestarts") == str(restarts + 1),
            15,
            "a watchdog restart",
            interval=0.1,
        ),
    )
    journal = box.wait_journal("Watchdog timeout", since)
    assert "Failed with result 'watchdog'" in journal, journal
    wait_for(box.all_ready, 20, "every worker ready after the restart", interval=0.1)
    assert box.prop("MainPID") != main


# -- stop ----------------------------------------------------------------------------------------


def test_stop_drains_and_exits_clean(box: Box) -> None:
    """`systemctl stop chatd` with a reply streaming (KillMode=mixed: only the master gets
    SIGTERM, and it drains its workers): the reply completes, then the client gets close 1001;
    the master exits 0 (result success, "Deactivated successfully"), the unit is inactive,
    /run/chatd is gone."""
    box.ensure_active()
    fake = f"http://127.0.0.1:{box.fake_port}"
    fake_config(fake, token_ms=150)  # 8 tokens: a reply of about 1.2 s
    since = time.time()
    c = Client(f"ws://127.0.0.1:{box.port}/ws")
    try:
        c.hello()
        c.send({"type": "message", "id": "s1", "text": "stop while I talk"})
        c.until(lambda f: f["type"] == "token")
        r = _timed("stop_during_a_reply", lambda: box.run("systemctl", "stop", UNIT, timeout=60))
        assert r.returncode == 0, r.stderr
        frames = c.until(lambda f: f["type"] in ("reply", "error") and "seq" in f)
        assert frames[-1]["type"] == "reply", frames
        assert frames[-1]["text"] == expected_reply("stop while I talk", TOKENS)
        with contextlib.suppress(Exception):
            while True:
                c.recv(5)
        assert c.ws.close_code == 1001, c.ws.close_code
    finally:
        c.close()
        fake_config(fake, token_ms=0)
    assert box.props("ActiveState", "Result", "ExecMainStatus") == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainStatus": "0",
    }
    assert box.run("test", "-e", "/run/chatd").returncode != 0
    journal = box.wait_journal("Stopped chatd.service", since)
    assert "master stopped" in journal and "Deactivated successfully" in journal, journal
    assert "Main process exited" not in journal, journal  # it exited 0: nothing to report
