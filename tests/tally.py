"""The load-test clients' harness shared by the chaos and SQLite-contention tests.

A :class:`Tally` records what one :class:`chatd.client.ChatClient` received (the client's
``on_event``); :func:`run_client` keeps a client sending until told to stop, with at most
``outstanding`` messages awaiting an answer; :func:`quiet` waits (bounded) until every outbox is
empty and every acknowledged message is answered, then closes the clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence

from chatd.client import Ack, ChatClient, Error, Event, Reply
from tests.support import t


class Tally:
    """What one client sent and received: acks, answers (reply or final error), their seqs."""

    def __init__(self) -> None:
        self.acked: dict[str, int] = {}  # message id -> the seq of its ack
        self.seqs: list[int] = []  # every stored event's seq, as received
        self.answers: Counter[str] = Counter()  # message id -> answers received
        self.errors: list[Error] = []
        self.sent: set[str] = set()
        self.changed = asyncio.Event()  # set on each event

    def __call__(self, event: Event) -> None:
        self.changed.set()
        if isinstance(event, Ack):
            self.acked.setdefault(event.id, event.seq)
            self.seqs.append(event.seq)
        elif isinstance(event, Reply):
            self.answers[event.id] += 1
            self.seqs.append(event.seq)
        elif isinstance(event, Error):
            self.errors.append(event)
            if event.seq is not None and event.id is not None:  # stored: the message's answer
                self.answers[event.id] += 1
                self.seqs.append(event.seq)

    async def wait(self, cond: Callable[[], bool], within: float) -> None:
        """Wait (bounded by ``within`` scaled) until ``cond()`` holds, re-checked per event."""
        async with asyncio.timeout(t(within)):
            while not cond():
                self.changed.clear()
                await self.changed.wait()

    @property
    def outstanding(self) -> int:
        """Messages sent and not answered yet."""
        return sum(1 for m in self.sent if not self.answers[m])

    @property
    def unanswered(self) -> int:
        """Messages acknowledged and not answered yet."""
        return sum(1 for m in self.acked if not self.answers[m])

    def gaps(self) -> list[int]:
        """Seqs below the highest one received that never arrived."""
        return sorted(set(range(1, max(self.seqs, default=0) + 1)) - set(self.seqs))


async def run_client(
    url: str,
    stop: asyncio.Event,
    tally: Tally,
    *,
    outstanding: int,
    pause: tuple[float, float] | None = None,
) -> ChatClient:
    """Connect a client and send until ``stop``: a message whenever fewer than
    ``outstanding`` await an answer; then a random ``pause`` (seconds) between two sends, or,
    without one, at full speed (waiting for an event, at most 0.2 s, when at the cap).

    The client is returned connected: :func:`quiet` closes it. A short backoff and a stall
    timeout make it come back quickly from the kills these tests make."""
    client = ChatClient(url, on_event=tally, initial_delay=0.05, max_delay=0.5, stall_timeout=3.0)
    await client.connect()
    n = 0
    while not stop.is_set():
        if tally.outstanding < outstanding:
            n += 1
            tally.sent.add(await client.send(f"message {n} of {id(tally) % 9973}"))
            if pause is None:
                await asyncio.sleep(0)
        elif pause is None:
            tally.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await tally.changed.wait()
        if pause is not None:
            await asyncio.sleep(random.uniform(*pause))
    return client


async def quiet(clients: Sequence[ChatClient], tallies: Sequence[Tally], within: float) -> None:
    """Wait (bounded by ``within`` scaled) until every outbox is empty and every acknowledged
    message is answered; then close every client."""
    deadline = time.monotonic() + t(within)
    while time.monotonic() < deadline:
        if all(c.pending == 0 for c in clients) and not any(tl.unanswered for tl in tallies):
            break
        await asyncio.sleep(0.2)
    for c in clients:
        await c.close()
