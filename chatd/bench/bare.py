"""The bare reference relay: uvloop + websockets + aiohttp, nothing else.

What chatd's throughput and memory are compared with, in the same run (scenarios ``max``
and ``idle``): the "bare uvloop + websockets + aiohttp relay" of the performance targets.
``workers`` processes share one port through SO_REUSEPORT (the parent binds one listening
socket per worker, as chatd's master does, then forks); each runs uvloop, a
``websockets.asyncio.server`` with compression off, and one aiohttp ``ClientSession``
(keep-alive pool, no limit) to the backend, to which it streams each message as
``POST /api/chat`` (NDJSON, Ollama's API). The protocol it speaks, and what it leaves out:
:mod:`chatd.bench.bare_conn`. ::

    python -m chatd.bench.bare --port P --backend http://127.0.0.1:11434 --workers N
        [--store PATH [--store-writer @NAME]]

``--store`` makes it keep chatd's promises on each message in chatd's SQLite store at PATH
(:mod:`chatd.bench.bare_conn`: the user message committed before its ack, the reply before it
is sent), each worker writing the file itself or, with ``--store-writer``, through a running
store writer (``python -m chatd.store.sqlite_host PATH @NAME``), as chatd's workers do
through theirs. :class:`BareRelay` starts that writer itself (``store="writer"``).

The parent prints ``chatd-bench bare relay listening on ws://HOST:PORT/ws workers PID,PID``
once every worker serves, then waits; SIGTERM or SIGINT stops the workers (SIGTERM, SIGKILL
after 5 s). If a worker dies the parent stops the others and exits 1: nothing restarts.
:class:`BareRelay` starts it from Python as a :class:`~chatd.bench.server.Target`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Literal

import psutil
import uvloop
from websockets.asyncio.server import serve

from chatd.bench.bare_conn import Relay
from chatd.bench.server import MODEL, Target, kill_leftovers, raise_nofile
from chatd.dev.local_model.launch import stop_process
from chatd.store.sqlite import SqliteStore
from chatd.store.sqlite_host import accepts, unix_address

BANNER = "chatd-bench bare relay listening on "
STORE_TTL = 86400  # s: [sessions] ttl's default; the relay never expires sessions itself
StoreAt = tuple[str, str | None]
"""A store for the relay: the SQLite file, and its writer's address (None: each worker writes)."""


async def _serve(sock: socket.socket, relay: Relay, ready_fd: int) -> None:
    """One worker: serve on ``sock`` until SIGTERM; write one byte to ``ready_fd`` once up."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await relay.start()
    try:
        async with serve(
            relay.handle, sock=sock, compression=None, max_size=2**20, server_header=None
        ):
            os.write(ready_fd, b"r")
            os.close(ready_fd)
            await stop.wait()
    finally:
        await relay.close()


def _listeners(host: str, port: int, n: int) -> list[socket.socket]:
    """``n`` listening sockets on one port (SO_REUSEPORT); port 0 picks a free one."""
    socks: list[socket.socket] = []
    for _ in range(n):
        s = socket.create_server((host, port), backlog=4096, reuse_port=True)
        port = s.getsockname()[1]
        socks.append(s)
    return socks


class _Stop(Exception):
    """Raised by the parent's SIGTERM/SIGINT handler to leave ``waitpid``."""


def _on_stop(signum: int, frame: Any) -> None:
    raise _Stop


def run(
    host: str,
    port: int,
    backend: str,
    workers: int,
    model: str = MODEL,
    store: StoreAt | None = None,
) -> int:
    """The parent: bind, fork the workers, print the banner, wait; the exit code."""
    raise_nofile()
    socks = _listeners(host, port, workers)
    port = socks[0].getsockname()[1]
    ready_r, ready_w = os.pipe()
    alive: set[int] = set()
    signal.signal(signal.SIGTERM, _on_stop)  # before the forks: no worker is left behind
    signal.signal(signal.SIGINT, _on_stop)
    code = 0
    try:
        pids: list[int] = []
        for sock in socks:  # one at a time into ``alive``: a stop midway stops those forked
            pids.append(_fork_worker(sock, socks, ready_r, ready_w, backend, model, store))
            alive.add(pids[-1])
        os.close(ready_w)
        for sock in socks:
            sock.close()
        if not _wait_ready(ready_r, workers, 30.0):
            print("chatd-bench bare relay: a worker did not start", file=sys.stderr)
            return 1
        print(f"{BANNER}ws://{host}:{port}/ws workers {','.join(map(str, pids))}", flush=True)
        pid, _ = os.waitpid(-1, 0)
        alive.discard(pid)
        print(f"chatd-bench bare relay: worker {pid} exited; stopping", file=sys.stderr)
        code = 1
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop_children(alive)
    return code


def _fork_worker(
    sock: socket.socket,
    socks: list[socket.socket],
    ready_r: int,
    ready_w: int,
    backend: str,
    model: str,
    store: StoreAt | None,
) -> int:
    """Fork the worker serving ``sock`` (slot = its index + 1); its pid, in the parent."""
    slot = socks.index(sock) + 1
    pid = os.fork()
    if pid:
        return pid
    code = 1  # the worker: never returns
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # until the loop handles it
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
        os.close(ready_r)
        for other in socks:
            if other is not sock:
                other.close()
        st = None if store is None else SqliteStore(store[0], STORE_TTL, writer=store[1])
        uvloop.run(_serve(sock, Relay(backend, model, f"{slot}/{os.getpid()}", st), ready_w))
        code = 0
    finally:
        os._exit(code)


def _wait_ready(fd: int, n: int, timeout: float) -> bool:
    """True once ``n`` workers wrote their byte; False on a timeout or if one died first."""
    got = 0
    deadline = time.monotonic() + timeout
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return False
        chunk = os.read(fd, 64)
        if not chunk:  # every worker closed its end: one died before it was ready
            return False
        got += len(chunk)
    return True


def _stop_children(pids: set[int], timeout: float = 5.0) -> None:
    """SIGTERM our workers (by PID), SIGKILL those still there after ``timeout``; reap all."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        for pid in list(pids):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            pids.discard(pid)
        time.sleep(0.02)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


class BareRelay(Target):
    """``python -m chatd.bench.bare`` as a subprocess on 127.0.0.1 port 0: ``url``, ``pids``
    (its workers), ``status()`` shaped like chatctl's (master, workers, and the store writer
    when there is one) so the load and memory samplers read its pids like chatd's, and
    ``stop()``, which stops only what it started, by PID.

    ``store``: None (no store), ``"own"`` (chatd's SQLite store in a temporary directory,
    each worker writing it) or ``"writer"`` (the same through a store writer this starts,
    ``python -m chatd.store.sqlite_host``, as chatd's master forks one): the relay then keeps
    chatd's promises on each message (:mod:`chatd.bench.bare_conn`)."""

    def __init__(
        self,
        backend: str,
        workers: int = 2,
        model: str = MODEL,
        store: Literal["own", "writer"] | None = None,
    ) -> None:
        super().__init__("", "", backend)
        raise_nofile()  # the relay inherits it (it raises its own too)
        self.workers = workers
        self.store = store
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - read at start, closed by stop()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.writer: subprocess.Popen[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []
        self._started: dict[int, float] = {}
        argv = [sys.executable, "-m", "chatd.bench.bare", "--port", "0", "--backend", backend]
        argv += ["--workers", str(workers), "--model", model]
        try:
            if store is not None:
                argv += self._store_args(store)
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                start_new_session=True,  # a Ctrl-C in our terminal reaches us, not the relay
            )
            line = self._banner(30.0)
            url, _, pids = line[len(BANNER) :].partition(" workers ")
            self.url = url.strip()
            self.pids = [int(p) for p in pids.split(",")]
            for pid in self.pids:
                with contextlib.suppress(psutil.Error):
                    self._started[pid] = psutil.Process(pid).create_time()
        except BaseException:
            self.stop()
            raise

    def _store_args(self, store: str) -> list[str]:
        """The relay's ``--store`` arguments: a fresh file, and its writer started and
        accepting connections (for ``"writer"``)."""
        self._tmp = tempfile.TemporaryDirectory(prefix="chatd-bench-bare-")
        path = os.path.join(self._tmp.name, "sessions.db")
        if store == "own":
            return ["--store", path]
        name = f"@chatd-bench-bare-{os.getpid()}-{os.urandom(4).hex()}"
        self.writer = subprocess.Popen(
            [sys.executable, "-m", "chatd.store.sqlite_host", path, name],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30.0
        while not accepts(unix_address(name)):
            if self.writer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the bare relay's store writer did not start{self._err()}")
            time.sleep(0.05)
        return ["--store", path, "--store-writer", name]

    def _banner(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        fd, buf = self.proc.stdout.fileno(), b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"the bare relay did not start in time{self._err()}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the bare relay exited at start{self._err()}")
            buf += chunk
        line = buf.split(b"\n", 1)[0].decode()
        if not line.startswith(BANNER):
            raise RuntimeError(f"unexpected first line from the bare relay: {line!r}")
        return line

    def _err(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read()[-2000:].decode(errors="replace").strip()
        return f": {text}" if text else ""

    def status(self) -> dict[str, Any] | None:
        """``{"master": {"pid", "store_writer": {"pid"}}, "workers": [{"id", "pid",
        "state"}]}`` (``store_writer`` only with a writer); None once stopped."""
        if self.proc is None:
            return None
        workers = [{"id": i, "pid": p, "state": "ready"} for i, p in enumerate(self.pids, 1)]
        master: dict[str, Any] = {"pid": self.proc.pid}
        if self.writer is not None:
            master["store_writer"] = {"pid": self.writer.pid}
        return {"master": master, "workers": workers}

    def stop(self) -> None:
        """SIGTERM the parent (it stops its workers), SIGKILL by PID after 10 s; a worker
        that outlived it is SIGKILLed by PID if its start time still matches; then the store
        writer (SIGTERM, SIGKILL after 10 s) and the store's directory."""
        if self.proc is not None:
            stop_process(self.proc, 10.0)
            kill_leftovers(self._started)
            self.proc = None
        if self.writer is not None:
            stop_process(self.writer, 10.0)
            self.writer = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._stderr.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m chatd.bench.bare", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    p.add_argument("--backend", required=True, help="Ollama's base URL (http://HOST:PORT)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--store", metavar="PATH", help="keep chatd's promises in this SQLite file")
    p.add_argument(
        "--store-writer", metavar="ADDRESS", help="with --store: its writer's socket (@NAME)"
    )
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.store_writer and not args.store:
        p.error("--store-writer needs --store")
    writer = unix_address(args.store_writer) if args.store_writer else None
    store = None if not args.store else (os.path.abspath(args.store), writer)
    return run(args.host, args.port, args.backend, args.workers, args.model, store)


if __name__ == "__main__":
    sys.exit(main())
