"""The client processes of a load run: start them, let them go together, collect their
records (:class:`~chatd.bench.load.LoadResult`), stop them.

Each client process is forked, runs one :class:`~chatd.bench.load.LoadJob` on uvloop
(:func:`chatd.bench.load.raw_load`, :func:`~chatd.bench.load.client_load`,
:func:`chatd.bench.closedload.closed_load`, :func:`chatd.bench.direct.direct_load` or
:func:`chatd.bench.httpload.http_load`) and talks
to the parent over a pipe: ``ready`` once its connections are open, then ``go`` with a
wall-clock start time shared by all, then its ``result`` (or ``error`` with a traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import uvloop

from chatd.bench.load import Counter, LoadJob, LoadResult, client_load, clock, raw_load


async def wait_readable(pipe: Connection) -> None:
    """Wait, without blocking the event loop (so pings are answered meanwhile), until the
    parent wrote to ``pipe``; the pipe is blocking again on return."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(pipe.fileno(), wake)
    try:
        await readable
    finally:
        loop.remove_reader(pipe.fileno())
        # The event loop made the pipe non-blocking; a result sent later can be larger than
        # the pipe's buffer, and a partial write would corrupt the stream.
        os.set_blocking(pipe.fileno(), True)


def _child(job: LoadJob, pipe: Connection, progress: Counter) -> None:
    """A client process: run the job on uvloop; send ``("result", LoadResult)`` back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us

    async def go() -> float:
        pipe.send(("ready", None))
        await wait_readable(pipe)
        msg = pipe.recv()
        if msg[0] != "go":
            raise RuntimeError("aborted")
        delay = float(msg[1]) - time.time()
        await asyncio.sleep(max(0.0, delay))
        return clock()

    async def main() -> LoadResult:
        if job.mode == "raw":
            return await raw_load(job, go, progress)
        if job.mode == "client":
            return await client_load(job, go, progress)
        if job.mode == "closed":
            from chatd.bench.closedload import closed_load

            return await closed_load(job, go, progress)
        if job.mode.startswith("http-"):
            from chatd.bench.httpload import http_load

            return await http_load(job, go, progress)
        from chatd.bench.direct import direct_load

        return await direct_load(job, go, progress)

    try:
        cpu0 = time.process_time()
        result = uvloop.run(main())
        result.client_cpu_s = time.process_time() - cpu0
        pipe.send(("result", result))
    except BaseException:
        with contextlib.suppress(Exception):
            pipe.send(("error", traceback.format_exc()))
    finally:
        pipe.close()


@dataclass
class Run:
    """A load in progress: the client processes and their pipes."""

    procs: list[tuple[mp.process.BaseProcess, Connection]]
    progress: list[Counter]
    start_wall: float = 0.0

    def replies(self) -> int:
        """Answers (replies and final errors) received so far, all processes together."""
        return sum(p.value for p in self.progress)


def start(
    jobs: list[LoadJob],
    ready_timeout: float = 90.0,
    before_go: Callable[[], None] | None = None,
) -> Run:
    """Fork one client process per job, wait until all are connected, then start them all
    together 0.3 s later (the run's time 0 is that wall-clock instant). ``before_go`` is
    called once every connection is open (each after hello -> welcome) and before the first
    message: the connections are held idle while it runs."""
    ctx = mp.get_context("fork")
    run = Run([], [])
    for job in jobs:
        parent, child = ctx.Pipe()
        counter: Counter = ctx.Value("q", 0, lock=False)
        p = ctx.Process(target=_child, args=(job, child, counter), daemon=True)
        p.start()
        child.close()
        run.procs.append((p, parent))
        run.progress.append(counter)
    try:
        for _, pipe in run.procs:
            expect(pipe, "ready", ready_timeout)
        if before_go is not None:
            before_go()
        run.start_wall = time.time() + 0.3
        for _, pipe in run.procs:
            pipe.send(("go", run.start_wall))
    except BaseException:
        stop(run)
        raise
    return run


def expect(pipe: Connection, kind: str, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise RuntimeError(f"a client process sent no {kind!r} within {timeout:.0f} s")
    msg = pipe.recv()
    if msg[0] == "error":
        raise RuntimeError(f"a client process failed:\n{msg[1]}")
    if msg[0] != kind:
        raise RuntimeError(f"a client process sent {msg[0]!r}, expected {kind!r}")
    return msg[1]


def collect(run: Run, timeout: float) -> LoadResult:
    """Wait for every process's result and merge them."""
    merged = LoadResult()
    try:
        for _, pipe in run.procs:
            r: LoadResult = expect(pipe, "result", timeout)
            # Stages stay aligned with records (a mode that reads none gives Nones).
            merged.stages += r.stages or [None] * len(r.records)
            merged.records += r.records
            merged.reconnect_ms += r.reconnect_ms
            for name in (
                "connections_opened",
                "connect_failed",
                "bad_reply",
                "closed",
                "drops",
                "reconnects",
                "resumes",
                "duplicates",
                "client_cpu_s",
            ):
                setattr(merged, name, getattr(merged, name) + getattr(r, name))
    finally:
        stop(run)
    return merged


def stop(run: Run) -> None:
    """Join every client process; SIGKILL (by its PID) one that does not end in 5 s."""
    for p, pipe in run.procs:
        with contextlib.suppress(OSError):
            pipe.send(("abort", None))
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)
        pipe.close()


def split(
    mode: str,
    url: str,
    connections: int,
    procs: int,
    rate: float,
    window: tuple[float, float, float],
) -> list[LoadJob]:
    """The jobs of ``procs`` processes (no more than there are connections): connection i
    goes to process ``i % procs``. ``window`` is (warmup, duration, drain) in seconds."""
    n = max(1, min(procs, connections))
    warmup, duration, drain = window
    return [
        LoadJob(
            mode,
            url,
            list(range(p, connections, n)),
            rate,
            connections,
            warmup,
            duration,
            drain,
            seed=p,
        )
        for p in range(n)
    ]
