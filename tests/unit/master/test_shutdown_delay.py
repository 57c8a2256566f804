"""chatd.master.shutdown: the pre-drain of ``[server] shutdown_delay`` before a graceful stop.

The master's loop drives :class:`Shutdown` with ``begin`` and ``progress(now)``; here a
stand-in for :class:`chatd.master.workers.Workers` records what each worker was told and which
signals it got, so the order of the steps is checked with no process.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

from chatd.master.shutdown import EXIT_GRACE, KILL_WAIT, Shutdown
from chatd.proto import control as proto


@dataclass
class FakeWorker:
    pid: int
    state: str = "ready"
    drain_sent: float | None = None
    drain_acked: bool = False
    signalled: bool = False
    told: list[str] = field(default_factory=list)
    signals: list[int] = field(default_factory=list)


@dataclass
class FakeSlot:
    respawn_at: float | None = None


class FakeWorkers:
    """What Shutdown uses of Workers: by_pid, slots, replacing, tell, kill."""

    def __init__(self, *pids: int) -> None:
        self.by_pid = {pid: FakeWorker(pid) for pid in pids}
        self.slots = [FakeSlot(respawn_at=5.0) for _ in pids]
        self.replacing = True

    def tell(self, worker: FakeWorker, msg: dict[str, Any]) -> bool:
        worker.told.append(msg[proto.T])
        return True

    def kill(self, worker: FakeWorker, signum: int) -> None:
        worker.signalled = True
        worker.signals.append(signum)


def start(workers: FakeWorkers, delay: float, now: float = 100.0) -> Shutdown:
    shutdown = Shutdown(workers)  # type: ignore[arg-type]
    assert shutdown.begin(graceful=True, graceful_timeout=10.0, now=now, delay=delay)
    return shutdown


def test_predrain_tells_every_worker_and_drains_only_after_the_delay() -> None:
    workers = FakeWorkers(11, 12)
    shutdown = start(workers, delay=3.0)
    assert [w.told for w in workers.by_pid.values()] == [[proto.PREDRAIN]] * 2
    # Serving on: dead workers are still replaced, nobody drains, the loop wakes at the drain.
    assert workers.replacing and all(s.respawn_at == 5.0 for s in workers.slots)
    assert shutdown.deadline == 103.0 and shutdown.drain_at == 103.0
    shutdown.progress(102.9)
    assert [w.told for w in workers.by_pid.values()] == [[proto.PREDRAIN]] * 2  # told once
    assert not shutdown.done
    shutdown.progress(103.0)
    assert [w.told for w in workers.by_pid.values()] == [[proto.PREDRAIN, proto.DRAIN]] * 2
    assert not workers.replacing and all(s.respawn_at is None for s in workers.slots)
    assert all(w.state == "draining" and w.drain_sent == 103.0 for w in workers.by_pid.values())
    # graceful_timeout counts from the drain, not from SIGTERM.
    assert shutdown.deadline == 113.0


def test_a_worker_started_during_the_predrain_is_told_too() -> None:
    workers = FakeWorkers(11)
    shutdown = start(workers, delay=3.0)
    workers.by_pid[13] = FakeWorker(13)  # the replacement of a worker that died meanwhile
    shutdown.progress(101.0)
    assert workers.by_pid[13].told == [proto.PREDRAIN]
    assert workers.by_pid[11].told == [proto.PREDRAIN]


def test_without_delay_the_drain_starts_at_once() -> None:
    workers = FakeWorkers(11)
    shutdown = start(workers, delay=0.0)
    assert workers.by_pid[11].told == [proto.DRAIN]
    assert shutdown.drain_at is None and shutdown.deadline == 110.0


def test_a_second_sigterm_changes_nothing_and_a_fast_stop_overtakes_the_predrain() -> None:
    workers = FakeWorkers(11)
    shutdown = start(workers, delay=3.0)
    assert not shutdown.begin(graceful=True, graceful_timeout=10.0, now=101.0, delay=3.0)
    assert shutdown.begin(graceful=False, graceful_timeout=10.0, now=101.0)
    assert workers.by_pid[11].told == [proto.PREDRAIN, proto.STOP]
    assert shutdown.drain_at is None and not workers.replacing
    shutdown.progress(103.5)  # past the drain time: no drain after a fast stop
    assert workers.by_pid[11].told == [proto.PREDRAIN, proto.STOP]


def test_the_kill_deadline_counts_from_the_drain_with_grace_for_closing_workers() -> None:
    """At delay + graceful_timeout, a worker that never acknowledged the drain is killed; one
    that did gets EXIT_GRACE to close its clients with 1001 (a SIGKILL then would be 1006)."""
    workers = FakeWorkers(11, 12)
    shutdown = start(workers, delay=3.0)
    shutdown.progress(103.0)  # drain
    draining, stuck = workers.by_pid[11], workers.by_pid[12]
    draining.drain_acked = True
    shutdown.progress(103.5)
    shutdown.progress(112.9)
    assert draining.signals == [] and stuck.signals == [signal.SIGTERM]  # unacknowledged
    shutdown.progress(113.0)
    assert draining.signals == [] and stuck.signals == [signal.SIGTERM, signal.SIGKILL]
    assert shutdown.deadline == 113.0 + EXIT_GRACE
    shutdown.progress(113.0 + EXIT_GRACE)
    assert draining.signals == [signal.SIGKILL] and shutdown.killed
    assert shutdown.deadline == 113.0 + EXIT_GRACE + KILL_WAIT


def test_without_a_draining_worker_the_deadline_kills_at_once() -> None:
    workers = FakeWorkers(11)
    shutdown = start(workers, delay=0.0)
    shutdown.progress(110.0)
    assert workers.by_pid[11].signals == [signal.SIGTERM, signal.SIGKILL] and shutdown.killed
