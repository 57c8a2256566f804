"""chatd.master.systemd.Notifier against real datagram sockets (a path and an abstract name)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from chatd.master.systemd import Notifier


def test_silent_without_notify_socket() -> None:
    n = Notifier({})
    assert not n.enabled and n.send("READY=1") is False
    assert n.watchdog_due(0.0) is None


def test_abstract_socket_and_the_reload_datagram() -> None:
    name = f"chatd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sd:
        sd.bind("\0" + name)
        sd.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        n.reloading()
        fields = sd.recv(4096).decode().split("\n")
        assert fields[0] == "RELOADING=1" and fields[1].startswith("MONOTONIC_USEC=")
        usec = int(fields[1].split("=")[1])
        assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 5
        n.ready("2/2 workers ready")
        assert sd.recv(4096) == b"READY=1\nSTATUS=2/2 workers ready"
        n.status("2/2 workers ready")  # unchanged: not sent again
        n.status("1/2 workers ready")
        assert sd.recv(4096) == b"STATUS=1/2 workers ready"
        n.close()


def test_watchdog_interval_and_pid(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sd:
        sd.bind(path)
        sd.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
        assert n.watchdog_interval == 1.0
        n.watchdog(10.0)
        assert sd.recv(100) == b"WATCHDOG=1"
        assert n.watchdog_due(10.5) == 0.5
        n.watchdog(10.5)  # not due yet: nothing sent
        n.watchdog(11.0)
        assert sd.recv(100) == b"WATCHDOG=1"
        n.close()
    other = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # meant for another process


def test_unreachable_socket_is_not_fatal(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing")})
    assert n.send("READY=1") is False and n.send("READY=1") is False
