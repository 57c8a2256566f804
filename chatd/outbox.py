"""The frames waiting to be written to one client, with token coalescing.

Frames are queued synchronously (from the relay's token callback, from the store's commit
callback) and written by one writer task per connection, in order. Consecutive ``token``
pieces of the same message that have not been written yet are merged into one frame: a client
that reads slower than the model writes gets fewer, larger frames instead of a growing queue,
and a zero-delay backend costs one frame per read instead of one per token (a WebSocket frame
costs ~15 µs of CPU, DESIGN.md "Where the time goes").

While a resumed connection replays the stored log, live frames are held back and released
after the replay, minus the final events the replay already carried.

A stored event (a frame queued with its ``seq``) reaches a connection at most once: by the
replay, live from the generation on this worker, or forwarded from the log when another
worker stored it (live handoff, :meth:`chatd.generation.Hub.on_stored`). The outbox remembers
a *floor* (every stored event up to it was sent or replayed) and the seqs sent above it, and
drops a stored event it already sent. The floor only rises: at the replay, and when a forward
delivered every final of the log up to some seq (:meth:`Outbox.advance`). Not a plain
"highest seq sent": finals of one session stored by two workers may reach a connection out
of seq order (a local reply with seq 6 published before the forwarded one with seq 5).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from chatd.proto.chat import token_frame

MAX_SENT = 4096  # stored seqs remembered above the floor; beyond, the floor rises to the oldest


class FrameSink(Protocol):
    """The part of a websockets connection the outbox writes to."""

    async def send(self, message: bytes, *, text: bool | None = None) -> None: ...


class _Tokens:
    """Pending token text of one message, not yet turned into a frame."""

    __slots__ = ("msg_id", "parts")

    def __init__(self, msg_id: str, text: str) -> None:
        self.msg_id = msg_id
        self.parts = [text]


class Outbox:
    """An ordered, coalescing queue of frames for one connection, drained by :meth:`run`."""

    def __init__(self, sink: FrameSink) -> None:
        self._sink = sink
        self._queue: deque[bytes | _Tokens] = deque()
        self._wake = asyncio.Event()
        self._held: list[tuple[bytes | _Tokens, int]] | None = None
        self._floor = 0
        self._sent: set[int] = set()
        self._empty = asyncio.Event()
        self._empty.set()
        self.closed = False

    def put(self, frame: bytes, seq: int = 0, reply_to: str | None = None) -> None:
        """Queue a frame; ``seq`` > 0 marks a stored event, dropped if already sent or replayed.

        ``reply_to`` marks the frame as the whole reply to that message: token text of it
        still queued right before is dropped, since the reply carries it all (the protocol
        promises only that the tokens a client saw are a prefix of the reply).
        """
        if self.closed:
            return
        if self._held is not None:
            self._held.append((frame, seq))
            return
        if seq and not self._first(seq):
            return
        queue = self._queue
        if reply_to is not None and queue:
            last = queue[-1]
            if isinstance(last, _Tokens) and last.msg_id == reply_to:
                queue.pop()
        queue.append(frame)
        self._empty.clear()
        self._wake.set()

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
            return
        item = _Tokens(msg_id, text)
        if self._held is not None:
            self._held.append((item, 0))
            return
        self._queue.append(item)
        self._empty.clear()
        self._wake.set()

    def hold(self) -> None:
        """Hold live frames back until :meth:`release` (used while replaying the log)."""
        self._held = []

    def release(self, replayed_upto: int, replay: Sequence[bytes] = ()) -> None:
        """Queue ``replay`` (every stored event up to ``replayed_upto``), then the held frames
        but the stored events already sent or replayed."""
        held, self._held = self._held or [], None
        self.advance(replayed_upto)
        self._queue.extend(replay)
        for item, seq in held:
            if isinstance(item, _Tokens) or not seq or self._first(seq):
                self._queue.append(item)
        if self._queue:
            self._empty.clear()
            self._wake.set()

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
        from the log); a lower ``upto`` changes nothing."""
        if upto > self._floor:
            self._floor = upto
            self._sent = {seq for seq in self._sent if seq > upto}

    def _first(self, seq: int) -> bool:
        """True (and remember it) unless the stored event ``seq`` was sent already."""
        if seq <= self._floor or seq in self._sent:
            return False
        self._sent.add(seq)
        if len(self._sent) > MAX_SENT:  # a long connection: forget the oldest (never resent)
            self.advance(min(self._sent))
        return True

    async def run(self) -> None:
        """Write queued frames until cancelled or the connection fails."""
        queue, sink = self._queue, self._sink
        while True:
            await self._wake.wait()
            self._wake.clear()
            while queue:
                item = queue.popleft()
                frame = (
                    token_frame(item.msg_id, "".join(item.parts))
                    if isinstance(item, _Tokens)
                    else item
                )
                await sink.send(frame, text=True)
            self._empty.set()

    async def wait_empty(self) -> None:
        """Wait until every queued frame has been written (bound it with asyncio.timeout)."""
        await self._empty.wait()
