"""chatd.master.control.ControlServer in this process, on a real Unix socket, driven by a
loop of the master's shape (``select``, then the callbacks, then ``tick``), with the clock
given to ``tick``: idle connections, the cap on connections, held connections, and the
back-off when ``accept`` finds no descriptor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import selectors
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatd.master.control import ControlServer
from chatd.master.requests import Clock, Commands, Request
from chatd.proto.control import Decoder, encode

pytestmark = pytest.mark.timeout(60)

LATER = 1000.0  # seconds: "long after", given to tick instead of waiting


class Master:
    """A ControlServer with ``status`` (answered at once), ``reload`` (kept, answered when the
    test says) and ``stop`` (answered at once, held open), in a loop turned by the test."""

    def __init__(self, path: str, **kw: Any) -> None:
        self.sel = selectors.DefaultSelector()
        self.clocks: list[Clock] = []
        self.kept: list[Request] = []
        commands = Commands(
            {"status": self._status, "reload": self.kept.append, "stop": self._stop},
            self.clocks,
        )
        self.server = ControlServer(self.sel, path, 0o600, commands, **kw)
        self.server.open()
        assert self.clocks == [self.server]  # it runs its timers from the master's loop

    @staticmethod
    def _status(request: Request) -> None:
        request.ok({"state": "running"})

    @staticmethod
    def _stop(request: Request) -> None:
        request.hold()
        request.ok({"pid": 1})

    def turn(self, now: float | None = None) -> None:
        for key, mask in self.sel.select(0):
            key.data(mask)
        self.server.tick(time.monotonic() if now is None else now)

    def close(self) -> None:
        self.server.close()
        self.sel.close()


@pytest.fixture
def path() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ctl-") as tmp:
        yield str(Path(tmp) / "ctl.sock")


@pytest.fixture
def master(path: str) -> Iterator[Master]:
    m = Master(path, idle_timeout=5.0, max_clients=3)
    yield m
    m.close()


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    return s


def pump(master: Master, client: socket.socket, now: float | None = None) -> bytes | None:
    """Turn the loop until ``client`` has something: its bytes, or None once closed."""
    for _ in range(1000):
        master.turn(now)
        try:
            data = client.recv(65536)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            return None
        return data or None
    raise AssertionError("the server neither answered nor closed the connection")


def is_open(master: Master, client: socket.socket, now: float) -> bool:
    master.turn(now)
    try:
        return client.recv(1) != b""
    except BlockingIOError:
        return True


def ask(master: Master, client: socket.socket, msg: dict[str, Any]) -> dict[str, Any]:
    client.sendall(encode(msg))
    data = pump(master, client)
    assert data is not None
    (reply,) = Decoder().feed(data)
    return reply


def test_idle_connections_are_closed(master: Master, path: str) -> None:
    """Nothing sent, or half a frame, or nothing since the last answer: closed once idle for
    idle_timeout; a connection that keeps sending requests is not idle."""
    silent, partial, served = connect(path), connect(path), connect(path)
    partial.sendall(encode({"t": "status"})[:-1])
    assert ask(master, served, {"t": "status"})["ok"] is True
    now = time.monotonic()
    assert all(is_open(master, c, now + 4.0) for c in (silent, partial, served))
    assert ask(master, served, {"t": "status"})["ok"] is True
    assert master.server.timeout(now, 60.0) <= 5.0  # the loop wakes up for it
    assert pump(master, silent, now + 5.0) is None
    assert pump(master, partial, now + 5.0) is None
    assert is_open(master, served, now + 5.0)  # its last request came later
    assert pump(master, served, now + LATER) is None
    assert master.server.clients == 0


def test_a_request_waiting_for_its_answer_is_not_idle(master: Master, path: str) -> None:
    """A reload answers when it has finished, maybe long after: its connection stays; once
    answered, it is idle like any other."""
    client = connect(path)
    client.sendall(encode({"t": "reload", "id": 7}))
    while not master.kept:
        master.turn()
    assert is_open(master, client, time.monotonic() + LATER)
    master.kept[0].ok({"generation": 2})
    data = pump(master, client)
    assert data is not None and Decoder().feed(data)[0]["data"] == {"generation": 2}
    assert pump(master, client, time.monotonic() + LATER) is None


def test_a_held_connection_stays_until_the_master_exits(master: Master, path: str) -> None:
    """``stop``: the caller waits for EOF, which must mean "the master has exited"."""
    client = connect(path)
    assert ask(master, client, {"t": "stop"})["data"] == {"pid": 1}
    assert is_open(master, client, time.monotonic() + LATER)
    master.server.close()
    assert client.recv(100) == b""


def test_connections_beyond_the_cap_are_turned_away(master: Master, path: str) -> None:
    """max_clients connections are served; one more gets one line and is closed at once; once
    one closes, a new one is served again."""
    first = [connect(path) for _ in range(3)]
    for c in first:
        assert ask(master, c, {"t": "status"})["ok"] is True
    extra = connect(path)
    data = pump(master, extra)
    assert data is not None
    assert Decoder().feed(data) == [
        {"ok": False, "error": "too many control connections (3 open); try again in a few seconds"}
    ]
    assert pump(master, extra) is None
    first[0].close()
    again = connect(path)
    assert ask(master, again, {"t": "status"})["ok"] is True


@contextlib.contextmanager
def no_descriptor_left() -> Iterator[None]:
    """Every descriptor of this process in use (a low soft RLIMIT_NOFILE, filled), undone
    after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 9, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_accept_without_descriptors_backs_off(
    master: Master, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """EMFILE on accept: the listener is not polled for a while (no busy loop on a socket
    that stays readable), one log line for the whole episode however many attempts, the
    server stays up; the connection waiting in the backlog is served once descriptors are
    back."""
    caplog.set_level(logging.DEBUG, logger="chatd.control")
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with no_descriptor_left():
        client.connect(path)  # queued in the backlog: needs no descriptor of the server
        now = time.monotonic()
        for _ in range(5):
            master.turn(now)  # accept fails: back off
            # The readable listener is not even polled, and the loop knows when to retry.
            assert master.sel.select(0) == []
            assert 0 < master.server.timeout(now, 60.0) < 60.0
            master.server.tick(now + LATER)  # the back-off is over: polled again
    lines = [r.getMessage() for r in caplog.records if "accept" in r.getMessage()]
    assert len(lines) == 1 and "Too many open files" in lines[0], lines
    client.setblocking(False)
    assert ask(master, client, {"t": "status"})["ok"] is True


def test_a_request_whose_answer_is_too_large_closes_only_its_connection(
    master: Master, path: str
) -> None:
    """A command named by 600 KB is refused with a short sentence (it once echoed the name
    twice, over the frame limit, and the encoder's error ended the master); an answer over the
    frame limit (a kept request with a huge id, answered with more) closes only its own
    connection. The loop (the master) goes on, and another client is served."""

    def feed(client: socket.socket, data: bytes) -> None:
        while data:
            try:
                data = data[client.send(data) :]
            except BlockingIOError:
                master.turn()  # the server reads meanwhile

    def answer(client: socket.socket) -> dict[str, Any]:
        buf, decoder = b"", Decoder()
        while True:
            data = pump(master, client)
            assert data is not None
            buf += data
            replies = decoder.feed(data)
            if replies:
                return replies[0]  # type: ignore[no-any-return]

    huge = connect(path)
    feed(huge, encode({"t": "x" * 600_000}))
    refused = answer(huge)
    assert refused["ok"] is False and len(refused["error"]) < 200
    kept = connect(path)
    feed(kept, encode({"t": "reload", "id": "i" * 1_000_000}))
    for _ in range(50):
        master.turn()
    assert master.kept
    master.kept[0].ok({"generation": 2, "pad": "p" * 100_000})  # over the frame limit
    assert pump(master, kept) is None
    assert ask(master, connect(path), {"t": "status"})["ok"] is True
