"""Open-loop load across several client processes, latency from the intended send time.

The model: ``connections`` C WebSocket sessions, spread over ``procs`` P client processes
(forked; each runs uvloop), send messages at a fixed total rate R msg/s: connection i sends
its k-th message at the intended time ``t0 + i/R + k*C/R`` (:func:`stats.uniform_schedule`),
whatever happened to earlier messages. Every latency is measured from that intended time (no
coordinated omission, see :mod:`chatd.bench.stats`). The first ``warmup`` seconds are sent
but not measured; after the last send the clients wait up to ``drain`` seconds for answers.

Two ways to speak to chatd, chosen per scenario:

- ``raw``: bare ``websockets`` frames (``hello``, then ``message{id,text}``) with orjson. Used
  for the throughput scenarios: its per-frame cost is a JSON parse and a list store, so the
  client processes, which share the machine's cores with chatd, take as little CPU as
  possible from what is measured.
- ``client``: :class:`chatd.client.ChatClient`, the project's client (outbox, reconnect with
  backoff, resume with ``last_seq``, resend of unacknowledged messages). Used for the failure
  scenarios (``crash``, ``drops``, ``latency-spike``, ``llm-timeout``, ``memory``), where
  what matters is that a user of the real client loses nothing. It costs more CPU per frame
  (an event object and outbox bookkeeping per frame, a callback per event), which is why the
  pure-throughput path does not use it.

Per message a client records (seconds from the run's start, perf_counter clock): intended,
actually sent, ``ack`` received, first ``token`` received, ``reply`` (or final ``error``)
received, and the error code. The parent merges the processes' records (:class:`LoadResult`);
starting, releasing and collecting the processes is :mod:`chatd.bench.fleet`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from chatd.bench import stats
from chatd.client import Ack, ChatClient, Error, Event, Reconnecting, Reply, Token

TEXT = "hello world from chatd bench"  # every load message; the fake's answer is known
# A load message's frame up to its id: the frame is HEAD + id + b'"}'.
HEAD = b'{"type":"message","text":"' + TEXT.encode() + b'","id":"'
WS_OPTS: dict[str, Any] = {
    "compression": None,  # chatd's default
    "ping_interval": None,  # no client pings: they would add frames to the measurement
    "max_size": None,
    "open_timeout": 20,
    "close_timeout": 2,
}
clock = time.perf_counter  # not loop.time(): uvloop's has a 1 ms resolution


class Counter(Protocol):
    """A shared integer (``multiprocessing.Value("q", lock=False)``): one writer each."""

    value: int


# One message: intended, sent, ack, first token (the reply's arrival for a reply that came
# with no token frame: its text came first there), done (reply or final error), error code.
Record = tuple[float, float | None, float | None, float | None, float | None, str | None]
# Where a replied message's time went in its worker (the reply's stats.stages, ms): commit,
# queue, first token, stream; None when the reply said nothing (or there was none).
Stages = tuple[float, float, float, float] | None
STAGE_KEYS = ("commit_ms", "queue_ms", "first_token_ms", "stream_ms")


@dataclass
class LoadJob:
    """What one client process does; ``conns`` are global connection indexes."""

    mode: str  # "raw", "client" (ChatClient), "closed" (closedload) or "direct" (the backend)
    url: str
    conns: list[int]
    rate: float  # total, all client processes together
    connections: int  # total
    warmup: float
    duration: float
    drain: float
    drop_at: float | None = None  # client mode: abort connections this long after start
    drop_fraction: float = 0.0
    seed: int = 0


@dataclass
class LoadResult:
    """The merged records of every client process, and their counters."""

    records: list[Record] = field(default_factory=list)
    stages: list[Stages] = field(default_factory=list)  # one per record, or empty
    connections_opened: int = 0
    connect_failed: int = 0
    bad_reply: int = 0
    closed: int = 0  # connections closed by the server (raw mode) and not reopened
    drops: int = 0  # connections we cut on purpose (drops scenario)
    reconnects: int = 0  # ChatClient: welcomes after the first
    resumes: int = 0  # ChatClient: welcomes with resumed=true
    reconnect_ms: list[float] = field(default_factory=list)  # cut -> welcome again
    duplicates: int = 0  # answers received twice for one message
    client_cpu_s: float = 0.0


class _Conn:
    """One connection's schedule and what came back (times relative to the start)."""

    __slots__ = ("ack", "done", "err", "first", "intended", "left", "sent", "stages", "wake")

    def __init__(self, intended: list[float]) -> None:
        n = len(intended)
        self.intended = intended
        self.sent: list[float | None] = [None] * n
        self.ack: list[float | None] = [None] * n
        self.first: list[float | None] = [None] * n
        self.done: list[float | None] = [None] * n
        self.err: list[str | None] = [None] * n
        self.stages: list[Stages] = [None] * n
        self.left = n
        self.wake = asyncio.Event()
        if not n:
            self.wake.set()

    def finish(self, k: int, now: float, err: str | None = None) -> bool:
        """Record the answer to message k; False if it was already answered."""
        if self.done[k] is not None:
            return False
        self.done[k], self.err[k] = now, err
        self.left -= 1
        if self.left <= 0:
            self.wake.set()
        return True

    def records(self) -> list[Record]:
        return list(
            zip(self.intended, self.sent, self.ack, self.first, self.done, self.err, strict=True)
        )

    def note_stages(self, k: int, stats: object) -> None:
        """Keep a reply's ``stats.stages`` (where its time went in the worker)."""
        self.stages[k] = parse_stages(stats)


def parse_stages(stats: object) -> Stages:
    """A reply's ``stats.stages`` as :data:`Stages`; None when it has none (or a bad one)."""
    stages = stats.get("stages") if isinstance(stats, dict) else None
    if isinstance(stages, dict):
        with contextlib.suppress(KeyError, TypeError, ValueError):
            c, q, f, s = (float(stages[key]) for key in STAGE_KEYS)
            return (c, q, f, s)
    return None


def schedule(job: LoadJob) -> list[_Conn]:
    """Every connection's intended send times, relative to the start (0)."""
    end = job.warmup + job.duration
    return [
        _Conn(stats.uniform_schedule(i, job.connections, job.rate, 0.0, end)) for i in job.conns
    ]


async def _paced_send(c: _Conn, t0: float, send: Callable[[int], Any]) -> None:
    """Send message k of connection c at its intended time (never earlier)."""
    for k, t in enumerate(c.intended):
        delay = t0 + t - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        c.sent[k] = clock() - t0
        if not await send(k):
            return


async def _await_answers(conns: list[_Conn], t0: float, job: LoadJob) -> None:
    until = t0 + job.warmup + job.duration + job.drain
    waits = [asyncio.create_task(c.wake.wait()) for c in conns]
    if waits:
        await asyncio.wait(waits, timeout=max(0.1, until - clock()))
    for w in waits:
        w.cancel()


async def open_session(url: str) -> ClientConnection:
    """A new connection to ``url`` after ``hello`` -> ``welcome`` (20 s at most for the
    welcome); RuntimeError when the first answer is not a welcome."""
    ws = await ws_connect(url, **WS_OPTS)
    await ws.send(b'{"type":"hello"}', text=True)
    welcome = orjson.loads(await asyncio.wait_for(ws.recv(decode=False), 20))
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"no welcome: {welcome}")
    return ws


async def open_sessions(url: str, n: int) -> list[ClientConnection | BaseException]:
    """``n`` sessions (:func:`open_session`), 50 connecting at a time (the listen backlog
    stays short); a failed one is its exception."""
    gate = asyncio.Semaphore(50)

    async def open_one() -> ClientConnection:
        async with gate:
            return await open_session(url)

    return await asyncio.gather(*(open_one() for _ in range(n)), return_exceptions=True)


async def raw_load(job: LoadJob, go: Callable[[], Any], progress: Counter) -> LoadResult:
    """Bare websockets: open every connection (``hello``/``welcome``), then the schedule."""
    from chatd.dev.fake_ollama.wire import expected_reply

    expected = expected_reply(TEXT, 8)
    res = LoadResult()
    opened = await open_sessions(job.url, len(job.conns))
    conns = schedule(job)
    pairs = [
        (ws, c) for ws, c in zip(opened, conns, strict=True) if isinstance(ws, ClientConnection)
    ]
    res.connect_failed = len(conns) - len(pairs)
    res.connections_opened = len(pairs)
    t0 = await go()

    async def receiver(ws: ClientConnection, c: _Conn) -> None:
        try:
            while True:
                raw = await ws.recv(decode=False)
                now = clock() - t0
                f = orjson.loads(raw)
                typ = f.get("type")
                if typ == "token":
                    k = int(f["id"])
                    if c.first[k] is None:
                        c.first[k] = now
                elif typ == "ack":
                    c.ack[int(f["id"])] = now
                elif typ == "reply":
                    k = int(f["id"])
                    if c.first[k] is None:  # no token frame: the first text came with it
                        c.first[k] = now
                    if f.get("text") != expected:
                        res.bad_reply += 1
                    c.note_stages(k, f.get("stats"))
                    if not c.finish(k, now):
                        res.duplicates += 1
                    progress.value += 1
                elif typ == "error" and "id" in f:
                    c.finish(int(f["id"]), now, str(f.get("code")))
                    progress.value += 1
        except ConnectionClosed:
            res.closed += 1
            c.wake.set()

    async def send_on(ws: ClientConnection, c: _Conn) -> None:
        async def one(k: int) -> bool:
            try:
                await ws.send(HEAD + str(k).encode() + b'"}', text=True)
                return True
            except ConnectionClosed:
                return False

        await _paced_send(c, t0, one)

    receivers = [asyncio.create_task(receiver(ws, c)) for ws, c in pairs]
    await asyncio.gather(*(send_on(ws, c) for ws, c in pairs))
    await _await_answers([c for _, c in pairs], t0, job)
    for r in receivers:
        r.cancel()
    await asyncio.gather(*receivers, return_exceptions=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            await asyncio.gather(*(ws.close() for ws, _ in pairs), return_exceptions=True)
    res.records = [r for c in conns for r in c.records()]
    res.stages = [st for c in conns for st in c.stages]
    return res


async def client_load(job: LoadJob, go: Callable[[], Any], progress: Counter) -> LoadResult:
    """:class:`ChatClient` per connection: reconnects and resumes; ``drop_at`` cuts some."""
    res = LoadResult()
    conns = schedule(job)
    t0_box = [clock()]
    cut_at: dict[int, float] = {}

    def handler(c: _Conn, idx: int) -> Callable[[Event], None]:
        def on_event(ev: Event) -> None:
            now = clock() - t0_box[0]
            if isinstance(ev, Ack):
                c.ack[int(ev.id[1:])] = now
            elif isinstance(ev, Token):
                k = int(ev.id[1:])
                if c.first[k] is None:
                    c.first[k] = now
            elif isinstance(ev, Reply):
                if not c.finish(int(ev.id[1:]), now):
                    res.duplicates += 1
                progress.value += 1
            elif isinstance(ev, Error) and ev.final and ev.id:
                c.finish(int(ev.id[1:]), now, ev.code)
                progress.value += 1
            elif isinstance(ev, Reconnecting):
                cut_at.setdefault(idx, now)
            elif type(ev).__name__ == "Welcome" and idx in cut_at:
                res.reconnect_ms.append((now - cut_at.pop(idx)) * 1000.0)

        return on_event

    clients = [
        ChatClient(
            job.url,
            on_event=handler(c, i),
            queue_events=False,
            initial_delay=0.05,
            max_delay=1.0,
            stall_timeout=5.0,
            connect_options={k: v for k, v in WS_OPTS.items() if k != "open_timeout"},
        )
        for i, c in enumerate(conns)
    ]
    gate = asyncio.Semaphore(50)

    async def open_one(cl: ChatClient) -> bool:
        async with gate:
            try:
                async with asyncio.timeout(20):
                    await cl.connect()
                return True
            except Exception:
                return False

    ok = await asyncio.gather(*(open_one(cl) for cl in clients))
    res.connections_opened = sum(ok)
    res.connect_failed = len(ok) - res.connections_opened
    t0 = t0_box[0] = await go()

    async def send_on(cl: ChatClient, c: _Conn) -> None:
        async def one(k: int) -> bool:
            try:
                await cl.send(TEXT, id=f"m{k}")
                return True
            except Exception:
                return False

        await _paced_send(c, t0, one)

    async def dropper() -> None:
        if job.drop_at is None:
            return
        await asyncio.sleep(max(0.0, t0 + job.drop_at - clock()))
        rnd = random.Random(job.seed)
        victims = [i for i in range(len(clients)) if rnd.random() < job.drop_fraction]
        for i in victims:
            cut_at[i] = clock() - t0
            clients[i].abort_connection()
        res.drops += len(victims)

    live = [(cl, c) for cl, c, good in zip(clients, conns, ok, strict=True) if good]
    await asyncio.gather(dropper(), *(send_on(cl, c) for cl, c in live))
    await _await_answers([c for _, c in live], t0, job)
    for cl in clients:
        s = cl.statistics()
        res.reconnects += s.reconnects
        res.resumes += s.resumes
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5):
            await asyncio.gather(*(cl.close() for cl in clients), return_exceptions=True)
    res.records = [r for c in conns for r in c.records()]
    return res
