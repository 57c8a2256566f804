"""What the master knows of each worker and slot, and how it judges their health.

Pure bookkeeping, no process control (that is :mod:`chatd.master.workers`): the records
(:class:`Worker`, :class:`Slot`), the once-a-second sample of a worker (CPU, RSS, message
rate), and the rules built on them:

* **heartbeat**: a worker whose last message (``stats`` every second from its event loop, or
  anything else) is older than ``[server] worker_timeout`` is hung (:func:`silent_for`); a
  worker that has sent nothing yet is judged from its fork, so a worker stuck while starting
  is caught too;
* **RSS recycling** (:func:`rss_recycle_candidate`): a ready worker over
  ``[server] max_worker_rss_mb`` for RSS_SAMPLES consecutive samples is recycled (a new worker
  first, then the old one drains: the reload's path), one slot at a time, and each slot at
  most once per RSS_RECYCLE_INTERVAL. A limit below a fresh worker's RSS would otherwise
  recycle every slot in a loop; with the interval it recycles each slot once a minute and
  logs why, once per worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil

from chatd.config import Config
from chatd.master.channel import Channel
from chatd.master.status import WorkerSnapshot

log = logging.getLogger("chatd.master")

BOOT_FAILURES_BEFORE_BACKOFF = 3  # exits before `ready` in a row that make a slot crash-looping
RATE_WINDOW = 5.0  # seconds of messages_total history behind msg_per_s
RSS_SAMPLES = 3  # consecutive samples over the limit before a worker is recycled
RSS_RECYCLE_INTERVAL = 60.0  # seconds between two RSS recycles of the same slot


@dataclass(eq=False)
class Worker:
    """One worker process, as the master knows it."""

    slot: int
    pid: int
    generation: int
    cfg: Config  # the configuration it was forked with
    started: float  # monotonic
    link: Channel | None = None
    state: str = "starting"  # starting -> ready -> draining; or stopping (being killed)
    stats: dict[str, Any] = field(default_factory=dict)  # its last `stats` message
    proc: psutil.Process | None = None
    rss: int = 0
    cpu: float = 0.0
    last_heard: float | None = None  # monotonic time of its last message
    drain_sent: float | None = None
    drain_acked: bool = False
    # Retired with a successor: moving its open WebSockets there until it says handoff_done
    # (then ``handoff`` holds what it reported: moved, fell_back, deferred, aborted, ms).
    handing_off: bool = False
    handoff: dict[str, Any] = field(default_factory=dict)
    signalled: bool = False  # a stop signal (fallback or escalation) was sent
    detached: bool = False  # no longer its slot's worker: draining, or being killed
    kill_at: float | None = None  # when a detached worker still alive gets SIGKILL
    rss_over: int = 0  # consecutive samples over max_worker_rss_mb
    rss_warned: bool = False
    rate: deque[tuple[float, float]] = field(default_factory=deque)  # (time, messages_total)
    exit_code: int | None = None  # once reaped: its code, or -N when killed by signal N


@dataclass(eq=False)
class Slot:
    """A worker position: its socket outlives the workers that serve it."""

    id: int  # 1-based
    listener: socket.socket
    cfg: Config  # what a replacement worker of this slot gets
    generation: int
    worker: Worker | None = None  # the worker serving the slot
    incoming: Worker | None = None  # a new worker starting to take the slot over (a roll)
    incoming_failure: str | None = None  # why the last incoming worker did not make it
    restarts: int = 0
    boot_failures: int = 0  # workers in a row that exited before `ready`
    respawn_at: float | None = None  # set while a crash-looping slot backs off
    last_recycle: float | None = None  # monotonic time of its last RSS recycle


def describe_exit(status: int) -> str:
    """``exited with code 1`` or ``killed by signal 9 (SIGKILL)``, from a wait status."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown"
    return f"killed by signal {-code} ({name})"


def silent_for(worker: Worker, now: float) -> float:
    """Seconds since the worker last spoke (since its fork when it has not spoken yet)."""
    return now - (worker.last_heard if worker.last_heard is not None else worker.started)


def sample(worker: Worker, now: float) -> None:
    """Take one sample: CPU% and RSS (a few /proc reads), message rate, RSS streak."""
    if worker.proc is not None:
        try:
            with worker.proc.oneshot():
                worker.cpu = worker.proc.cpu_percent(None)
                worker.rss = worker.proc.memory_info().rss
        except (psutil.Error, OSError):  # gone (the reaper sees it), or out of descriptors
            pass
    total = worker.stats.get("messages_total", 0)
    if isinstance(total, int | float) and not isinstance(total, bool):
        worker.rate.append((now, float(total)))
        while len(worker.rate) > 2 and now - worker.rate[1][0] >= RATE_WINDOW:
            worker.rate.popleft()
    limit = worker.cfg.server.max_worker_rss_mb
    over = bool(limit) and worker.state == "ready" and worker.rss > limit * 1024 * 1024
    worker.rss_over = worker.rss_over + 1 if over else 0


def msg_per_s(worker: Worker) -> float:
    """Messages per second over the last RATE_WINDOW seconds (0 before two samples)."""
    if len(worker.rate) < 2:
        return 0.0
    (t0, n0), (t1, n1) = worker.rate[0], worker.rate[-1]
    return max(0.0, (n1 - n0) / (t1 - t0)) if t1 > t0 else 0.0


def rss_recycle_candidate(slots: list[Slot], now: float) -> Slot | None:
    """The first slot whose worker is due for an RSS recycle (see the module docstring)."""
    for slot in slots:
        w = slot.worker
        if w is None or slot.incoming is not None or w.rss_over < RSS_SAMPLES:
            continue
        if slot.last_recycle is not None and now - slot.last_recycle < RSS_RECYCLE_INTERVAL:
            if not w.rss_warned:
                w.rss_warned = True
                log.warning(
                    "worker %d (pid %d): RSS %.1f MB is over max_worker_rss_mb %d again, "
                    "%.0fs after its slot was recycled; next recycle in %.0fs at the earliest "
                    "(is the limit below a fresh worker's RSS?)",
                    *(slot.id, w.pid, w.rss / 1e6, w.cfg.server.max_worker_rss_mb),
                    *(now - slot.last_recycle, RSS_RECYCLE_INTERVAL - (now - slot.last_recycle)),
                )
            continue
        return slot
    return None


def slot_snapshot(slot: Slot, now: float) -> WorkerSnapshot:
    """The status row of a slot: its serving worker, or what the slot is waiting for."""
    w = slot.worker
    looping = slot.boot_failures >= BOOT_FAILURES_BEFORE_BACKOFF
    if w is None:
        return WorkerSnapshot(
            id=slot.id,
            pid=None,
            generation=slot.generation,
            state="crash-looping" if looping else "starting",
            uptime_s=0.0,
            restarts=slot.restarts,
            rss_bytes=0,
            cpu_percent=0.0,
            last_heartbeat_s=None,
        )
    state = "crash-looping" if looping and w.state == "starting" else w.state
    return worker_snapshot(w, slot, now, state)


def worker_snapshot(w: Worker, slot: Slot | None, now: float, state: str) -> WorkerSnapshot:
    """The status row of one worker process (``slot`` gives its restart count)."""
    return WorkerSnapshot(
        id=w.slot,
        pid=w.pid,
        generation=w.generation,
        state=state,
        uptime_s=now - w.started,
        restarts=slot.restarts if slot is not None else 0,
        rss_bytes=w.rss,
        cpu_percent=w.cpu,
        last_heartbeat_s=None if w.last_heard is None else now - w.last_heard,
        msg_per_s=msg_per_s(w),
        stats=w.stats,
    )


def all_ready(slots: list[Slot]) -> bool:
    """Every slot has a serving worker, and each is ready."""
    return bool(slots) and all(s.worker is not None and s.worker.state == "ready" for s in slots)


def looping(slots: list[Slot]) -> list[Slot]:
    """The slots backing off because their workers keep failing before ``ready``."""
    return [s for s in slots if s.boot_failures >= BOOT_FAILURES_BEFORE_BACKOFF]


def status_rows(
    slots: list[Slot], workers: Iterable[Worker], now: float
) -> tuple[list[WorkerSnapshot], list[WorkerSnapshot]]:
    """Status rows: one per slot (its serving worker), and one per other worker (a slot's
    incoming worker, or a detached one: draining, or being killed), sorted by slot."""
    rows = [slot_snapshot(slot, now) for slot in slots]
    serving = {id(s.worker) for s in slots}
    others = [
        worker_snapshot(w, slots[w.slot - 1] if w.slot <= len(slots) else None, now, w.state)
        for w in workers
        if id(w) not in serving
    ]
    return rows, sorted(others, key=lambda r: (r.id, r.pid or 0))
