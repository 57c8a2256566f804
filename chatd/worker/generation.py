"""The sessions a worker serves: who listens to them, and the generation of their replies.

A :class:`Hub` owns, per worker process:

- the *subscribers* of each session and the *live handoff* of replies stored by another
  worker: its base class :class:`chatd.worker.handoff.Listeners`.
- the *generations*: one task per acknowledged message, owned by the hub and not by the
  connection, so a client that disconnects does not stop its reply: the reply is stored and
  replayed on resume.
- the *history cache* (:class:`chatd.worker.history.History`): the recent turns of the sessions it
  served, so a message costs no store read.

- the *leases* of its messages (:mod:`chatd.worker.leases`, contract 6 of the store): every
  message is leased to the worker's store for ``LEASE_S``; one task renews the leases of all
  running generations every ``RENEW_S`` (one batched store call per worker, not a task per
  message) and stops a generation whose lease another worker took. *Takeover*: a message whose
  worker died is claimed once its lease lapsed, by :meth:`Hub.take_over` when its session
  resumes here (the client sees ack ... reply) or by the periodic sweep of some worker
  (:meth:`Hub.run_sweeps`, every ``SWEEP_S`` jittered, one store query across sessions), which
  generates it with nobody subscribed so the reply waits in the log.

Flow of one message (numbered as in DESIGN.md): 2. the user message is appended (dedupe on
its id) and acknowledged by the caller; 3. a slot is acquired (``queued`` frames meanwhile);
4. the backend streams tokens to the subscribers; 5. the reply or the final error is appended
and only then published with its ``seq``; the slot is released.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chatd.config import Config
from chatd.errors import StoreError, UpstreamError
from chatd.logs import about
from chatd.proto import chat
from chatd.relay.backend import Reply
from chatd.relay.generate import Relay
from chatd.stats import Histogram
from chatd.store.base import LEASE_S, Appended, Store
from chatd.worker import leases
from chatd.worker.handoff import Listeners, MasterChannel, Notices
from chatd.worker.history import History
from chatd.worker.slots import KeyBusy, QueueFull, Slots
from chatd.worker.stages import StageClock, Stages

log = logging.getLogger("chatd.generation")

MAX_ATTEMPTS = 3  # per message, only before the first token was forwarded
# Mean seconds between two sweeps of one worker (each jittered to 50-150 %): after a host
# died, its messages are regenerated within LEASE_S + 1.5 SWEEP_S of the kill (2.75 s; the
# goal is 3 s). A sweep is one store query (SQLite: one UPDATE; Redis: one read per lease
# index, and a claim per session found).
SWEEP_S = 0.5
SWEEP_LIMIT = 32  # messages one sweep claims at most (the rest: the next sweep, or others)
CLAIM_LIMIT = 64  # lapsed messages of one session a resume claims at most


@dataclass(slots=True)
class HubStats:
    """Counters reported to the master every second."""

    messages_total: int = 0
    replies_total: int = 0
    takeovers_total: int = 0  # messages claimed after their lease lapsed, and generated here
    errors_by_code: dict[str, int] = field(default_factory=dict)
    latency: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)

    def error(self, code: str) -> None:
        """Count one error frame of ``code`` sent to a client."""
        self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1


class Hub(Listeners):
    """Subscribers, generations and history of the sessions served by one worker."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        relay: Relay,
        slots: Slots,
        master: MasterChannel | None = None,
        notices: Notices | None = None,
    ) -> None:
        """``master``, ``notices``: the live handoff within the host and across hosts
        (:class:`chatd.worker.handoff.Listeners`)."""
        super().__init__(store, master, notices)
        self.cfg = cfg
        self.relay = relay
        self.slots = slots
        self.running: dict[tuple[str, str], asyncio.Task[None]] = {}
        # Messages being stored or generated: a drain waits until there are none.
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # The loop, found at first use and kept (a lookup is a system call on CPython 3.11:
        # chatd.relay.pool.Pool.loop); create_task and call_soon on the hot path use it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cancelled: set[tuple[str, str]] = set()
        # Generations storing their final event: a lost lease no longer stops them (the
        # final is then already being written, and its publication must not be cut).
        self._finishing: set[tuple[str, str]] = set()
        self._watches: set[asyncio.Future[None]] = set()  # watches after a lost lease
        self.sweeping = True  # False once the worker drains: it claims no more messages
        # Called with a session whose last running generation here just ended (set by a
        # drain, which then closes the session's connections).
        self.on_session_done: Callable[[str], None] | None = None
        self.history = History(store, cfg.sessions.history_turns, cfg.llm.system_prompt)
        self.stats = HubStats()
        self.stages = Stages()  # where each message's time goes (chatd.worker.stages)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The worker's event loop, found at first use (the hub serves one loop)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    # -- messages -------------------------------------------------------------------------

    async def submit(
        self, session: str, msg: chat.Message, key: str = "", received: float | None = None
    ) -> Appended:
        """Append a user message; start its generation unless it was already stored.

        ``key`` names the client it comes from (a hash of its token, or its address; never a
        secret): the master's slot queue serves clients round robin and bounds each one.
        Returns the append result; the caller sends the ``ack`` (only after this returned,
        so only after the commit). ``received``: when the frame was handled
        (``time.monotonic()``; now if not given), the start of the message's stages.
        """
        model = msg.model or self.cfg.llm.model
        clock = StageClock(time.monotonic() if received is None else received)
        self._enter()
        try:
            return await self._submit(session, msg, model, key, clock)
        finally:
            self._leave()

    async def _submit(
        self, session: str, msg: chat.Message, model: str, key: str, clock: StageClock
    ) -> Appended:
        appended = await self.store.append_user(session, msg.id, msg.text, model)
        if appended.duplicate:
            return appended
        clock.committed = time.monotonic()
        self.stats.messages_total += 1
        # The history is read (on a cache miss) inside the task, so the ack is not delayed.
        history = self.history.cached(session, appended.seq, msg.text)
        self._start(session, msg.id, model, history, (appended.seq, msg.text), key, clock)
        return appended

    def _start(
        self,
        session: str,
        msg_id: str,
        model: str,
        history: list[dict[str, str]] | None,
        turn: tuple[int, str],
        client: str = "",
        clock: StageClock | None = None,
    ) -> None:
        """``client``: the key of the slot request ("" for a takeover: nobody is connected);
        ``clock``: the message's stage times (None for a takeover: it was received elsewhere)."""
        key = (session, msg_id)
        task = self.loop.create_task(
            self._generate(session, msg_id, model, history, turn, client, clock)
        )
        self.running[key] = task
        self._enter()  # the task keeps the hub busy until it ends
        task.add_done_callback(lambda _t: self._finished(key))

    # -- leases and takeovers -------------------------------------------------------------

    async def take_over(self, session: str | None) -> int:
        """Claim the lapsed unanswered messages of ``session`` (None: of any session, up to
        SWEEP_LIMIT) and generate them here; returns how many were started.

        A claimed message already running here (its lease lapsed while this worker was
        stalled) keeps its generation: the claim just renewed its lease.
        """
        if session is None:
            events = await self.store.claim(None, LEASE_S, SWEEP_LIMIT)
        else:
            events = await self.store.claim(session, LEASE_S, CLAIM_LIMIT)
        started = 0
        for ev in events:
            if (ev.session, ev.msg_id) in self.running:
                continue
            model = ev.meta.get("model")
            self._start(
                ev.session,
                ev.msg_id,
                model if isinstance(model, str) and model else self.cfg.llm.model,
                None,  # the context is read from the store: another worker wrote this session
                (ev.seq, ev.text),
            )
            started += 1
        if started:
            self.stats.takeovers_total += started
            log.info(
                "takeover: %d unanswered messages claimed (%s)",
                started,
                "sweep" if session is None else f"resume of {session[:8]}",
                extra=about(session),
            )
        return started

    async def run_leases(self) -> None:
        """Renew the leases of every running generation until cancelled
        (:func:`chatd.worker.leases.renew_forever`)."""
        await leases.renew_forever(self.store, self.running, self._finishing, self._lease_lost)

    def _lease_lost(self, session: str, task: asyncio.Task[None]) -> None:
        """A generation here lost its lease (this worker stalled a whole lease: another one
        claimed the message and answers it): once it has stopped, watch the session, so the
        reply stored there reaches this worker's clients of it live, not at their next
        resume. (A resume's watch only looks once, when the client resumes.)"""
        task.add_done_callback(lambda _: self._spawn_watch(session))

    def _spawn_watch(self, session: str) -> None:
        watching = asyncio.ensure_future(self._watch_quietly(session))
        self._watches.add(watching)
        watching.add_done_callback(self._watches.discard)

    async def _watch_quietly(self, session: str) -> None:
        try:
            await self.watch(session)
        except StoreError as exc:  # the clients' stall fallback resumes them later
            log.warning("watch of %s after a lost lease failed: %s", session[:8], exc)

    async def run_sweeps(self) -> None:
        """Every SWEEP_S (jittered: workers do not sweep in step), claim lapsed messages of
        any session and generate them, until cancelled or :attr:`sweeping` is off."""
        while True:
            await asyncio.sleep(SWEEP_S * random.uniform(0.5, 1.5))
            if not self.sweeping:
                return
            try:
                await self.take_over(None)
            except Exception as exc:  # a store hiccup: the next sweep tries again
                log.warning("takeover sweep failed: %s", exc)

    async def hand_back(self, keys: list[tuple[str, str]]) -> None:
        """Let the leases of ``keys`` lapse now (:func:`chatd.worker.leases.hand_back`)."""
        await leases.hand_back(self.store, keys)

    def cancel(self, session: str, msg_id: str) -> bool:
        """Stop generating ``msg_id``; its partial reply is stored as ``cancelled``."""
        task = self.running.get((session, msg_id))
        if task is None:
            return False
        self._cancelled.add((session, msg_id))
        task.cancel()
        return True

    def _finished(self, key: tuple[str, str]) -> None:
        self.running.pop(key, None)
        self._cancelled.discard(key)
        self._leave()
        done = self.on_session_done
        if done is not None and not any(s == key[0] for s, _ in self.running):
            done(key[0])

    @property
    def in_flight(self) -> int:
        return len(self.running)

    def _enter(self) -> None:
        self._busy += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until no generation runs and no message is being stored (bound it with
        asyncio.timeout): a message committed while a drain waits is answered, not cut."""
        await self._idle.wait()

    def new_session(self, session: str) -> None:
        """A session this worker just created: its (empty) history needs no store read."""
        self.history.new_session(session)

    # -- generation -----------------------------------------------------------------------

    async def _generate(
        self,
        session: str,
        msg_id: str,
        model: str,
        messages: list[dict[str, str]] | None,
        turn: tuple[int, str],
        client: str,
        clock: StageClock | None = None,
    ) -> None:
        """Steps 3-5 of a message: slot, stream, store the final event, publish it.

        ``messages`` is the model context from the cache, or None to read it from the store;
        ``turn`` is the user message's ``(seq, text)``; ``client`` the key of its slot request.
        """
        t0 = time.monotonic()
        parts: list[str] = []

        def on_token(text: str) -> None:
            parts.append(text)
            for outbox in self.subscribers.get(session, ()):
                outbox.token(msg_id, text)

        def on_notice(code: str, message: str) -> None:
            self._publish(session, chat.notice_frame(msg_id, code, message))

        def on_position(position: int) -> None:
            self._publish(session, chat.queued_frame(msg_id, position))

        try:
            if messages is None:
                messages = await self.history.load(session, *turn)
            reply = await self._attempts(
                model, messages, on_token, on_notice, on_position, parts, client, clock
            )
        except asyncio.CancelledError:
            if (session, msg_id) not in self._cancelled:
                raise  # the worker is stopping: the message stays unanswered for a takeover
            await self._store_reply(session, msg_id, "".join(parts), "cancelled", t0, None)
            return
        except UpstreamError as exc:
            await self._store_error(session, msg_id, exc.code, exc.message)
            return
        except KeyBusy:  # this client's own bound: the others still get their turns
            await self._store_error(
                session,
                msg_id,
                "busy",
                "Too many of your messages are waiting for the model "
                f"({self.cfg.limits.max_queued_per_key} at most per client): "
                "send it again later with a new id.",
            )
            return
        except QueueFull:
            await self._store_error(
                session,
                msg_id,
                "busy",
                f"The LLM queue is full ({self.cfg.llm.max_queue} messages waiting): "
                "send the message again later with a new id.",
            )
            return
        except Exception:
            ref = f"{session[:8]}/{msg_id[:16]}"
            log.exception(
                "generation failed unexpectedly (ref %s)", ref, extra=about(session, msg_id)
            )
            await self._store_error(
                session, msg_id, "internal", f"An internal error occurred (log reference {ref})."
            )
            return
        await self._store_reply(session, msg_id, reply.text, reply.done_reason, t0, reply, clock)

    async def _attempts(
        self,
        model: str,
        messages: list[dict[str, str]],
        on_token: Callable[[str], None],
        on_notice: Callable[[str, str], None],
        on_position: Callable[[int], None],
        parts: list[str],
        client: str,
        clock: StageClock | None = None,
    ) -> Reply:
        """Acquire a slot (for ``client``) and generate; retry elsewhere only before the first
        token. ``clock.granted`` is set at each grant (so a retry's earlier attempts count as
        queueing)."""
        failed: set[int] = set()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            # Every backend failed (retired ones aside): any of them may be tried again.
            live = set(self.relay.live)
            exclude = frozenset(failed) if not live <= failed else frozenset()
            backend = await self.slots.acquire(on_position, exclude, client)
            if clock is not None:
                clock.granted = time.monotonic()
            try:
                return await self.relay.generate(backend, model, messages, on_token, on_notice)
            except UpstreamError as exc:
                if parts or not exc.retryable or attempt == MAX_ATTEMPTS:
                    raise
                # Health is the health checks' call; one failure only steers the retry elsewhere.
                failed.add(backend)
                if exc.code == "llm_timeout" and set(self.relay.live) <= failed:
                    # A backend that let a deadline pass is busy or stuck: asking it again
                    # would make the client wait the deadline twice. Only another one may.
                    raise
                on_notice("retrying", f"{exc.message} Retrying ({attempt + 1}/{MAX_ATTEMPTS}).")
            finally:
                self.slots.release(backend, client)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _store_reply(
        self,
        session: str,
        msg_id: str,
        text: str,
        done_reason: str,
        t0: float,
        reply: Reply | None,
        clock: StageClock | None = None,
    ) -> None:
        total_ms = (time.monotonic() - t0) * 1000.0
        stats: dict[str, Any] = {
            "ttft_ms": round(reply.ttft_ms, 1) if reply else None,
            "total_ms": round(total_ms, 1),
            "tokens": reply.tokens if reply else None,
        }
        if reply is not None and clock is not None:
            stats["stages"] = self.stages.reply_stages(clock, reply.ttft_ms, reply.total_ms)
        meta = {"done_reason": done_reason, "stats": stats}
        self._finishing.add((session, msg_id))
        storing = time.monotonic()
        try:
            appended = await self.store.append_final(session, msg_id, "reply", text, meta)
        finally:
            self._finishing.discard((session, msg_id))
        stored = time.monotonic()
        self.stages.observe("store_reply", stored - storing)
        self.history.reply(session, appended.seq, text)
        self._announce(session, appended.seq)
        self.stats.replies_total += 1
        self.stats.latency.observe(total_ms)
        if reply is not None:
            self.stats.ttft.observe(reply.ttft_ms)
        self._publish(
            session,
            chat.reply_frame(msg_id, appended.seq, text, done_reason, stats),
            appended.seq,
            reply_to=msg_id,
        )
        # The outboxes flush at the end of this tick (their callbacks were queued first):
        # this one runs after them, when the reply is in the subscribers' sockets.
        self.loop.call_soon(lambda: self.stages.observe("publish", time.monotonic() - stored))

    async def _store_error(self, session: str, msg_id: str, code: str, message: str) -> None:
        meta = {"code": code, "retryable": chat.RETRYABLE[code]}
        self._finishing.add((session, msg_id))
        try:
            appended = await self.store.append_final(session, msg_id, "error", message, meta)
        finally:
            self._finishing.discard((session, msg_id))
        self.history.forget(session)  # the error is not a turn: reload the history next time
        self._announce(session, appended.seq)
        self.stats.error(code)
        self._publish(
            session, chat.error_frame(code, message, msg_id=msg_id, seq=appended.seq), appended.seq
        )
