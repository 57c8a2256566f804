"""Shared fixtures: throwaway ``redis-server`` processes on free loopback ports.

``redis_url`` is one server for the whole run (tests keep apart by using fresh random session
ids); ``start_redis`` starts a private one that a test may kill and restart (its pid is known).
``redis_cluster_url`` is a 3-master Redis Cluster for the whole run (``redis-cli --cluster
create``); ``start_sentinel`` a private master + replica + 3 Sentinels with short timeouts
(failover in ~1-3 s), whose master a test may SIGKILL. All skip, loudly, when ``redis-server``
is not installed; ``make test`` installs it (Sentinel is ``redis-server --sentinel``).
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
from typing import Any

import pytest

from tests.support import system_python

NOT_INSTALLED = "redis-server not installed: apt-get install redis-server (make test installs it)"


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:  # a free port (a tiny race: fine here)
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process: AOF on, RDB off, data in ``dir`` (kept across restarts).
    ``port``: a free one unless given."""

    def __init__(self, dir: Path, *extra: str, port: int = 0) -> None:
        self.dir, self.extra = dir, extra
        self.port = port or _free_port()
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
        """SIGKILL: no shutdown, no final fsync: only what the AOF file already holds survives
        (with ``appendfsync everysec`` on a slow disk, not every acknowledged write: Redis holds
        AOF writes back while an fsync lags; a test that kills it wants ``always``)."""
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


def redis_client(url: str) -> Any:
    """A synchronous redis-py client of the Redis behind ``url`` (``redis://``,
    ``redis+cluster://``: a RedisCluster, ``redis+sentinel://``: the Sentinels' master),
    for a test to read or change what chatd stores. The caller closes it."""
    import redis
    from redis.cluster import RedisCluster
    from redis.sentinel import Sentinel

    scheme, _, rest = url.partition("://")
    hosts, _, path = rest.partition("/")
    nodes = [(h, int(p)) for h, _, p in (x.rpartition(":") for x in hosts.split(","))]
    if scheme == "redis+cluster":
        return RedisCluster(host=nodes[0][0], port=nodes[0][1], decode_responses=True)
    if scheme == "redis+sentinel":
        return Sentinel(nodes).master_for(path.split("/")[0], decode_responses=True)
    return redis.Redis.from_url(url, decode_responses=True)


def flush_redis(url: str) -> None:
    """Empty the shared Redis behind ``url`` (``redis://``, ``redis+cluster://``,
    ``redis+sentinel://``): for a test that sweeps across every session, which another test's
    leftovers would crowd (test files on one server run one after the other, never at once:
    ``pytest -n 2 --dist loadfile`` gives each worker process its own servers)."""
    from redis.cluster import RedisCluster

    client = redis_client(url)
    try:
        if isinstance(client, RedisCluster):
            client.flushall(target_nodes=RedisCluster.PRIMARIES)
        else:
            client.flushall()
    finally:
        client.close()


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


def _free_cluster_port() -> int:
    """A free port whose Cluster bus port (+10000) is free too, and valid."""
    while True:
        port = _free_port()
        if port + 10000 > 65535:
            continue
        with contextlib.closing(socket.socket()) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class LocalCluster:
    """``masters`` redis-server nodes joined in one Redis Cluster by ``redis-cli --cluster
    create`` (no replicas: the store's contracts, not failover, are tested on it)."""

    def __init__(self, dir: Path, masters: int = 3) -> None:
        extra = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
        extra += ("--cluster-node-timeout", "2000")
        self.nodes = [
            RedisServer(dir / f"node{i}", *extra, port=_free_cluster_port()) for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.dir.mkdir()
            node.start()
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        r = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if r.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{r.stdout}{r.stderr}")
        deadline = time.monotonic() + timeout
        while not all(self._ok(n.port) for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    @staticmethod
    def _ok(port: int) -> bool:
        import redis

        with redis.Redis(port=port, socket_timeout=2) as r:
            return bool(r.cluster("INFO").get("cluster_state") == "ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class SentinelGroup:
    """A master, its replica and 3 Sentinels (quorum 2) on loopback, with short timeouts: the
    master is down for the Sentinels after 500 ms and a failover takes ~1-3 s. ``url`` is
    chatd's ``redis+sentinel://`` store URL; the Sentinels are stopped by pid."""

    NAME = "chatd"

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        fast = ("--repl-diskless-sync-delay", "0")  # not 5 s waiting for other replicas
        self.master = RedisServer(dir / "a", *fast)
        self.replica = RedisServer(
            dir / "b", *fast, "--replicaof", "127.0.0.1", str(self.master.port)
        )
        self.ports = [_free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.ports) + "/chatd"

    def start(self) -> None:
        """Start the servers and the Sentinels; :meth:`wait_ready` waits until they know
        each other (a Sentinel learns of the others in ~2 s)."""
        for server in (self.master, self.replica):
            server.dir.mkdir()
            server.start()
        for i, port in enumerate(self.ports):
            d = self.dir / f"sentinel{i}"
            d.mkdir()
            (d / "sentinel.conf").write_text(
                f"port {port}\nbind 127.0.0.1\ndir {d}\nlogfile sentinel.log\n"
                f"sentinel monitor {self.NAME} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.NAME} 500\n"
                f"sentinel failover-timeout {self.NAME} 3000\n"
            )
            argv = ["redis-server", str(d / "sentinel.conf"), "--sentinel"]
            self.sentinels.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Until the replica is in sync and every Sentinel knows it and the 2 others."""
        import redis

        deadline = time.monotonic() + timeout
        while True:
            try:
                with redis.Redis(port=self.replica.port, decode_responses=True) as r:
                    ok = r.info("replication").get("master_link_status") == "up"
                for port in self.ports:
                    with redis.Redis(port=port, decode_responses=True) as s:
                        ok = ok and len(s.sentinel_slaves(self.NAME)) == 1
                        ok = ok and len(s.sentinel_sentinels(self.NAME)) == 2
            except redis.RedisError:
                ok = False
            if ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the Sentinels did not get ready")
            time.sleep(0.05)

    def master_port(self) -> int | None:
        """The master's port as a Sentinel says it (None if none answers)."""
        import redis

        for port in self.ports:
            try:
                with redis.Redis(port=port, decode_responses=True, socket_timeout=1) as s:
                    got = s.sentinel_get_master_addr_by_name(self.NAME)
            except redis.RedisError:
                continue
            if got:
                return int(got[1])
        return None

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.sentinels:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.master.stop()
        self.replica.stop()


def _need_redis() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip(NOT_INSTALLED)


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL (``redis+cluster://``) of a 3-master Redis Cluster shared by the whole run."""
    _need_redis()
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL (``redis+sentinel://``) of a :class:`SentinelGroup` shared by the whole run
    (never failed over: tests that kill a master start their own)."""
    _need_redis()
    group = SentinelGroup(tmp_path_factory.mktemp("sentinel"))
    try:
        group.start()
        group.wait_ready()
        yield group.url
    finally:
        group.stop()


@pytest.fixture
def start_sentinel(tmp_path: Path) -> Iterator[Callable[[], SentinelGroup]]:
    """``start_sentinel()``: a started :class:`SentinelGroup` of the test's own; stopped after."""
    _need_redis()
    groups: list[SentinelGroup] = []

    def start() -> SentinelGroup:
        group = SentinelGroup(tmp_path / f"sentinel{len(groups)}")
        group.dir.mkdir()
        groups.append(group)
        group.start()
        return group

    yield start
    for group in groups:
        group.stop()


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


class WriterProcess:
    """A SQLite store's host writer (``python -m chatd.store.sqlite_host PATH @NAME``) on a
    fresh abstract unix name: :meth:`start` (waits until it accepts), :meth:`kill` (SIGKILL,
    reaped), :meth:`stop` (SIGTERM: it commits what is queued)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = f"chatd-test-writer-{os.getpid()}-{os.urandom(6).hex()}"
        self.address = "\0" + self.name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, within: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatd.store.sqlite_host", self.path, "@" + self.name]
        )
        deadline = time.monotonic() + within
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                try:
                    sock.connect(self.address)
                    return
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the store writer did not start") from None
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise


@pytest.fixture
def store_writer() -> Iterator[Callable[[str], str]]:
    """``store_writer(path)``: a started host writer of the SQLite file ``path`` (a
    :class:`WriterProcess`, stopped after the test); returns its address."""
    writers: list[WriterProcess] = []

    def start(path: str) -> str:
        writer = WriterProcess(path)
        writers.append(writer)
        writer.start()
        return writer.address

    yield start
    for writer in writers:
        writer.stop()
