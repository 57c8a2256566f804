"""The control socket under abuse, with a real master (the stand-in worker of
``tests/system/dummy_worker.py``): floods of connections, idle and refused peers, and the
exit codes chatctl gives for a caller without the right.

The master must survive all of it, keep its workers and keep answering ``chatctl status``
once the abuse ends, and write a bounded number of log lines about it.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from chatd.ctl.main import main as chatctl_main
from chatd.proto.control import Decoder, encode
from tests.support import BIN, t
from tests.system.test_master import Daemon, chatctl

pytestmark = pytest.mark.system

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def start(workdir: Path, daemons: list[Daemon], control_mode: str = "0660", **kw: Any) -> Daemon:
    d = Daemon(workdir, **kw)
    d.write_config(control_mode=control_mode, **kw)
    daemons.append(d)
    return d.start()


def read_until_closed(socks: list[socket.socket], timeout: float) -> list[bytes]:
    """What each socket received until the master closed it (EOF, or a reset after data)."""
    got = {s: b"" for s in socks}
    with selectors.DefaultSelector() as sel:
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        open_count = len(socks)
        end = time.monotonic() + t(timeout)
        while open_count:
            left = end - time.monotonic()
            assert left > 0, f"{open_count} of {len(socks)} connections still open"
            for key, _ in sel.select(left):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                got[s] += data
                if not data:
                    sel.unregister(s)
                    open_count -= 1
    return [got[s] for s in socks]


def frames(data: bytes) -> list[dict[str, Any]]:
    return Decoder().feed(data)


def control_lines(d: Daemon, since: int) -> list[str]:
    return [line for line in d.log().splitlines()[since:] if "control" in line]


# -- floods ----------------------------------------------------------------------------------


def test_a_flood_of_connections_leaves_the_master_serving(
    workdir: Path, daemons: list[Daemon]
) -> None:
    """Hundreds of idle connections against a master short of descriptors (its RLIMIT_NOFILE
    lowered to a few dozen above what it uses, so the flood stays small): the ones beyond
    what it can hold are told "too many control connections" and closed at once, the others
    are closed once idle; the master keeps its workers, answers chatctl status afterwards,
    and logs a few lines about it, not one per connection."""
    d = start(workdir, daemons)
    assert d.proc is not None
    pids = d.pids()
    master = d.proc.pid
    limit = len(os.listdir(f"/proc/{master}/fd")) + 48
    subprocess.run(["prlimit", f"--pid={master}", f"--nofile={limit}:{limit}"], check=True)
    since = len(d.log().splitlines())
    socks: list[socket.socket] = []
    try:
        for _ in range(400):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(d.socket)
            except BlockingIOError:  # the listen backlog is full: never reached the master
                s.close()
                continue
            socks.append(s)
        received = read_until_closed(socks, 60)
    finally:
        for s in socks:
            s.close()
    assert d.proc.poll() is None, d.log()[-3000:]
    turned_away = [frames(r) for r in received if r]
    assert turned_away, (len(socks), "none turned away")
    for answer in turned_away:
        assert len(answer) == 1 and answer[0]["ok"] is False, answer
        assert answer[0]["error"].startswith("too many control connections"), answer
    r = chatctl("--socket", d.socket, "status")
    assert r.returncode == 0, r
    assert d.pids() == pids
    lines = control_lines(d, since)
    assert 1 <= len(lines) <= 3, lines


@needs_root
def test_refused_peers_are_closed_at_once(workdir: Path, daemons: list[Daemon]) -> None:
    """A socket made world-writable by mistake: every connection of a user who may not use
    it gets its one "permission denied" frame and is closed at once (it holds nothing in the
    master), however many it opens; the refusals are logged once, not per connection."""
    workdir.chmod(0o755)
    d = start(workdir, daemons, control_mode="0666")
    since = len(d.log().splitlines())
    results = _as_nobody(_refused_connections, d.socket, 60)
    assert results == [["permission denied", "closed"]] * 60, results
    assert d.ready_status() is not None
    refusals = [line for line in control_lines(d, since) if "refused" in line]
    assert len(refusals) == 1 and f"(uid {NOBODY})" in refusals[0], refusals


def _refused_connections(path: str, count: int) -> list[list[str]]:
    out = []
    for _ in range(count):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(t(10))
            s.connect(path)
            decoder, data, seen = Decoder(), b"", []
            while chunk := s.recv(65536):
                data += chunk
            for msg in decoder.feed(data):
                seen.append(str(msg.get("error", ""))[:17])
            out.append([*seen, "closed"])
    return out


def _as_nobody(func: Any, *args: Any) -> Any:
    """Run ``func(*args)`` in a forked child as uid/gid nobody; return its JSON result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result: Any = func(*args)
        except BaseException as exc:
            result = f"{type(exc).__name__}: {exc}"
        try:
            os.write(write_end, json.dumps(result).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


# -- idle connections ------------------------------------------------------------------------


def test_idle_connections_time_out_but_a_long_reload_does_not(
    workdir: Path, daemons: list[Daemon]
) -> None:
    """A connection that never sends a whole request (nothing, or half a frame) is closed
    after a few seconds; a ``chatctl reload`` that waits longer than that for its answer is
    not idle and gets it."""
    d = start(workdir, daemons, workers=1)
    d.boot_delay_file.write_text("7")  # the new worker takes longer than the idle timeout
    reload = subprocess.Popen(
        [str(BIN / "chatctl"), "--socket", d.socket, "reload"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        partial = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.connect(d.socket)
        partial.connect(d.socket)
        partial.sendall(encode({"t": "status"})[:-1])  # the last byte never comes
        assert read_until_closed([idle, partial], 30) == [b"", b""]
        idle.close()
        partial.close()
        out, err = reload.communicate(timeout=t(60))
    finally:
        with contextlib.suppress(ProcessLookupError):
            reload.kill()
    assert reload.returncode == 0, (out, err)
    assert "generation 2" in out
    st = d.ready_status()
    assert st is not None and st["master"]["generation"] == 2


# -- chatctl without the right ---------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("mode", ["0660", "0666"], ids=["socket-file-mode", "peer-check"])
def test_permission_denied_is_exit_4_for_every_command(
    workdir: Path, daemons: list[Daemon], mode: str
) -> None:
    """A user who may not use the control socket gets exit 4 and "permission denied" from
    every command, whether the socket file's mode stops them (0660) or the master's peer
    check does (0666); the daemon is left as it was."""
    workdir.chmod(0o755)
    d = start(workdir, daemons, control_mode=mode)
    pids = d.pids()
    for command in (["status"], ["reload"], ["stop"], ["scale", "3"]):
        code, err = _chatctl_as_nobody("--socket", d.socket, *command)
        assert code == 4, (command, code, err)
        assert "ermission denied" in err, (command, err)
    st = d.ready_status()
    assert st is not None and st["master"]["generation"] == 1 and d.pids() == pids


def _chatctl_as_nobody(*args: str) -> tuple[int, str]:
    """chatctl's main (the console script's) in a forked child as nobody: (exit code, stderr).
    Forked rather than executed: this venv's interpreter may live where nobody cannot read."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 99
        try:
            os.close(read_end)
            sys.stderr = open(write_end, "w")  # noqa: SIM115 (pytest's capture is not fd 2)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = chatctl_main(list(args))
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        err = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err
