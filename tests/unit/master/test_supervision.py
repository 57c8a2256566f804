"""chatd.master.supervision: heartbeat age, message rate, RSS recycling policy, status rows."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from chatd.config import Config, ServerConfig
from chatd.master.supervision import (
    RSS_RECYCLE_INTERVAL,
    RSS_SAMPLES,
    Slot,
    Worker,
    msg_per_s,
    rss_recycle_candidate,
    sample,
    silent_for,
    status_rows,
)

MB = 1024 * 1024


@pytest.fixture
def sock() -> Iterator[socket.socket]:
    s = socket.socket()
    yield s
    s.close()


def make(sock: socket.socket, limit_mb: int = 0, rss: int = 0) -> tuple[Slot, Worker]:
    cfg = Config(server=ServerConfig(max_worker_rss_mb=limit_mb))
    slot = Slot(id=1, listener=sock, cfg=cfg, generation=1)
    worker = Worker(slot=1, pid=123, generation=1, cfg=cfg, started=100.0, state="ready", rss=rss)
    slot.worker = worker
    return slot, worker


def test_silence_counts_from_the_fork_until_the_first_message(sock: socket.socket) -> None:
    _, w = make(sock)
    assert silent_for(w, 103.0) == 3.0
    w.last_heard = 102.5
    assert silent_for(w, 103.0) == 0.5


def test_message_rate_over_the_window(sock: socket.socket) -> None:
    _, w = make(sock)
    assert msg_per_s(w) == 0.0
    for second, total in enumerate([0, 10, 30, 60, 100, 150, 210, 280]):
        w.stats = {"messages_total": total}
        sample(w, 200.0 + second)
    # the window keeps the last point at least 5 s old: from t=202 (30) to t=207 (280)
    assert msg_per_s(w) == pytest.approx((280 - 30) / 5)
    w.stats = {"messages_total": "garbage"}
    sample(w, 208.0)  # a bad report is skipped, the rate stays
    assert msg_per_s(w) == pytest.approx((280 - 30) / 5)


def test_rss_recycling_needs_consecutive_samples_and_respects_the_interval(
    sock: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    slot, w = make(sock, limit_mb=1)
    w.rss = 5 * MB
    w.rss_over = RSS_SAMPLES - 1
    assert rss_recycle_candidate([slot], 0.0) is None
    w.rss_over = RSS_SAMPLES
    assert rss_recycle_candidate([slot], 0.0) is slot
    slot.last_recycle = 0.0  # just recycled: the next worker is over the limit again
    assert rss_recycle_candidate([slot], 10.0) is None
    assert rss_recycle_candidate([slot], 11.0) is None
    assert caplog.text.count("is over max_worker_rss_mb 1 again") == 1  # warned once
    assert rss_recycle_candidate([slot], RSS_RECYCLE_INTERVAL) is slot


def test_rss_streak_resets_and_needs_a_limit(sock: socket.socket) -> None:
    _, w = make(sock, limit_mb=0, rss=500 * MB)
    sample(w, 1.0)
    assert w.rss_over == 0  # no limit configured
    _, w = make(sock, limit_mb=1, rss=5 * MB)
    w.rss_over = 2
    w.state = "starting"
    sample(w, 1.0)
    assert w.rss_over == 0  # only ready workers are judged


def test_status_rows_list_serving_and_other_workers(sock: socket.socket) -> None:
    slot, w = make(sock)
    incoming = Worker(slot=1, pid=456, generation=2, cfg=slot.cfg, started=105.0)
    slot.incoming = incoming
    old = Worker(slot=1, pid=99, generation=1, cfg=slot.cfg, started=1.0, state="draining")
    rows, others = status_rows([slot], [w, incoming, old], 110.0)
    assert [(r.pid, r.state) for r in rows] == [(123, "ready")]
    assert [(r.pid, r.state, r.generation) for r in others] == [
        (99, "draining", 1),
        (456, "starting", 2),
    ]
    slot.worker = None
    slot.boot_failures = 3
    rows, _ = status_rows([slot], [], 110.0)
    assert rows[0].state == "crash-looping" and rows[0].pid is None
