"""Reloads without a single disconnect: open WebSockets move to the new generation.

A real chatd (master and workers), the fake Ollama, real WebSocket clients and the real
``chatctl``. What a client sees is asserted: no close frame, no reconnect, the same TCP
connection (local port) from the first frame to the last, every message acknowledged and
answered exactly once, seqs contiguous. And what the daemon reports: ``chatctl status --json``
(``totals.handoff``), the reload's log line. The faults (a worker SIGKILLed at each step of a
handoff) are placed with ``CHATD_TEST_HANDOFF_STALL`` (chatd.faults): never two owners of a
connection, never a lost acknowledged message, no leaked descriptors, no CLOSE_WAIT.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from tests.support import (
    BIN,
    Chatd,
    Client,
    Reader,
    chatctl,
    client_frame,
    http_get,
    running_chatd,
    t,
    wait_for,
)
from tests.system.test_reload import TOKENS, Chatter

pytestmark = pytest.mark.system

CLIENTS = 200
RELOADS = 20


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama(tokens=TOKENS, token_ms=4)) as f:
        yield f


def reload(d: Chatd) -> str:
    r = chatctl(d, "reload")
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@dataclass
class Record:
    """What one client saw."""

    local: Any = None  # its (address, port) at the first frame
    local_end: Any = None  # and at the last
    welcome: dict[str, Any] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)
    acks: dict[str, list[int]] = field(default_factory=dict)
    replies: dict[str, list[int]] = field(default_factory=dict)
    seqs: list[int] = field(default_factory=list)
    other: list[dict[str, Any]] = field(default_factory=list)  # errors, unexpected frames
    closed: BaseException | None = None
    close_code: int | None = None


async def chat(url: str, name: str, rec: Record, stop: asyncio.Event) -> None:
    """Chat without reconnecting: a message, its ack and reply, a pause, again."""
    try:
        async with connect(url, compression=None, open_timeout=t(20)) as ws:
            rec.local = ws.transport.get_extra_info("sockname")
            await ws.send('{"type":"hello"}')
            rec.welcome = json.loads(await ws.recv())
            n = 0
            while not stop.is_set():
                n += 1
                mid = f"{name}-{n}"
                rec.sent.append(mid)
                await ws.send(json.dumps({"type": "message", "id": mid, "text": "hi"}))
                await until_reply(ws, mid, rec)
                await asyncio.sleep(random.uniform(0.05, 0.5))
            rec.local_end = ws.transport.get_extra_info("sockname")
    except ConnectionClosed as exc:
        rec.closed, rec.close_code = exc, exc.rcvd.code if exc.rcvd else None


async def until_reply(ws: ClientConnection, mid: str, rec: Record) -> None:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), t(30)))
        kind = frame.get("type")
        if "seq" in frame:
            rec.seqs.append(frame["seq"])
        if kind == "ack":
            rec.acks.setdefault(frame["id"], []).append(frame["seq"])
        elif kind == "reply":
            rec.replies.setdefault(frame["id"], []).append(frame["seq"])
            if frame["id"] == mid:
                return
        elif kind not in ("token", "queued", "notice"):
            rec.other.append(frame)
            if kind == "error" and frame.get("id") == mid:
                return


class Crowd(threading.Thread):
    """``count`` clients chatting on one event loop of their own, until :meth:`finish`."""

    def __init__(self, url: str, count: int) -> None:
        super().__init__(daemon=True)
        self.url, self.count = url, count
        self.records = [Record() for _ in range(count)]
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.start()

    def run(self) -> None:
        async def main() -> None:
            await asyncio.gather(
                *(chat(self.url, f"c{i}", r, self.stop) for i, r in enumerate(self.records))
            )

        self.loop.run_until_complete(main())

    def welcomed(self) -> bool:
        return all(r.welcome or r.closed for r in self.records)

    def answered(self) -> int:
        return sum(len(r.replies) for r in self.records)

    def finish(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.join(t(60))
        assert not self.is_alive(), "the clients did not finish"


def assert_nothing_seen(crowd: Crowd) -> None:
    """Every client: no close, one TCP connection, each message acked and answered once,
    seqs contiguous from 1."""
    for i, r in enumerate(crowd.records):
        assert r.closed is None, f"client {i} was closed: {r.closed!r}"
        assert r.local == r.local_end, f"client {i} changed connection"
        assert not r.other, f"client {i} got {r.other[:3]}"
        assert sorted(r.acks) == sorted(r.sent), f"client {i}: acks {r.acks} for {r.sent}"
        assert all(len(s) == 1 for s in r.acks.values()), f"client {i}: acks {r.acks}"
        assert sorted(r.replies) == sorted(r.sent), f"client {i}: replies for {r.replies}"
        assert all(len(s) == 1 for s in r.replies.values()), f"client {i}: {r.replies}"
        assert r.seqs == list(range(1, len(r.seqs) + 1)), f"client {i}: seqs {r.seqs}"


def handoff(d: Chatd) -> dict[str, int]:
    st = d.status()
    assert st is not None
    return st["totals"]["handoff"]  # type: ignore[no-any-return]


def test_200_clients_chat_through_20_reloads_without_a_disconnect(
    fake: FakeOllama, workdir: Path
) -> None:
    with running_chatd(workdir, fake.url, workers=2, limits={"messages_per_minute": 1000}) as d:
        crowd = Crowd(d.url, CLIENTS)
        wait_for(crowd.welcomed, t(30), "every client welcomed")
        wait_for(lambda: crowd.answered() >= CLIENTS, t(30), "a reply for every client")
        first = d.worker_pids()
        assert d.proc is not None
        master_fds = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
        for _ in range(RELOADS):
            reload(d)
        answered = crowd.answered()
        wait_for(lambda: crowd.answered() >= answered + CLIENTS, t(30), "chat after reloads")
        crowd.finish()
        assert not set(first) & set(d.worker_pids())
        assert_nothing_seen(crowd)
        # No stray copy of a client's socket: the master never held one, and once the clients
        # have closed no server-side connection is left, established or half-closed.
        assert len(os.listdir(f"/proc/{d.proc.pid}/fd")) == master_fds
        wait_for(lambda: not tcp(d.port, "established"), t(10), "every connection closed")
        assert not tcp(d.port, "close-wait")
        # Every reload moved every connection, and nothing fell back to 1001.
        total = CLIENTS * RELOADS
        wait_for(lambda: handoff(d)["adopted"] == total, t(5), "the last workers' reports")
        moved = handoff(d)
        assert moved["fell_back"] == 0 and moved["refused"] == 0, moved
        assert moved["moved"] == moved["adopted"] == total, moved
        lines = re.findall(r"reloaded: generation \d+, 2 workers ready; (\d+) open", d.log())
        assert [int(n) for n in lines] == [CLIENTS] * RELOADS
        status = chatctl(d, "status").stdout
        assert f"handoffs: {CLIENTS * RELOADS} open WebSockets moved" in status, status
        _, _, body = http_get(f"{d.http}/metrics")
        assert f'chatd_ws_handoffs_total{{result="adopted"}} {CLIENTS * RELOADS}' in body.decode()


def test_with_compression_a_reload_drains_as_before(fake: FakeOllama, workdir: Path) -> None:
    """permessage-deflate keeps a window that cannot move: no handoff, 1001 as before."""
    with running_chatd(workdir, fake.url, workers=1, server={"compression": True}) as d:
        clients = [Client(d.url, compression="deflate") for _ in range(3)]
        frames: list[list[dict[str, Any]]] = [[] for _ in clients]
        for c in clients:
            assert c.hello()["type"] == "welcome"
        readers = [Reader(c, f) for c, f in zip(clients, frames, strict=True)]
        reload(d)
        assert [r.closed(10) for r in readers] == [1001] * 3
        assert set(handoff(d).values()) == {0}


def tcp(port: int, state: str) -> list[tuple[str, set[int]]]:
    """The server side's TCP connections of ``port`` in ``state`` (ss): each peer and the
    pids holding the socket."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", state, f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [
        (line.split()[3], {int(p) for p in re.findall(r"pid=(\d+)", line)})
        for line in out.splitlines()
        if line.strip()
    ]


def stalled_at(d: Chatd, point: str, seen: int) -> int:
    """The pid of the worker stalling at ``point``, once its ``seen``-th stall is logged."""
    found = wait_for(
        lambda: (
            m
            if len(m := re.findall(rf"pid (\d+) stalls [0-9.]+s at {point}", d.log())) > seen
            else None
        ),
        t(20),
        f"a stall at {point}",
    )
    return int(found[-1])


@pytest.mark.parametrize(
    ("point", "victim"),
    [
        ("answer", "new"),  # the new worker has the offer, has not answered: dies
        ("commit", "new"),  # it accepted, the old one has not committed: it dies
        ("adopt", "new"),  # committed, not yet adopted: it dies (a worker crash)
        ("answer", "old"),  # the old worker dies after its offer
    ],
)
def test_a_worker_killed_mid_handoff_costs_no_message(
    fake: FakeOllama, workdir: Path, point: str, victim: str
) -> None:
    """Never two owners of a connection, never a lost acknowledged message, no CLOSE_WAIT
    nor stray copy of a client's socket: the clients resume (or see nothing) and go on."""
    stall = workdir / "stall"
    # Short leases: the old worker's replies in progress when it is killed are taken over
    # within the test's time (a worker crash, chatd.store.base.LEASE_S).
    env = {"CHATD_TEST_HANDOFF_STALL": str(stall), "CHATD_TEST_LEASE": "2"}
    limits = {"messages_per_minute": 100_000}  # they chat without pause
    with running_chatd(workdir, fake.url, workers=1, env=env, limits=limits) as d:
        chatters = [Chatter(d.url, f"c{i}") for i in range(3)]
        for c in chatters:
            c.start()
        wait_for(lambda: all(c.replied() >= 2 for c in chatters), t(20), "every client chatting")
        old = d.worker_pids()[0]
        stall.write_text(f"{point} 1.5")
        reloading = threading.Thread(
            target=lambda: subprocess.run(
                [str(BIN / "chatctl"), "--socket", d.socket, "reload"],
                capture_output=True,
                timeout=t(60),
            )
        )
        reloading.start()
        stalling = stalled_at(d, point, 0)
        stall.write_text("")
        new = stalling if stalling != old else next(p for p in d.worker_pids() if p != old)
        os.kill(old if victim == "old" else new, signal.SIGKILL)
        reloading.join(t(60))
        before = sum(c.replied() for c in chatters)
        wait_for(lambda: sum(c.replied() for c in chatters) >= before + 9, t(30), "chat going on")
        for c in chatters:
            c.halt.set()
        for c in chatters:
            c.join(t(30))
            assert c.failure is None, repr(c.failure)
            assert not c.errors and not c.bad_replies, (c.errors, c.bad_replies)
            assert set(c.replies) == set(c.sent), "an acknowledged message went unanswered"
            assert all(len(seqs) == 1 for seqs in c.replies.values()), c.replies
        assert not tcp(d.port, "close-wait")
        for peer, pids in tcp(d.port, "established"):
            assert len(pids) == 1, f"{peer} is held by {pids}"


class Raw:
    """A WebSocket client on a plain socket, to split a frame where the test wants."""

    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=t(10))
        self.sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.local = self.sock.getsockname()

    @staticmethod
    def frame(obj: dict[str, Any]) -> bytes:
        return client_frame(json.dumps(obj).encode())

    def recv(self) -> dict[str, Any]:
        """The next text frame from the server (a close frame fails the test)."""
        while True:
            if len(self.buf) >= 2:
                opcode, n, at = self.buf[0] & 0x0F, self.buf[1] & 0x7F, 2
                if n == 126:
                    n, at = int.from_bytes(self.buf[2:4], "big"), 4
                elif n == 127:
                    n, at = int.from_bytes(self.buf[2:10], "big"), 10
                if len(self.buf) >= at + n:
                    data, self.buf = self.buf[at : at + n], self.buf[at + n :]
                    assert opcode == 1, f"opcode {opcode}: {data!r}"
                    return json.loads(data)  # type: ignore[no-any-return]
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection"
            self.buf += chunk

    def until(self, msg_id: str) -> list[dict[str, Any]]:
        frames = [self.recv()]
        while not (frames[-1].get("id") == msg_id and frames[-1]["type"] in ("reply", "error")):
            frames.append(self.recv())
        return frames


def test_bytes_in_flight_during_a_handoff_arrive_once(fake: FakeOllama, workdir: Path) -> None:
    """A 60 KiB frame split around the handoff (its connection waits until the frame is whole,
    then moves), and a reply stored during the handoff window (it reaches the moving client
    from the log, through the new worker, once)."""
    stall = workdir / "stall"
    env = {"CHATD_TEST_HANDOFF_STALL": str(stall)}
    limits = {"max_message_bytes": 100_000}
    with running_chatd(workdir, fake.url, workers=1, env=env, limits=limits) as d:
        a = Raw(d.port)
        a.sock.sendall(a.frame({"type": "hello"}))
        session = a.recv()["session"]
        big = a.frame({"type": "message", "id": "big", "text": "x" * 60_000})
        a.sock.sendall(big[:30_000])
        time.sleep(0.2)
        reloading = threading.Thread(target=reload, args=(d,))
        reloading.start()
        wait_for(lambda: handoff(d)["deferred"] >= 1, t(10), "the split frame deferring it")
        a.sock.sendall(big[30_000:])
        frames = a.until("big")
        reloading.join(t(30))
        assert [f["type"] for f in frames if "seq" in f] == ["ack", "reply"]
        assert handoff(d)["moved"] == 1
        # The next handoff waits 1 s before its offer: another client of the same session,
        # on the new worker, gets a reply stored meanwhile.
        stall.write_text("offer 1")
        reloading = threading.Thread(target=reload, args=(d,))
        reloading.start()
        stalled_at(d, "offer", 0)
        c = Client(d.url)
        assert c.hello(session, 2)["type"] == "welcome"
        assert [f["type"] for f in c.ask("other", "from c") if "seq" in f] == ["ack", "reply"]
        reloading.join(t(30))
        a.sock.sendall(a.frame({"type": "message", "id": "mine", "text": "hi"}))
        seen = a.until("mine")
        stored = [(f["type"], f.get("id"), f["seq"]) for f in seen if "seq" in f]
        assert stored == [
            ("ack", "other", 3),
            ("reply", "other", 4),
            ("ack", "mine", 5),
            ("reply", "mine", 6),
        ]
        assert a.sock.getsockname() == a.local
        assert handoff(d)["moved"] == 2
        a.sock.close()
        c.close()


def test_clients_the_new_configuration_refuses_are_closed_with_the_reason(
    fake: FakeOllama, workdir: Path
) -> None:
    """The new generation would refuse them (a token removed, an origin no longer allowed):
    they are not moved but closed with 1001 and why (their reconnect then meets the new
    rule); the client the new rules still accept moves."""
    tokens = ["token-kept-0123456789", "token-gone-0123456789"]
    origins = ["https://kept.example", "https://gone.example"]
    auth = {"tokens": tokens, "allowed_origins": origins}
    with running_chatd(workdir, fake.url, workers=1, auth=auth) as d:
        kept, gone, elsewhere = (
            Client(d.url, additional_headers={"Authorization": f"Bearer {tok}"}, origin=origin)
            for tok, origin in (
                (tokens[0], origins[0]),
                (tokens[1], origins[0]),
                (tokens[0], origins[1]),
            )
        )
        clients = (kept, gone, elsewhere)
        frames: list[list[dict[str, Any]]] = [[], [], []]
        for c in clients:
            assert c.hello()["type"] == "welcome"
        readers = [Reader(c, f) for c, f in zip(clients, frames, strict=True)]
        text = d.config.read_text()
        d.config.write_text(
            text.replace(', "token-gone-0123456789"', "").replace(', "https://gone.example"', "")
        )
        reload(d)
        assert [r.closed(10) for r in readers[1:]] == [1001, 1001]
        assert (
            gone.ws.close_reason
            == "the new configuration no longer accepts this connection's token"
        )
        assert (
            elsewhere.ws.close_reason
            == "the new configuration no longer allows this connection's origin"
        )
        kept.send({"type": "message", "id": "m", "text": "still here"})
        readers[0].wait(lambda f: f["type"] == "reply", 10, "the reply on the moved connection")
        assert readers[0].is_alive()
        wait_for(lambda: handoff(d)["adopted"] == 1, t(5), "the new worker's report")
        moved = handoff(d)
        assert (moved["moved"], moved["refused"], moved["fell_back"]) == (1, 2, 2), moved
        kept.close()


def test_a_scale_down_moves_the_closed_slots_connections(fake: FakeOllama, workdir: Path) -> None:
    """``chatctl scale 1`` from 3: the workers of slots 2 and 3 move their connections to the
    worker left (never to each other: both close), instead of closing them; the clients chat
    on, on their connections."""
    with running_chatd(workdir, fake.url, workers=3) as d:
        clients = [Client(d.url) for _ in range(12)]
        welcomes = [c.hello() for c in clients]
        assert len({w["worker"] for w in welcomes}) >= 2  # not all on slot 1
        locals_ = [c.ws.socket.getsockname() for c in clients]
        r = chatctl(d, "scale", "1")
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: len(d.worker_pids()) == 1, t(10), "one worker left")
        for i, c in enumerate(clients):
            frames = c.ask(f"m{i}", "after the scale")
            assert [f["type"] for f in frames if "seq" in f] == ["ack", "reply"]
            assert c.ws.socket.getsockname() == locals_[i] and c.ws.close_code is None
            c.close()
        closed = sum(not w["worker"].startswith("1/") for w in welcomes)  # "SLOT/PID"
        wait_for(lambda: handoff(d)["adopted"] == closed, t(5), "the adopting worker's report")
        moved = handoff(d)
        assert (moved["moved"], moved["fell_back"]) == (closed, 0), moved


def test_a_new_worker_adopts_no_more_than_its_connection_limit(
    fake: FakeOllama, workdir: Path
) -> None:
    """3 connections move in one batch to a generation whose max_connections is 2: two are
    adopted, the third is refused (counted with the two in transit) and closes with why."""
    with running_chatd(workdir, fake.url, workers=1, limits={"max_connections": 3}) as d:
        clients = [Client(d.url) for _ in range(3)]
        frames: list[list[dict[str, Any]]] = [[], [], []]
        for c in clients:
            assert c.hello()["type"] == "welcome"
        readers = [Reader(c, f) for c, f in zip(clients, frames, strict=True)]
        d.config.write_text(
            d.config.read_text().replace("max_connections = 3", "max_connections = 2")
        )
        reload(d)
        wait_for(lambda: sum(not r.is_alive() for r in readers) == 1, t(10), "one closed")
        (closed,) = [c for c, r in zip(clients, readers, strict=True) if not r.is_alive()]
        assert closed.ws.close_code == 1001
        assert (
            closed.ws.close_reason == "the new worker is at its connection limit: resume elsewhere"
        )
        wait_for(lambda: handoff(d)["adopted"] == 2, t(5), "the new worker's report")
        assert (handoff(d)["moved"], handoff(d)["refused"]) == (2, 1)
        for c in clients:
            c.close()
