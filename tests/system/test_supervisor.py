"""The supervisor's operations with the stand-in worker: heartbeat, reload, scale, RSS
recycling, systemd notifications, chatctl stop, and who may use the control socket.

Real ``chatd`` masters as subprocesses (``tests.system.test_master.Daemon``), real signals,
the real ``chatctl``, free ports on loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from chatd.master.listeners import listening_sockets
from chatd.proto.control import Decoder, encode
from tests.support import t, wait_for
from tests.system.test_master import Daemon, chatctl, gone, http_get

pytestmark = pytest.mark.system


def start(workdir: Path, daemons: list[Daemon], **server: Any) -> Daemon:
    d = Daemon(workdir, **server)
    daemons.append(d)
    return d.start()


def ctl(d: Daemon, *args: str) -> Any:
    return chatctl("--socket", d.socket, *args)


# -- heartbeat -----------------------------------------------------------------------------------


def test_stopped_worker_is_killed_and_replaced(workdir: Path, daemons: list[Daemon]) -> None:
    """SIGSTOP a worker: no heartbeat for worker_timeout, so the master logs WORKER TIMEOUT,
    kills it and a new pid serves its slot (restarts + 1)."""
    d = start(workdir, daemons, worker_timeout=2.0)
    old, other = d.pids()
    os.kill(old, signal.SIGSTOP)
    st = wait_for(
        lambda: (s := d.ready_status()) and s["workers"][0]["pid"] != old and s, 10, "a new pid"
    )
    assert st["workers"][0]["restarts"] == 1 and st["workers"][1]["pid"] == other
    wait_for(lambda: gone(old), 10, "the stopped worker killed")
    assert f"WORKER TIMEOUT (pid {old})" in d.log()


# -- reload --------------------------------------------------------------------------------------


def test_reload_replaces_every_worker_and_applies_the_new_config(
    workdir: Path, daemons: list[Daemon]
) -> None:
    """chatctl reload: exit 0 with the new generation, new pids (titled with it), the old
    workers drained away; `workers` and the log level of the new file apply (the master's own
    info lines stop at level warning)."""
    d = start(workdir, daemons)
    old = d.pids()
    d.write_config(workers=3)
    r = ctl(d, "reload")
    assert r.returncode == 0 and "generation 2" in r.stdout, r.stdout + r.stderr
    st = d.status()
    assert st is not None and st["master"]["generation"] == 2
    assert [w["generation"] for w in st["workers"]] == [2, 2, 2]
    assert not set(d.pids()) & set(old)
    with open(f"/proc/{d.pids()[2]}/cmdline", "rb") as f:
        assert f.read().startswith(b"chatd: worker 3 gen 2")
    wait_for(lambda: all(gone(p) for p in old), 10, "the old generation gone")
    d.write_config(workers=1, level="warning")
    r = ctl(d, "reload")
    assert r.returncode == 0 and "generation 3" in r.stdout, r.stderr
    assert len(d.pids()) == 1
    assert "reloaded: generation 2" in d.log() and "reloaded: generation 3" not in d.log()


def test_reload_with_a_broken_config_changes_nothing(workdir: Path, daemons: list[Daemon]) -> None:
    """An invalid file: exit 1 with every problem printed; same workers, same generation. A
    new bind: refused too (a restart is needed). A store the worker could not create: too."""
    d = start(workdir, daemons)
    pids = d.pids()
    good = d.config.read_text()
    d.config.write_text(good.replace("workers = 2", 'workers = "two"') + "bogus = 1\n")
    r = ctl(d, "reload")
    assert r.returncode == 1
    assert "server.workers: expected an integer" in r.stderr and "log.bogus" in r.stderr
    d.write_config(bind="127.0.0.1:1")
    r = ctl(d, "reload")
    assert r.returncode == 1 and "needs a restart" in r.stderr, r.stderr
    d.config.write_text(good + f'[sessions]\nstore = "sqlite://{d.config}/x/sessions.db"\n')
    r = ctl(d, "reload")
    assert r.returncode == 1 and f"{d.config} is not a directory" in r.stderr, r.stderr
    st = d.ready_status()
    assert st is not None and st["master"]["generation"] == 1 and d.pids() == pids


def test_reload_keeps_the_old_workers_when_the_canary_fails(
    workdir: Path, daemons: list[Daemon]
) -> None:
    """The new worker exits before it is ready, or is not ready in time: exit 1 with a
    sentence, the old workers keep serving, generation unchanged; a later reload works."""
    d = start(workdir, daemons)
    pids = d.pids()
    d.boot_fail_file.write_text("")
    r = ctl(d, "reload")
    assert r.returncode == 1
    assert "new worker of slot 1 (generation 2) exited with code 3 before it was ready" in r.stderr
    assert "generation 1 keeps serving" in r.stderr
    d.boot_fail_file.unlink()
    d.boot_delay_file.write_text("30")
    d.write_config(worker_timeout=1.0)
    r = ctl(d, "reload")
    assert r.returncode == 1 and "slot 1 (generation 2)" in r.stderr, r.stderr
    st = d.ready_status()
    assert st is not None and st["master"]["generation"] == 1 and d.pids() == pids
    assert http_get(d.port).startswith("worker ")
    d.boot_delay_file.unlink()
    assert ctl(d, "reload").returncode == 0


# -- scale ---------------------------------------------------------------------------------------


def test_scale_up_and_down(workdir: Path, daemons: list[Daemon]) -> None:
    """chatctl scale 3: three ready workers, the new slot's socket gets connections; scale 1:
    the highest slots drain away and their sockets close; SIGTTIN and SIGTTOU add and remove
    one."""
    d = start(workdir, daemons)
    r = ctl(d, "scale", "3")
    assert r.returncode == 0 and "3 workers ready" in r.stdout, r.stderr
    assert [w["id"] for w in d.workers()] == [1, 2, 3]
    slots = {http_get(d.port).split()[1] for _ in range(60)}
    assert "3" in slots, slots
    r = ctl(d, "scale", "1")
    assert r.returncode == 0 and "1 workers ready" in r.stdout, r.stderr
    wait_for(lambda: len(listening_sockets("127.0.0.1", d.port)) == 1, 10, "two sockets closed")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTTIN)
    wait_for(lambda: (s := d.ready_status()) and len(s["workers"]) == 2, 10, "2 workers")
    d.proc.send_signal(signal.SIGTTOU)
    wait_for(lambda: (s := d.ready_status()) and len(s["workers"]) == 1, 10, "1 worker")
    assert ctl(d, "scale", "0").returncode == 1


# -- RSS recycling -------------------------------------------------------------------------------


def test_worker_over_the_rss_limit_is_recycled(workdir: Path, daemons: list[Daemon]) -> None:
    """max_worker_rss_mb = 1 (every worker is over it): after three samples each worker is
    replaced by a new one of the same generation, the old one draining; once, not in a loop."""
    d = start(workdir, daemons, max_worker_rss_mb=1)
    old = d.pids()
    st = wait_for(
        lambda: (s := d.ready_status()) and not {w["pid"] for w in s["workers"]} & set(old) and s,
        15,
        "both workers recycled",
    )
    assert st["master"]["generation"] == 1 and st["totals"]["worker_restarts_total"] == 0
    log = d.log()
    assert log.count("over max_worker_rss_mb 1 for 3 samples in a row; recycling it") == 2
    wait_for(lambda: all(gone(p) for p in old), 10, "the old workers drained away")


# -- systemd -------------------------------------------------------------------------------------


def test_sd_notify_sequence(workdir: Path, daemons: list[Daemon]) -> None:
    """Against a real datagram socket: READY=1 once the workers are ready, WATCHDOG=1 pings,
    RELOADING=1 with MONOTONIC_USEC in the same datagram on SIGHUP then READY=1, and
    STOPPING=1 on SIGTERM."""
    path = str(workdir / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sd:
        sd.bind(path)
        sd.settimeout(t(10))
        got: list[str] = []

        def until(prefix: str) -> str:
            while True:
                msg = sd.recv(4096).decode()
                got.append(msg)
                if msg.startswith(prefix):
                    return msg

        d = Daemon(workdir)
        d.env.update(NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
        daemons.append(d)
        d.start(wait=False)
        ready = until("READY=1")
        assert "STATUS=2/2 workers ready" in ready, got
        until("WATCHDOG=1")
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        reloading = until("RELOADING=1")
        usec = int(reloading.split("MONOTONIC_USEC=")[1].split("\n")[0])
        assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < t(5)
        assert "reloaded: generation 2" in until("READY=1")
        d.proc.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        assert d.wait(10) == 0
    assert not any(m.startswith("READY=1") for m in got[: got.index(ready)])


# -- chatctl stop and exit codes -----------------------------------------------------------------


def test_chatctl_stop_waits_for_the_master(workdir: Path, daemons: list[Daemon]) -> None:
    """chatctl stop: exit 0 once the master has exited; afterwards status exits 3, stop 0 and
    reload 7 (LSB: not running)."""
    d = start(workdir, daemons)
    pids = d.pids()
    r = ctl(d, "stop")
    assert r.returncode == 0 and "chatd stopped" in r.stdout, r.stderr
    assert d.proc is not None and d.proc.poll() is not None  # exited, not just asked
    assert d.proc.returncode == 0 and all(gone(p) for p in pids)
    assert [ctl(d, cmd).returncode for cmd in ("status", "stop", "reload")] == [3, 0, 7]


# -- control socket ------------------------------------------------------------------------------


def _ask_as(path: str, uid: int, gid: int, groups: list[int]) -> dict[str, Any]:
    """Send `status` on the control socket from a forked child running as uid/gid/groups."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only syscalls, then _exit
        try:
            os.close(read_end)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(path)
                # A refused peer is closed at once: the send may meet EPIPE, and the refusal
                # frame is still there to read.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(encode({"t": "status"}))
                decoder, replies = Decoder(), []
                while not replies:
                    replies = decoder.feed(s.recv(65536))
            os.write(write_end, json.dumps(replies[0]).encode()[:60000])
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)  # type: ignore[no-any-return]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_control_socket_checks_the_peer(workdir: Path, daemons: list[Daemon]) -> None:
    """A socket made world-writable still only obeys root, the daemon's uid and its group:
    another user gets 'permission denied' (logged); the same user in the group is served."""
    workdir.chmod(0o755)
    d = Daemon(workdir)
    d.write_config(control_mode="0666")
    daemons.append(d)
    d.start()
    group = os.stat(d.socket).st_gid
    denied = _ask_as(d.socket, 65534, 65534, [])
    assert denied["ok"] is False and denied["error"].startswith("permission denied"), denied
    assert "control socket: refused pid" in d.log()
    allowed = _ask_as(d.socket, 65534, 65534, [group])
    assert allowed["ok"] is True and allowed["data"]["master"]["pid"] == d.proc.pid  # type: ignore[union-attr]
