"""A worker killed mid-reply: its messages are taken over at once, not a lease later.

The master reaps the dead worker and tells a live one (or, when none is left, its replacement
as soon as it is ready) to release the dead store's leases and claim them
(``proto.OWNER_GONE``, :mod:`chatd.master.takeover`). The lease is left at its full length
here (no ``CHATD_TEST_LEASE``): without the release, the message would wait for it to run
out and for a sweep. The assertions are on the log line only the release writes (its lease
found still held, so released before it lapsed), on the answer and its count, never on
durations. The message is taken over by the release's own claim, or by the client's resume
if that came first between the release and the claim: either way here, at once.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatd.client import ChatClient
from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from chatd.dev.fake_ollama.wire import expected_reply
from tests.support import Chatd, Client, fake_config, running_chatd, wait_for
from tests.tally import Tally

pytestmark = pytest.mark.system

# What the worker told by the master writes (chatd.worker.leases.owner_gone).
RELEASED = re.compile(r"worker died: its 1 leases released, [01] messages taken over here")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama(["qwen2.5-coder:7b"], tokens=6)) as f:
        yield f


def generating_worker(d: Chatd) -> int:
    """The pid of the worker whose reply is in flight (its stats say so within a second)."""

    def found() -> int | None:
        st = d.status()
        busy = [w["pid"] for w in (st or {}).get("workers", []) if w.get("in_flight")]
        return busy[0] if len(busy) == 1 else None

    return int(wait_for(found, 10, "the worker generating the reply"))


@pytest.mark.parametrize("workers", [2, 1])
def test_a_dead_workers_message_is_taken_over_at_once(
    workers: int, fake: FakeOllama, tmp_path: Path
) -> None:
    """2 workers: the other one takes it over; 1 worker: its replacement, once ready."""
    with running_chatd(tmp_path, fake.url, workers=workers) as d:
        fake_config(fake.url, hang=True)
        tally = Tally()

        async def main() -> None:
            async with ChatClient(d.url, on_event=tally, initial_delay=0.05) as client:
                msg_id = await client.send("taken over")
                await tally.wait(lambda: msg_id in tally.acked, 10)
                pid = await asyncio.to_thread(generating_worker, d)
                os.kill(pid, signal.SIGKILL)
                await asyncio.to_thread(
                    wait_for,
                    lambda: RELEASED.search(d.log()),
                    20,
                    "the dead worker's lease released and its message claimed",
                )
                fake_config(fake.url, hang=False)
                await tally.wait(lambda: tally.answers[msg_id] > 0, 30)
                await asyncio.sleep(0.3)  # nothing more may come

        try:
            asyncio.run(main())
        finally:
            fake_config(fake.url, hang=False)
        assert list(tally.answers.values()) == [1]
        assert "worker died" in d.log()


def test_a_worker_that_lost_its_lease_forwards_the_other_workers_reply_live(
    fake: FakeOllama, tmp_path: Path
) -> None:
    """The worker generating a reply stalls for longer than its lease (SIGSTOP 2.6 s, the
    lease 2 s): another worker's sweep claims the message and answers it. The stalled worker,
    back, finds its lease lost and stops its generation; its client, still connected to it,
    gets the other worker's reply on that same connection, live (the stalled worker watches
    the session once its generation stopped), not at a resume after its stall timeout."""
    with running_chatd(tmp_path, fake.url, workers=2) as d:
        fake_config(fake.url, first_token_ms=4000, token_ms=0, tokens=6)  # ~4 s a reply
        try:
            c = Client(d.url)
            welcome = c.hello()
            pid = int(str(welcome["worker"]).split("/")[1])
            c.send({"type": "message", "id": "m1", "text": "outlive the lease"})
            ack = c.until(lambda f: f["type"] == "ack")[-1]
            os.kill(pid, signal.SIGSTOP)
            try:
                wait_for(lambda: "takeover" in d.log(), 10, "the other worker's claim")
            finally:
                os.kill(pid, signal.SIGCONT)
            frames = c.until(lambda f: f.get("id") == "m1" and f["type"] == "reply", timeout=15)
            assert frames[-1]["seq"] == ack["seq"] + 1
            assert frames[-1]["text"] == expected_reply("outlive the lease", 6)
            assert re.search(r"lease of \S+ lost to another worker: stopping", d.log())
            c.close()
        finally:
            fake_config(fake.url, first_token_ms=0)
