"""The leaving side of a connection handoff: a draining worker's open WebSockets move to a
worker of the new generation instead of closing with 1001.

The master's ``drain`` names the worker that takes over (a reload's or recycle's new worker of
the slot, or another worker on a scale-down). :class:`Mover` connects to its handoff socket
(:mod:`chatd.worker.adopter`) and moves each connection when it is *idle*:

- websockets holds nothing of it (:func:`chatd.worker.wsadopt.movable`, checked with reading
  paused: the client's next bytes stay in the kernel, for whoever reads next);
- the chat side neither: the connection is open on a session, its outbox has nothing queued,
  and no reply of that session is being generated on this worker (one mid-reply moves as soon
  as its reply is out: the drain offers it again then).

A connection not idle now is *deferred*: reading resumes and it is offered again a moment
later, until the drain's graceful time is over; then it closes with 1001 as without handoff
(*fell back*). Batches of up to 64 go out as one offer (:mod:`chatd.proto.adoption`); from
the offer to the decision the connection's live frames are held (what was sent travels with
the offer: anything stored after it reaches the client from the log, through the new worker).
Accepted: this worker sends ``commit``, then aborts its transport (``close()`` of its copy:
no FIN, the new worker holds the other); nothing was written or read in between. Refused, or
the channel fails: ``abort`` (when it can still be sent), the held frames are released, reading
resumes, and the connection falls back to 1001 (its client resumes elsewhere, as today).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection

from chatd import faults
from chatd.proto import adoption, chat
from chatd.worker.outbox import Outbox
from chatd.worker.seqpacket import Channel, ChannelClosed, peer_pid
from chatd.worker.session import WorkerState, owner_of
from chatd.worker.wsadopt import movable

log = logging.getLogger("chatd.mover")

_Offered = tuple[ServerConnection, adoption.Moved]

ANSWER_WITHIN = 2.0  # seconds the new worker has to answer an offer
RETRY_S = 0.02  # a connection not idle is offered again after this
PLACED_POLL_S = 0.05  # how often placed() looks (only during a drain)


@dataclass(slots=True)
class MoveStats:
    """What a drain's handoff did (each connection counts once in moved/fell_back)."""

    offered: int = 0
    moved: int = 0
    deferred: int = 0  # times a connection was not idle when its turn came
    fell_back: int = 0  # closed with 1001 instead (refused, failed, or never idle in time)
    aborted: int = 0  # offers that ended in abort (refused or failed)
    started: float = 0.0
    finished: float = 0.0

    def to_wire(self) -> dict[str, float]:
        return {
            "offered": self.offered,
            "moved": self.moved,
            "deferred": self.deferred,
            "fell_back": self.fell_back,
            "aborted": self.aborted,
            "ms": round((self.finished - self.started) * 1000, 1) if self.finished else 0.0,
        }


class Mover:
    """Move a draining worker's connections to ``target_pid`` (see the module docstring).

    Args:
        state: the worker's connections and hub.
        fallback: close one connection with 1001 (and the reason), as a drain does without
            handoff.
        deadline: the monotonic time after which nothing more is offered.
    """

    def __init__(
        self,
        state: WorkerState,
        fallback: Callable[[ServerConnection, str], None],
        deadline: float,
    ) -> None:
        self._state = state
        self._fallback = fallback
        self._deadline = deadline
        self._channel: Channel | None = None
        self._waiting: dict[ServerConnection, None] = {}  # to offer, in order
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._next_id = 0
        self._moving = False  # a batch is between its offer and its decision
        self._given_up: set[ServerConnection] = set()  # closing with 1001 instead
        self._progress = asyncio.Event()  # set after each pass (settle() waits for it)
        self.stats = MoveStats(started=time.monotonic())

    async def connect(self, name: str, target_pid: int) -> bool:
        """Open the channel to the adopting worker; False (logged) if it cannot be reached or is
        not ``target_pid`` (an abstract name can be taken by anyone: the pid is checked)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, name)
            pid, uid = peer_pid(sock)
        except OSError as exc:
            sock.close()
            log.warning("handoff to pid %d impossible (%s): closing with 1001", target_pid, exc)
            return False
        if pid != target_pid or uid != os.getuid():
            sock.close()
            log.warning(
                "handoff socket of pid %d is held by pid %d (uid %d): not used",
                *(target_pid, pid, uid),
            )
            return False
        self._channel = Channel(sock, adoption.MAX_MESSAGE)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return True

    def offer(self, ws: ServerConnection) -> None:
        """Move ``ws`` as soon as it is idle (or fall back at the deadline)."""
        if ws in self._given_up:
            return  # closing with 1001 already
        if self._channel is None:
            self._give_up(ws, "server going away: resume elsewhere")
            return
        self._waiting[ws] = None
        self._wake.set()

    async def settle(self) -> None:
        """Wait until every connection offered so far moved or fell back (bound it with a
        timeout: connections that never become idle keep it waiting)."""
        while (self._waiting or self._moving) and self._channel is not None:
            self._progress.clear()
            await self._progress.wait()

    async def placed(self) -> None:
        """Until every connection of the worker has moved or is falling back (those left wait
        for their reply to end, or never become movable: bound this with a timeout)."""
        state = self._state
        while self._channel is not None and any(
            ws not in state.handed_off and ws not in self._given_up for ws in state.connections
        ):
            self._progress.clear()
            with contextlib.suppress(TimeoutError):  # a busy one comes back by session_done
                async with asyncio.timeout(PLACED_POLL_S):
                    await self._progress.wait()

    async def finish(self) -> None:
        """The graceful time is over: whatever waits falls back to 1001; the channel closes."""
        self._deadline = 0.0
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        self._close()

    def _close(self) -> None:
        for ws in list(self._waiting):
            self._give_up(ws, "server going away: resume elsewhere")
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if not self.stats.finished:
            self.stats.finished = time.monotonic()
        self._progress.set()

    async def _run(self) -> None:
        try:
            while self._channel is not None:
                if time.monotonic() >= self._deadline:
                    return
                if not self._waiting:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, self._deadline - time.monotonic())):
                            await self._wake.wait()
                    continue
                batch, later = self._prepare()
                for ws in later:  # offered again after a moment
                    if ws in self._state.connections:
                        self._waiting[ws] = None
                if batch:
                    self._moving = True
                    try:
                        await self._move(batch)
                    finally:
                        self._moving = False
                self._progress.set()
                if later and not batch:
                    await asyncio.sleep(RETRY_S)
        except ChannelClosed as exc:
            log.warning("handoff channel failed (%s): the rest close with 1001", exc)
        finally:
            self._close()

    def _prepare(self) -> tuple[list[_Offered], list[ServerConnection]]:
        """Take up to a batch of idle connections off the waiting list, paused and held; the
        others come back later. One connection's trouble is its own: it falls back alone."""
        batch: list[_Offered] = []
        later: list[ServerConnection] = []
        busy = {session for session, _ in self._state.hub.running}
        while self._waiting and len(batch) < adoption.MAX_BATCH:
            ws = next(iter(self._waiting))
            del self._waiting[ws]
            entry = self._state.connections.get(ws)
            if entry is None:
                continue  # gone meanwhile
            # Resumed only if paused here: websockets pauses a reader whose queue is full.
            reading = ws.transport.is_reading()
            ws.transport.pause_reading()
            try:
                verdict = self._examine(ws, *entry, busy)
            except Exception as exc:  # a bug or an odd client: this one stays, falls back
                log.warning("handoff: a connection cannot move (%r): it closes with 1001", exc)
                verdict = "give up"
            if isinstance(verdict, adoption.Moved):
                batch.append((ws, verdict))
                continue
            if reading:
                ws.transport.resume_reading()
            if verdict == "give up":
                self._give_up(ws, "server going away: resume elsewhere")
            elif verdict == "busy":
                # Offered again by the drain when the session's last reply here is out
                # (Hub.on_session_done): nothing to poll meanwhile.
                self.stats.deferred += 1
            else:
                self.stats.deferred += 1
                later.append(ws)
        return batch, later

    def _examine(
        self, ws: ServerConnection, conn: chat.ChatConnection, outbox: Outbox, busy: set[str]
    ) -> adoption.Moved | str:
        """With reading paused: the connection's state, ready to travel (then it is held), or
        why not now (``busy``: its reply runs; ``give up``: it never will; else a reason to
        try again in a moment)."""
        outbox.flush()  # a reply just queued goes out now, from here
        why = movable(ws)
        if why == "compression":
            return "give up"
        if why is None and (conn.state is not chat.State.OPEN or conn.session is None):
            why = "no session yet"
        if why is None and conn.session in busy:
            return "busy"
        if why is None and not outbox.idle:
            why = "frames being written"
        if why is not None:
            return why
        assert conn.session is not None
        now = time.monotonic()
        tokens, refill_age = conn.limiter_state(now)
        floor, sent = outbox.sent_state(adoption.MAX_SENT)
        peer = ws.remote_address
        request = ws.request
        # As the handshake read it (worker/http.py): every Origin header, joined.
        origin = ",".join(request.headers.get_all("Origin")) or None if request else None
        self._next_id += 1
        moved = adoption.Moved(
            id=self._next_id,
            session=conn.session,
            owner=owner_of(ws, self._state.auth_on),
            floor=floor,
            sent=sent,
            tokens=tokens,
            refill_age=refill_age,
            bad_in_a_row=conn.bad_in_a_row,
            peer=(str(peer[0]), int(peer[1])) if peer else ("", 0),
            origin=origin,
            age=max(0.0, now - conn.opened),
            watched=conn.session in self._state.hub.watching,
        )
        adoption.moved_from_wire(moved.to_wire())  # what the new worker would refuse: here
        if ws.keepalive_task is not None:
            ws.keepalive_task.cancel()
            ws.keepalive_task = None
        outbox.hold()
        return moved

    async def _move(self, batch: list[_Offered]) -> None:
        try:
            await self._offer(batch)
        except BaseException:
            # Whatever failed, no connection may stay paused and held: those not committed
            # stay here (and fall back to 1001).
            self._undo([(ws, m) for ws, m in batch if ws not in self._state.handed_off], "")
            raise

    async def _offer(self, batch: list[_Offered]) -> None:
        assert self._channel is not None
        channel = self._channel
        fds = [ws.transport.get_extra_info("socket").fileno() for ws, _ in batch]
        self.stats.offered += len(batch)
        refused: dict[int, str] = {}
        accepted: set[int] = set()
        try:
            await faults.handoff_stall("offer")
            async with asyncio.timeout(ANSWER_WITHIN):  # the successor must keep up
                await channel.send(adoption.offer([m for _, m in batch]), fds)
                data, extra = await channel.recv()
            for fd in extra:  # an answer carries none
                os.close(fd)
            msg = adoption.decode(data, len(extra))
            if msg.kind != adoption.ANSWER:
                raise adoption.AdoptionError(f"expected an answer, got {msg.kind!r}")
            accepted = set(msg.ids)
            refused = dict(msg.refused or {})
        except (TimeoutError, ChannelClosed, adoption.AdoptionError) as exc:
            self._undo(batch, f"handoff failed ({exc or 'no answer'})")
            with contextlib.suppress(ChannelClosed, TimeoutError):
                async with asyncio.timeout(ANSWER_WITHIN):
                    await channel.send(adoption.abort([m.id for _, m in batch]))
            raise ChannelClosed(str(exc) or "no answer in time") from None
        ids = self._state.connections
        give = [(ws, m) for ws, m in batch if m.id in accepted and ws in ids]
        keep = [(ws, m) for ws, m in batch if m.id not in accepted or ws not in ids]
        try:
            if keep:
                self.stats.aborted += 1
                for ws, moved in keep:
                    self._undo([(ws, moved)], refused.get(moved.id, "server going away: resume"))
                async with asyncio.timeout(ANSWER_WITHIN):
                    await channel.send(adoption.abort([m.id for _, m in keep]))
            if give:
                await faults.handoff_stall("commit")
                async with asyncio.timeout(ANSWER_WITHIN):
                    await channel.send(adoption.commit([m.id for _, m in give]))
        except (ChannelClosed, TimeoutError):
            self._undo(give, "handoff failed: the new worker is gone")
            raise
        # Committed: from here this worker does no I/O on them. Its copy of each socket closes
        # (no FIN: the new worker holds the socket) and its session loop ends quietly.
        for ws, _ in give:
            self._state.handed_off.add(ws)
            ws.transport.abort()
        self.stats.moved += len(give)

    def _undo(self, batch: list[_Offered], why: str) -> None:
        """The connections stay here: release their frames, resume, and close with 1001
        (idempotent: a connection already undone is left as it is)."""
        for ws, _ in batch:
            if ws in self._given_up:
                continue
            entry = self._state.connections.get(ws)
            if entry is not None:
                _, outbox = entry
                if outbox.holding:
                    outbox.release(outbox.floor)
                if not ws.transport.is_closing():
                    ws.transport.resume_reading()
            self._give_up(ws, why or "server going away: resume elsewhere")

    def _give_up(self, ws: ServerConnection, why: str) -> None:
        self._waiting.pop(ws, None)
        self._given_up.add(ws)
        self.stats.fell_back += 1
        self._fallback(ws, why[:120])
