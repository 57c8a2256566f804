"""Who listens to a session on this worker, and the live handoff of replies stored elsewhere.

:class:`Listeners` is the base of :class:`chatd.worker.generation.Hub` that holds:

- the *subscribers* of each session: the outboxes of this worker's connections resumed on it.
  A generation publishes its queue positions, notices, tokens and the final event to every
  subscriber of its session (:meth:`Listeners._publish`), so a client that reconnects to the
  same worker mid-reply gets the rest live.
- the *live handoff* of replies generated elsewhere: a client that resumes here while another
  worker (the one it left, or a sweep) still generates its reply gets the reply when it is
  stored, without polling. The resume asks the master to *watch* the session
  (:meth:`Listeners.watch`); a worker that stores a final event of a session with no
  subscriber of its own tells the master ``stored {session, seq}`` (:meth:`_announce`: one
  small link message per such reply, none when the client listens on the generating worker);
  the master forwards it to the workers watching the session, which read the new finals from
  the log and publish them (:meth:`Listeners.on_stored`). Tokens are not forwarded, only the
  final events.
- the same *across hosts*, with a Redis store (:class:`Notices`,
  :mod:`chatd.store.redis_notify`): the watch also subscribes to the session's notices in
  Redis, and the announce also publishes there, since the worker that generates the reply may
  be on another host, under another master. Both registrations are made before the log is read
  again (either is enough); a notice reaching a watcher by both paths is read once more at
  most, and each outbox sends an event once. Within a host the master's forward stays the fast
  path (one link message, no Redis round trip), and the only path with SQLite (one host).
  Tokens do not cross hosts either: a watcher that joins mid-reply would have to be sent the
  text generated so far to keep the promise that the tokens a client sees are a prefix of the
  reply, and every piece of a reply whose client left would cost a PUBLISH (nobody knows
  whether some host watches it): the reply comes whole, when stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from chatd.errors import StoreError
from chatd.logs import about
from chatd.proto import chat
from chatd.proto import control as proto
from chatd.store.base import Store
from chatd.worker.outbox import Outbox

log = logging.getLogger("chatd.generation")

WATCH_WITHIN = 2.0  # seconds the master has to register a watch (else: the client's fallback)


class MasterChannel(Protocol):
    """What the hub needs of the master link (:class:`chatd.worker.link.MasterLink`)."""

    def send(self, msg: Mapping[str, Any]) -> bool: ...

    async def request(
        self, msg: Mapping[str, Any], answer: str, within: float
    ) -> dict[str, Any]: ...


class Notices(Protocol):
    """What the hub needs of the cross-host notices of stored finals
    (:class:`chatd.store.redis_notify.StoredNotices`, whose docstrings are the contract)."""

    published_total: int
    received_total: int
    lost_total: int

    def publish(self, session: str, seq: int) -> None: ...

    async def watch(self, session: str, within: float) -> bool: ...

    def unwatch(self, session: str) -> None: ...


class Listeners:
    """The subscribers of each session and the live handoff (see the module docstring).

    ``running`` is the subclass's: the generations in progress here, by (session, msg_id).
    """

    running: dict[tuple[str, str], asyncio.Task[None]]

    def __init__(
        self, store: Store, master: MasterChannel | None, notices: Notices | None = None
    ) -> None:
        """``master``: the link for the live handoff within the host; ``notices``: across
        hosts (a Redis store), whose callback is :meth:`on_stored`. Without either (one
        process, tests) a client resumed here gets a reply stored elsewhere only at its next
        resume."""
        self.store = store
        self.master = master
        self.notices = notices
        self.subscribers: dict[str, list[Outbox]] = {}
        # Sessions the master forwards stored{} of to this worker (until their last
        # subscriber here leaves), and the forwards in progress (one per session at a time;
        # a stored{} arriving meanwhile makes it read the log once more).
        self.watching: set[str] = set()
        self._forwarding: dict[str, asyncio.Task[None]] = {}
        self._forward_again: set[str] = set()

    def subscribe(self, session: str, outbox: Outbox) -> None:
        # A list, not a set: nearly every session has one subscriber, and an empty set
        # costs ~200 bytes more per open session.
        subs = self.subscribers.setdefault(session, [])
        if outbox not in subs:
            subs.append(outbox)

    def unsubscribe(self, session: str, outbox: Outbox) -> None:
        """Stop publishing ``session`` to ``outbox``; after the last subscriber, stop
        watching the session (``unwatch``)."""
        subs = self.subscribers.get(session)
        if subs is not None:
            if outbox in subs:
                subs.remove(outbox)
            if not subs:
                del self.subscribers[session]
                if session in self.watching:
                    self._unwatch(session)

    def _unwatch(self, session: str) -> None:
        self.watching.discard(session)
        if self.master is not None:
            self.master.send({proto.T: proto.UNWATCH, "session": session})
        if self.notices is not None:
            self.notices.unwatch(session)

    # -- live handoff ---------------------------------------------------------------------

    async def watch(self, session: str) -> bool:
        """After a resume of ``session`` here (and its takeover claim): if a message of it is
        unanswered and not generated here, have the ``stored`` notices of the session sent to
        this worker (by the master, from the workers of this host; by Redis, from any host),
        then publish what was stored meanwhile. Returns True if the session is (now) watched.

        The watch is registered (the master answered, Redis confirmed the subscription)
        before the log is read again, so a final stored elsewhere is either in that read or
        announced after the registration: never missed. When nothing is left to watch, the
        log is read once more too: a final stored elsewhere after the caller's read and
        before this look was announced to nobody (seen when a handoff failed at commit and
        the old worker answered a message while its client resumed here). Registered by one
        path only (the other failed or is absent): watched by that one. No path, no
        subscriber left, or neither registered in WATCH_WITHIN: not watched (the client's
        stall fallback remains). Raises StoreError (store reads).
        """
        if (self.master is None and self.notices is None) or session not in self.subscribers:
            return False
        if session in self.watching:
            return True
        pending = await self.store.unanswered(session)
        if all((session, ev.msg_id) in self.running for ev in pending):
            # Not watched. A final stored elsewhere since the caller read the log (its notice
            # went to nobody: nobody watched yet) is in neither read: read once more.
            await self._forward(session)
            return False
        if session not in self.subscribers:  # the client left during the read
            return False
        self.watching.add(session)
        by_master, by_redis = await asyncio.gather(
            self._watch_master(session), self._watch_redis(session)
        )
        if not (by_master or by_redis):
            if session in self.watching:
                self._unwatch(session)
            return False
        await self._forward(session)
        return True

    async def _watch_master(self, session: str) -> bool:
        if self.master is None:
            return False
        try:
            await self.master.request(
                {proto.T: proto.WATCH, "session": session}, proto.WATCHING, WATCH_WITHIN
            )
        except (TimeoutError, ConnectionError) as exc:
            log.warning(
                "watch of %s not registered by the master (%s)",
                session[:8],
                exc or "timeout",
                extra=about(session),
            )
            self.master.send({proto.T: proto.UNWATCH, "session": session})  # if it was late
            return False
        return True

    async def _watch_redis(self, session: str) -> bool:
        if self.notices is None:
            return False
        if await self.notices.watch(session, WATCH_WITHIN):
            return True
        if session in self.watching:  # (not when its client left meanwhile)
            log.warning(
                "watch of %s not confirmed by Redis within %gs: replies stored on other hosts "
                "reach it when Redis answers, or at its next resume",
                session[:8],
                WATCH_WITHIN,
                extra=about(session),
            )
        return False

    def on_stored(self, session: str, seq: int = 0) -> None:
        """A final of ``session`` was stored elsewhere with ``seq`` (the master forwarded
        ``stored``, or a notice came through Redis; 0: unknown, maybe several): publish the
        finals of ``session`` stored since its subscribers' floors (in a task; coalesced per
        session). Nothing to do when every subscriber that takes part (not replaying) was
        sent ``seq`` already: the same notice by the other path, after the first was read."""
        subs = self.subscribers.get(session)
        if not subs:
            return
        if seq > 0 and all(o.holding or o.was_sent(seq) for o in subs):
            return
        task = self._forwarding.get(session)
        if task is not None and not task.done():
            self._forward_again.add(session)  # read once more after the read in progress
            return
        task = asyncio.create_task(self._forwards(session))
        self._forwarding[session] = task
        task.add_done_callback(lambda done: self._forwarded(session, done))

    def _forwarded(self, session: str, task: asyncio.Task[None]) -> None:
        if self._forwarding.get(session) is task:
            del self._forwarding[session]

    async def _forwards(self, session: str) -> None:
        while True:
            self._forward_again.discard(session)
            try:
                await self._forward(session)
            except StoreError as exc:  # the client's stall fallback resumes it later
                log.warning(
                    "forwarding the replies of %s failed: %s",
                    session[:8],
                    exc,
                    extra=about(session),
                )
            if session not in self._forward_again:
                return

    async def _forward(self, session: str) -> None:
        """Publish the final events of ``session`` stored after the lowest floor of its
        subscribers (each outbox drops those it already sent), then raise the floors of the
        subscribers that took part. A subscriber still replaying (holding) takes no part: its
        own replay reads the log after it subscribed."""
        subs = [o for o in self.subscribers.get(session, ()) if not o.holding]
        if not subs:
            return
        events = await self.store.events_after(session, min(o.floor for o in subs))
        for ev in events:  # user messages too: each connection gets every seq, in order
            frame = chat.stored_event_frame(ev.kind, ev.msg_id, ev.seq, ev.text, ev.meta)
            reply_to = ev.msg_id if ev.kind == "reply" else None
            self._publish(session, frame, ev.seq, reply_to)
        if events:
            current = self.subscribers.get(session, [])
            for outbox in subs:
                # Not one that began holding meanwhile (a gap fill or a resume reads the log
                # itself): what this forward published waits in its held frames, unsent.
                if outbox in current and not outbox.holding:
                    outbox.advance(events[-1].seq)

    def _announce(self, session: str, seq: int) -> None:
        """A final of ``session`` was stored with ``seq``: tell the master, and the other
        hosts through Redis, when no client of the session listens here (one resumed
        elsewhere may be watching it)."""
        if self.subscribers.get(session):
            return
        if self.master is not None:
            self.master.send({proto.T: proto.STORED, "session": session, "seq": seq})
        if self.notices is not None:
            self.notices.publish(session, seq)

    def _publish(
        self, session: str, frame: bytes, seq: int = 0, reply_to: str | None = None
    ) -> None:
        for outbox in self.subscribers.get(session, ()):
            outbox.put(frame, seq, reply_to)
