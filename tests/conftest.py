"""Shared fixtures: a throwaway ``redis-server`` on a free loopback port.

``redis_url`` is one server for the whole run (tests keep apart by using fresh random session
ids); ``start_redis`` starts a private one that a test may kill and restart (its pid is known).
Both skip, loudly, when ``redis-server`` is not installed; ``make test`` installs it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import system_python

NOT_INSTALLED = "redis-server not installed: apt-get install redis-server (make test installs it)"


class RedisServer:
    """One ``redis-server`` process: AOF on, RDB off, data in ``dir`` (kept across restarts)."""

    def __init__(self, dir: Path, *extra: str) -> None:
        self.dir, self.extra = dir, extra
        with contextlib.closing(socket.socket()) as s:  # a free port (a tiny race: fine here)
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait until it answers PING (after loading its AOF)."""
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "yes", "--dir", str(self.dir), "--logfile", "redis.log"]
        self.proc = subprocess.Popen([*argv, *self.extra], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._pong():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")
            time.sleep(0.02)

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")  # "-LOADING" while reading the AOF
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync: only what the AOF already holds survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip(NOT_INSTALLED)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """The URL of a redis-server shared by the whole test run."""
    return redis_server.url


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``start_redis(*extra_args)``: a private, started redis-server; stopped after the test."""
    if shutil.which("redis-server") is None:
        pytest.skip(NOT_INSTALLED)
    servers: list[RedisServer] = []

    def start(*extra: str) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", *extra)
        server.dir.mkdir()
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheelhouse of chatd's dependencies (scripts/wheelhouse.sh), made once per test run for
    the Python the install tests use, for ``scripts/install.sh --wheelhouse`` (no index at
    install time)."""
    path = tmp_path_factory.mktemp("wheelhouse")
    script = Path(__file__).resolve().parents[1] / "scripts" / "wheelhouse.sh"
    r = subprocess.run(
        [str(script), str(path), "--python", system_python() or sys.executable],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"scripts/wheelhouse.sh failed:\n{r.stdout}{r.stderr}"
    return path


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a tmpfs of 4 MiB of its own, to fill up (a full disk under SQLite);
    unmounted afterwards. Skips, saying why, where mounting is not allowed (not root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"NOT TESTED: cannot mount a small tmpfs here ({r.stderr.strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(directory: Path, name: str = "filler") -> Path:
    """Fill the file system of ``directory`` to the last byte; returns the filler file."""
    filler = directory / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (65536, 4096, 512, 1):  # big blocks, then the last partial ones
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


class DiskFiller:
    """Another process filling a disk, as it happens: whatever space is freed (SQLite
    truncating its WAL after a checkpoint) is taken again within a moment, until
    :meth:`stop`, which frees it all."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        fill(self.directory)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            fill(self.directory)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        (self.directory / "filler").unlink()
