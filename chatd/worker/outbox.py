"""The frames waiting to be written to one client, with token coalescing.

Frames are queued synchronously (from the relay's token callback, from the store's commit
callback) and written **once per event-loop tick**: the first frame queued in a tick schedules
one flush (``loop.call_soon``) that writes everything queued by then, in order, with one
``writelines`` (one system call) when the socket takes data. Only when it does not (the
transport's buffer is above its high-water mark: a slow client) does a writer task take over,
waiting for flow control frame by frame, until the queue is empty. Why not one writer task per
connection, as before: measured with ``chatd-bench``, the task's wake-up per burst cost CPU on
every message, and the parked task with its two events cost ~2 KB of every idle connection.

Consecutive ``token`` pieces of the same message that have not been written yet are merged
into one frame: a zero-delay backend's pieces read in one tick become one frame, and a client
that reads slower than the model writes gets fewer, larger frames instead of a growing queue
(a WebSocket frame costs ~15 µs of CPU, DESIGN.md "Where the time goes").

While a resumed connection replays the stored log, live frames are held back and released
after the replay, minus the final events the replay already carried.

A stored event (a frame queued with its ``seq``) reaches a connection at most once: by the
replay, live from the generation on this worker, or forwarded from the log when another
worker stored it (live handoff, :meth:`chatd.worker.generation.Hub.on_stored`). The outbox remembers
a *floor* (every stored event up to it was sent or replayed) and the seqs sent above it, and
drops a stored event it already sent. The floor only rises: at the replay, when a forward
delivered every final of the log up to some seq (:meth:`Outbox.advance`), and over the seqs sent
right above it (a connection alone on its session sends every seq, its acks included: its floor
follows the log and nothing is remembered above it). Not a plain
"highest seq sent": finals of one session stored by two workers may reach a connection out
of seq order (a local reply with seq 6 published before the forwarded one with seq 5).

Bounded memory: a client that stops reading must not take the worker's memory. While the
writer task waits for such a client (the slow path), every frame queued is counted: when the
connection's unread bytes (queued here, plus the transport's buffer) pass
``max_outbound_bytes``, or all slow readers of the worker together pass
``max_worker_outbound_bytes`` (:class:`OutboundBudget`), the outbox drops its queue, closes, and
calls ``on_overflow``: the session closes the connection with 1008. Nothing is lost: every
reply is in the store, and the client gets it when it resumes. In the fast path nothing is
counted per frame beyond two integer additions: the queue is written out within the tick.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from chatd.proto.chat import token_frame

log = logging.getLogger("chatd.outbox")

MAX_SENT = 4096  # stored seqs remembered above the floor; beyond, the floor rises to the oldest


class FrameSink(Protocol):
    """The connection the outbox writes text frames to (:class:`chatd.worker.session.WsSink`)."""

    def writable(self) -> bool:
        """True if frames may be written now without waiting for the peer (open, and the
        transport's buffer below its high-water mark)."""
        ...

    def write(self, frames: Sequence[bytes]) -> None:
        """Write these text frames at once, without waiting; only when :meth:`writable`."""
        ...

    async def send(self, frame: bytes) -> None:
        """Write one text frame, waiting for flow control; raises when the connection is
        closed or fails."""
        ...

    def buffered(self) -> int:
        """Bytes written and not yet taken by the peer (the transport's write buffer)."""
        ...


class OutboundBudget:
    """The bounds on unread outbound bytes, and the worker-wide account of them.

    One per worker, shared by its outboxes. ``total`` counts the bytes queued in every
    outbox (not the transports' buffers, which flow control bounds per connection).
    """

    __slots__ = ("overflows", "per_connection", "per_worker", "total")

    def __init__(self, per_connection: int, per_worker: int) -> None:
        self.per_connection = per_connection
        self.per_worker = per_worker
        self.total = 0
        self.overflows = 0  # connections closed for being over a bound


class _Tokens:
    """Pending token text of one message, not yet turned into a frame."""

    __slots__ = ("msg_id", "parts")

    def __init__(self, msg_id: str, text: str) -> None:
        self.msg_id = msg_id
        self.parts = [text]


def _frame(item: bytes | _Tokens) -> bytes:
    return token_frame(item.msg_id, "".join(item.parts)) if isinstance(item, _Tokens) else item


def _size(item: bytes | _Tokens) -> int:
    """Bytes an item stands for (token text by characters: a lower bound of its UTF-8)."""
    return sum(map(len, item.parts)) if isinstance(item, _Tokens) else len(item)


_UNBOUNDED = OutboundBudget(1 << 62, 1 << 62)


class Outbox:
    """An ordered, coalescing queue of frames for one connection, written once per tick.

    Use from the event loop's thread, inside a running loop. :meth:`close` when the
    connection ends: queued frames are dropped and nothing is written afterwards.
    ``budget`` bounds the bytes a slow reader leaves unread; ``on_overflow(unread, total)`` is
    called once when a bound is passed, with this connection's unread bytes and the worker's
    total queued for slow readers at that moment (the outbox is closed by then).
    """

    __slots__ = (
        *("_budget", "_bytes", "_floor", "_held", "_loop", "_on_gap", "_on_overflow", "_queue"),
        *("_scheduled", "_sent", "_sink", "_waiters", "_writer", "closed"),
    )

    def __init__(
        self,
        sink: FrameSink,
        budget: OutboundBudget | None = None,
        on_overflow: Callable[[int, int], None] | None = None,
        on_gap: Callable[[int], None] | None = None,
    ) -> None:
        self._sink = sink
        self._budget = budget or _UNBOUNDED
        self._on_overflow = on_overflow
        self._on_gap = on_gap
        self._bytes = 0  # queued in _queue (held frames are not)
        # A list, not a deque: it is empty nearly always, and every open connection has it
        # (an empty deque costs ~600 bytes).
        self._queue: list[bytes | _Tokens] = []
        # Frames held back, with their seq (negative: put ``again``).
        self._held: list[tuple[bytes | _Tokens, int]] | None = None
        self._floor = 0
        self._sent: set[int] | None = None  # created at the first stored event above floor
        self._scheduled = False  # a flush is due at the end of this tick
        self._writer: asyncio.Task[None] | None = None  # the slow path, while it runs
        # wait_empty() callers; None until the first (an empty list is 56 bytes per client).
        self._waiters: list[asyncio.Future[None]] | None = None
        # The loop, found at the first flush and kept: a lookup per frame was a system call
        # on CPython 3.11 (see chatd.relay.pool.Pool.loop).
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def put(
        self, frame: bytes, seq: int = 0, reply_to: str | None = None, *, again: bool = False
    ) -> None:
        """Queue a frame; ``seq`` > 0 marks a stored event, dropped if already sent or replayed
        (unless ``again``: an ``ack``, which a resent message gets once more, protocol.md).

        ``reply_to`` marks the frame as the whole reply to that message: token text of it
        still queued right before is dropped, since the reply carries it all (the protocol
        promises only that the tokens a client saw are a prefix of the reply).
        """
        if self.closed:
            return
        if self._held is not None:
            self._held.append((frame, -seq if again else seq))  # negative: again
            return
        if seq:
            if seq > self._floor + 1 and self._on_gap is not None and not self.was_sent(seq):
                # A stored event below this one has not reached the client (another worker
                # stored it, or another connection of the session sent it): the client gets
                # them in seq order, so this waits, with all that follows, for the log.
                self._held = [(frame, -seq if again else seq)]
                self._on_gap(self._floor)
                return
            if not self._first(seq) and not again:
                return
        queue = self._queue
        if reply_to is not None and queue:
            last = queue[-1]
            if isinstance(last, _Tokens) and last.msg_id == reply_to:
                self._count(-_size(queue.pop()))
        queue.append(frame)
        self._count(len(frame))
        self._kick()

    def token(self, msg_id: str, text: str) -> None:
        """Queue a piece of streamed text, merged with the previous one when still queued."""
        if self.closed:
            return
        if self._held is not None:
            last = self._held[-1][0] if self._held else None
        else:
            last = self._queue[-1] if self._queue else None
        if isinstance(last, _Tokens) and last.msg_id == msg_id:
            last.parts.append(text)
            if self._held is None:
                self._count(len(text))
            return
        item = _Tokens(msg_id, text)
        if self._held is not None:
            self._held.append((item, 0))
            return
        self._queue.append(item)
        self._count(len(text))
        self._kick()

    def hold(self) -> None:
        """Hold live frames back until :meth:`release` (used while replaying the log)."""
        self._held = []

    def release(
        self, replayed_upto: int, replay: Sequence[bytes] = (), *, gaps: bool = True
    ) -> None:
        """Queue ``replay`` (every stored event up to ``replayed_upto``, minus those sent
        already), then the held frames but the stored events already sent or replayed. A held
        one that leaves a gap below it starts holding again (``on_gap``), unless ``gaps`` is
        false (the log could not be read: what is held goes out as it is)."""
        held, self._held = self._held or [], None
        self.advance(replayed_upto)
        if self.closed:
            return
        self._queue.extend(replay)
        self._count(sum(map(len, replay)))
        on_gap = self._on_gap
        if not gaps:
            self._on_gap = None
        try:
            for item, seq in held:
                if self._held is not None:  # a gap again: the rest waits behind it
                    self._held.append((item, seq))
                elif isinstance(item, _Tokens):
                    self._queue.append(item)
                    self._count(_size(item))
                else:
                    self.put(item, abs(seq), again=seq < 0)
        finally:
            self._on_gap = on_gap
        if self._queue:
            self._kick()

    def discard_held(self) -> None:
        """Drop the frames held back since :meth:`hold` (a resume that failed: they belong to
        a session the connection was not welcomed to), and stop holding."""
        self._held = None

    @property
    def holding(self) -> bool:
        """True between :meth:`hold` and :meth:`release`."""
        return self._held is not None

    @property
    def floor(self) -> int:
        """Every stored event with a seq up to this one was sent (or replayed) already."""
        return self._floor

    def advance(self, upto: int) -> None:
        """Record that every stored event up to ``upto`` was queued (a replay, or a forward
        from the log); a lower ``upto`` changes nothing, and so does any while holding (the
        held frames were not sent: the release that ends the hold says what was)."""
        if upto > self._floor and self._held is None:
            self._floor = upto
            if self._sent:
                self._sent = {seq for seq in self._sent if seq > upto}
                self._compact()

    def _compact(self) -> None:
        """Raise the floor over the seqs sent right above it (a gap is then ``floor + 1``)."""
        sent, floor = self._sent, self._floor
        if sent:
            while floor + 1 in sent:
                floor += 1
                sent.discard(floor)
            self._floor = floor

    def sent_state(self, limit: int) -> tuple[int, tuple[int, ...]]:
        """What was sent, compactly, for a connection that moves to another worker
        (:mod:`chatd.proto.adoption`): the floor raised over the seqs sent contiguously above
        it, and at most ``limit`` seqs sent above that (beyond, the oldest are given up, as
        past MAX_SENT: never resent)."""
        floor, rest = self._floor, sorted(self._sent or ())  # compact: floor + 1 is not sent
        if len(rest) > limit:
            floor, rest = rest[-limit - 1], rest[-limit:]
        return floor, tuple(rest)

    def restore(self, floor: int, sent: Sequence[int]) -> None:
        """Start from another worker's record of what was sent (a moved connection)."""
        self._floor = floor
        self._sent = {seq for seq in sent if seq > floor} or None
        self._compact()

    def flush(self) -> None:
        """Write what is queued now rather than at the end of the tick (a connection about
        to move: its reply, just queued, goes out before it leaves)."""
        if self._queue and self._writer is None and self._held is None:
            self._flush()

    @property
    def idle(self) -> bool:
        """Nothing queued, held or being written: a connection may move now."""
        return not (self._queue or self._held is not None or self._writer or self._scheduled)

    def was_sent(self, seq: int) -> bool:
        """Whether the stored event ``seq`` was sent (or replayed) on this connection."""
        return seq <= self._floor or (self._sent is not None and seq in self._sent)

    def _first(self, seq: int) -> bool:
        """True (and remember it) unless the stored event ``seq`` was sent already."""
        floor = self._floor
        if seq <= floor:
            return False
        sent = self._sent
        if sent is not None and seq in sent:
            return False
        if seq == floor + 1:  # the usual case (one connection on its session): the floor rises
            self._floor = seq
            self._compact()
            return True
        if sent is None:
            sent = self._sent = set()
        sent.add(seq)
        if len(sent) > MAX_SENT:  # a long connection: forget the oldest (never resent)
            self.advance(min(sent))
        return True

    # -- bounds ---------------------------------------------------------------------------

    def _count(self, n: int) -> None:
        """``n`` bytes were queued (or, negative, taken off the queue); in the slow path, close
        the outbox when a bound is passed."""
        self._bytes += n
        budget = self._budget
        budget.total += n
        if n > 0 and self._writer is not None and not self.closed:
            unread = self._bytes + self._sink.buffered()
            if unread > budget.per_connection or budget.total > budget.per_worker:
                self._overflow(unread)

    def _overflow(self, unread: int) -> None:
        budget = self._budget
        budget.overflows += 1
        total = budget.total
        self.close()
        if self._on_overflow is not None:
            self._on_overflow(unread, total)

    @property
    def queued_bytes(self) -> int:
        """Bytes queued and not yet handed to the connection."""
        return self._bytes

    # -- writing --------------------------------------------------------------------------

    def _kick(self) -> None:
        """Something was queued: flush at the end of this tick (unless the writer task runs:
        it takes the new frames in order)."""
        if not self._scheduled and self._writer is None:
            self._scheduled = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        queue = self._queue
        if self.closed or self._writer is not None or not queue:
            return
        if self._sink.writable():
            frames = [_frame(item) for item in queue]
            queue.clear()
            self._count(-self._bytes)
            try:
                self._sink.write(frames)
            except Exception as exc:  # the connection broke: its reader sees it close
                log.debug("write failed (%r): the connection is closing", exc)
                self._fail()
            else:
                # One large batch (a long replay) goes to the socket's buffer at once: a client
                # that then reads nothing is over its bound there, with nothing more queued.
                buffered = self._sink.buffered()
                if buffered > self._budget.per_connection:
                    self._overflow(buffered)
            self._wake_waiters()
        else:
            self._writer = asyncio.get_running_loop().create_task(self._write_slowly())

    async def _write_slowly(self) -> None:
        """The slow path: one frame at a time, each waiting for flow control, until the queue
        is empty; the rest at once as soon as the socket takes data again."""
        queue, sink = self._queue, self._sink
        try:
            while queue and not self.closed:
                if sink.writable():
                    frames = [_frame(item) for item in queue]
                    queue.clear()
                    self._count(-self._bytes)
                    sink.write(frames)
                    break
                item = queue.pop(0)
                self._count(-_size(item))
                await sink.send(_frame(item))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # closed or failed: its reader sees it close
            log.debug("write failed (%r): the connection is closing", exc)
            self._fail()
        finally:
            self._writer = None
            self._wake_waiters()

    def _fail(self) -> None:
        self.closed = True
        self._queue.clear()
        self._count(-self._bytes)

    def _wake_waiters(self) -> None:
        if self._waiters and (self.closed or (not self._queue and self._writer is None)):
            waiters, self._waiters = self._waiters, None
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    async def wait_empty(self) -> None:
        """Wait until every queued frame has been written, or the outbox closed (bound it
        with asyncio.timeout). Held frames do not count."""
        if self.closed or (not self._queue and self._writer is None):
            return
        fut = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        await fut

    def close(self) -> None:
        """The connection ended: drop what is queued, stop the writer task (not awaited: it
        holds nothing to clean up), wake the waiters. Idempotent."""
        self._fail()
        if self._writer is not None:
            self._writer.cancel()
        self._wake_waiters()
