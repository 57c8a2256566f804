"""The master's supervision of the SQLite store's writer (chatd.master.storewriter), with real
forks of a stand-in writer: restarted at once after a death once it served (it said so on its
link), after a doubling pause while it keeps dying before; stopped with SIGTERM, and never
signalled once reaped."""

from __future__ import annotations

import os
import selectors
import signal
import time
from pathlib import Path
from typing import NoReturn

from chatd.config import Config, SessionsConfig
from chatd.master.storewriter import FIRST_PAUSE, StoreWriter
from chatd.proto import control
from chatd.spec import WriterSpec


def _dies(spec: WriterSpec) -> NoReturn:
    os._exit(3)


def _serves_then_dies(spec: WriterSpec) -> NoReturn:
    spec.link.sendall(control.encode({"t": "ready"}))
    spec.link.sendall(control.encode({"t": "stats", "store": {"commits": 7}}))
    os._exit(9)


def _serves(spec: WriterSpec) -> NoReturn:
    """Until SIGTERM (exit 0) or the master's end of the link closes (exit 5)."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    spec.link.recv(1)
    os._exit(5)


SEL = selectors.DefaultSelector()  # the master's: the writers' links register there


def _config(tmp_path: Path) -> Config:
    return Config(sessions=SessionsConfig(store=f"sqlite://{tmp_path / 's.db'}"))


def _reap(writer: StoreWriter, within: float = 10.0) -> int:
    """Wait for the writer's exit; hand it to the writer as the master's reaper would."""
    assert writer.pid is not None
    pid = writer.pid
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert writer.reaped(pid, status)
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    raise AssertionError("the writer did not exit")


def test_a_writer_dying_at_its_start_is_restarted_after_a_doubling_pause(tmp_path: Path) -> None:
    writer = StoreWriter(_config(tmp_path), _dies, lambda: None, SEL)
    try:
        writer.start()
        assert _reap(writer) == 3
        assert writer.restarts == 1 and writer.pid is None
        assert writer.respawn_at is not None
        first = writer.respawn_at - writer.started
        assert first == FIRST_PAUSE
        writer.tick(writer.respawn_at)  # the pause is over: started again
        assert writer.pid is not None
        assert _reap(writer) == 3
        assert writer.respawn_at is not None
        assert writer.respawn_at - writer.started == 2 * FIRST_PAUSE
        assert writer.timeout(time.monotonic(), 60.0) <= 2 * FIRST_PAUSE
    finally:
        writer.stop(1.0)
    assert not writer.reaped(12345, 0)  # another child: not the writer's


def test_a_writer_that_served_is_restarted_at_once(tmp_path: Path) -> None:
    writer = StoreWriter(_config(tmp_path), _serves_then_dies, lambda: None, SEL)
    try:
        writer.start()
        for restarts in (1, 2, 3):
            assert _reap(writer) == 9
            assert writer.restarts == restarts
            assert writer.pid is not None  # restarted within reaped(): no pause
        assert writer.snapshot()["store"] == {}  # the new one has not reported yet
    finally:
        writer.stop(1.0)


def test_a_writer_stops_on_sigterm_and_a_reaped_one_is_not_signalled(tmp_path: Path) -> None:
    writer = StoreWriter(_config(tmp_path), _serves, lambda: None, SEL)
    writer.start()
    pid = writer.pid
    assert pid is not None
    writer.stop(10.0)  # SIGTERM, reaped
    assert writer.pid is None
    try:
        os.waitpid(pid, os.WNOHANG)
        raise AssertionError("the writer was not reaped")
    except ChildProcessError:
        pass
    # Reaped by someone else (the master's SIGCHLD handler) before stop(): no signal is sent
    # to its pid, which the kernel may have given to another process since.
    again = StoreWriter(_config(tmp_path), _serves, lambda: None, SEL)
    again.start()
    assert again.pid is not None
    os.kill(again.pid, signal.SIGKILL)
    os.waitpid(again.pid, 0)
    again.stop(1.0)
    assert again.pid is None


def test_the_writer_sees_the_masters_end_close(tmp_path: Path) -> None:
    """Its link: EOF when the master's end closes (the master died)."""
    writer = StoreWriter(_config(tmp_path), _serves, lambda: None, SEL)
    writer.start()
    assert writer._link is not None
    writer._link.close()
    writer._link = None
    assert _reap(writer) == 5
    writer.stop(1.0)


def _reports(spec: WriterSpec) -> NoReturn:
    spec.link.sendall(control.encode({"t": "ready"}))
    spec.link.sendall(control.encode({"t": "stats", "store": {"commits": 7, "wal_pages": 3}}))
    spec.link.recv(1)  # until the master's end closes
    os._exit(0)


def test_the_writers_figures_reach_the_status(tmp_path: Path) -> None:
    """What the writer reports on its link is the ``store`` of its ``store_writer`` status."""
    writer = StoreWriter(_config(tmp_path), _reports, lambda: None, SEL)
    writer.start()
    try:
        deadline = time.monotonic() + 10
        while writer.snapshot()["store"] != {"commits": 7, "wal_pages": 3}:
            assert time.monotonic() < deadline, writer.snapshot()
            for key, mask in SEL.select(0.1):
                key.data(mask)
        assert writer.snapshot()["pid"] == writer.pid
    finally:
        writer.stop(10.0)
