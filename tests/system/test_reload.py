"""The supervisor with the real worker: rolling reloads under load, crash loops, orphans.

A real chatd (master + ``chatd.worker.main``), the fake Ollama with a token delay, real clients
(``tests.support.Client``) chatting on threads, and the real ``chatctl``.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread, expected_reply
from tests.support import Chatd, Client, chatctl, running_chatd, t, wait_for

pytestmark = pytest.mark.system
TOKENS = 5
STALL_S = 10.0  # a Chatter waiting this long for a frame resumes (as chatd.client does)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama(tokens=TOKENS, token_ms=20)) as f:
        yield f


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].startswith("Z")
    except OSError:
        return True


class Chatter(threading.Thread):
    """A client that chats without pause, one message at a time, as the protocol says.

    On a close (1001 during a reload) it reconnects, resumes with ``hello{session,
    last_seq}`` and sends again, with the same id, the message that got no ``ack``. It records
    every ack, reply (by seq: a replay of something already seen is not a second reply) and
    error.
    """

    def __init__(self, url: str, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.url = url
        self.session: str | None = None
        self.last_seq = 0
        self.sent: dict[str, str] = {}
        self.acked: dict[str, int] = {}
        self.replies: dict[str, set[int]] = defaultdict(set)
        self.errors: list[dict[str, Any]] = []
        self.bad_replies: list[dict[str, Any]] = []
        self.reconnects = 0
        self.stalls = 0  # resumes after STALL_S without a frame
        self.halt = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            self._chat()
        except BaseException as exc:  # reported by the test
            self.failure = exc

    def _connect(self) -> Client:
        for _ in range(100):
            try:
                client = Client(self.url)
                break
            except (OSError, InvalidStatus):
                time.sleep(0.05)
        else:
            raise AssertionError(f"{self.name}: cannot reconnect")
        first = client.hello(self.session, self.last_seq) if self.session else client.hello()
        if first["type"] != "welcome":
            self.errors.append(first)
            client.close()
            raise ConnectionClosed(None, None)
        self.session = first["session"]
        return client

    def _record(self, frame: dict[str, Any]) -> None:
        kind, msg_id = frame["type"], frame.get("id")
        if "seq" in frame:
            self.last_seq = max(self.last_seq, frame["seq"])
        if kind == "ack":
            self.acked[msg_id] = frame["seq"]
        elif kind == "reply":
            self.replies[msg_id].add(frame["seq"])
            if frame["text"] != expected_reply(self.sent[msg_id], TOKENS):
                self.bad_replies.append(frame)
        elif kind == "error":
            self.errors.append(frame)

    def _chat(self) -> None:
        client = self._connect()
        count, pending = 0, None
        while True:
            try:
                if pending is None:
                    if self.halt.is_set():
                        break
                    count += 1
                    pending = f"{self.name}-{count}"
                    self.sent[pending] = f"{self.name} says hello number {count}"
                    client.send({"type": "message", "id": pending, "text": self.sent[pending]})
                frame = client.recv(timeout=STALL_S)
            except (ConnectionClosed, TimeoutError) as exc:
                # A silence of STALL_S: resume, as a real client's stall timeout does
                # (chatd.client: stall_timeout); counted, so a test can tell.
                self.stalls += isinstance(exc, TimeoutError)
                self.reconnects += 1
                client.close()
                try:
                    client = self._connect()
                    if pending is not None and pending not in self.acked:
                        client.send({"type": "message", "id": pending, "text": self.sent[pending]})
                except ConnectionClosed:  # closed again at once (a worker that drains)
                    continue
                continue
            self._record(frame)
            if frame.get("id") == pending and frame["type"] in ("reply", "error"):
                pending = None
        client.close()

    def replied(self) -> int:
        return sum(1 for seqs in self.replies.values() if seqs)


def worker_pids(d: Chatd) -> set[int]:
    st = d.status()
    assert st is not None
    return {w["pid"] for w in st["workers"]}


def test_reload_under_load_loses_nothing(tmp_path: Path, fake: FakeOllama) -> None:
    """Two `chatctl reload`s while six clients chat without pause: exit 0 with generations 2
    then 3, every worker pid replaced each time, no client error, and every acknowledged
    message answered exactly once (clients resume after the 1001 of a draining worker). Then
    SIGKILL the master: the workers see their link end and exit by themselves. The drain of
    old, without handoff (what compression, TLS or ``handoff = false`` get; the handoff's own
    tests are in test_zero_disconnect.py)."""
    with running_chatd(tmp_path, fake.url, workers=2, server={"handoff": False}) as d:
        chatters = [Chatter(d.url, f"c{i}") for i in range(6)]
        for c in chatters:
            c.start()
        wait_for(lambda: all(c.replied() >= 2 for c in chatters), 20, "every client chatting")
        generations = [worker_pids(d)]
        for generation in (2, 3):
            before = sum(c.replied() for c in chatters)
            r = chatctl(d, "reload")
            assert r.returncode == 0, r.stdout + r.stderr
            assert f"generation {generation}" in r.stdout
            pids = worker_pids(d)
            assert not pids & set().union(*generations), (pids, generations)
            generations.append(pids)
            wait_for(
                lambda b=before: sum(c.replied() for c in chatters) >= b + 30,  # type: ignore[misc]
                20,
                "clients chatting on the new generation",
            )
        for c in chatters:
            c.halt.set()
        for c in chatters:
            c.join(t(30))
            assert not c.is_alive() and c.failure is None, (c.name, c.failure)
        acked = {(c.name, i): seq for c in chatters for i, seq in c.acked.items()}
        twice = [(c.name, i, s) for c in chatters for i, s in c.replies.items() if len(s) != 1]
        unanswered = [
            k for k in acked if not next(x for x in chatters if x.name == k[0]).replies[k[1]]
        ]
        messages = sum(len(c.sent) for c in chatters)
        reconnects = sum(c.reconnects for c in chatters)
        errors = [e for c in chatters for e in c.errors]
        print(
            f"\nreload under load: {messages} messages, {len(acked)} acked, "
            f"{sum(c.replied() for c in chatters)} replied, {reconnects} reconnects, "
            f"{len(errors)} errors"
        )
        assert errors == [] and twice == [] and unanswered == []
        assert [f for c in chatters for f in c.bad_replies] == []
        assert len(acked) == messages and reconnects >= 1
        st = d.status()
        assert st is not None and st["master"]["generation"] == 3
        worker = st["workers"][0]
        with open(f"/proc/{worker['pid']}/cmdline", "rb") as f:
            assert f.read().startswith(b"chatd: worker 1 gen 3")
        assert d.proc is not None
        d.proc.kill()
        d.proc.wait()
        wait_for(lambda: all(gone(p) for p in generations[-1]), 10, "orphaned workers to exit")


def test_crash_loop_backs_off_and_the_master_stays(tmp_path: Path, fake: FakeOllama) -> None:
    """CHATD_FAULT=crash_at_start: every worker exits 1 before it is ready. The slots are
    crash-looping in status (chatctl status exits 1), the master stays up, and the announced
    backoff grows, each retry coming no sooner than announced (log timestamps)."""
    env = {"CHATD_FAULT": "crash_at_start"}
    d = Chatd(tmp_path, fake.url, workers=1, env=env)
    try:
        d.start(wait_ready=False)
        pattern = re.compile(
            r"^(\S+)Z .*before it was ready, \d+ times in a row; next try in ([\d.]+)s"
        )
        lines = wait_for(
            lambda: (
                len(found := [m for line in d.log().splitlines() if (m := pattern.match(line))])
                >= 3
                and found
            ),
            20,
            "three backoff log lines",
        )
        delays = [float(m.group(2)) for m in lines[:3]]
        assert delays == [0.5, 1.0, 2.0], delays
        stamps = [
            time.mktime(time.strptime(m.group(1)[:19], "%Y-%m-%dT%H:%M:%S"))
            + float(m.group(1)[19:])
            for m in lines[:3]
        ]
        for (earlier, later), delay in zip(itertools.pairwise(stamps), delays[:-1], strict=True):
            assert later - earlier >= delay - 0.002, (stamps, delays)
        r = chatctl(d, "status")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "crash-looping" in r.stdout and "DEGRADED" in r.stdout
        st = d.status()
        assert st is not None and st["workers"][0]["state"] == "crash-looping"
        assert d.proc is not None and d.proc.poll() is None
        assert d.stop() == 0
    finally:
        d.kill_all()
