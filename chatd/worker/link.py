"""Worker side of the master link: the worker's end of the socketpair the master made for it.

A worker uses it like this (``spec`` is its :class:`chatd.spec.WorkerSpec`)::

    link = MasterLink.from_spec(spec)
    await link.start(on_command, on_master_gone)   # sends hello {slot, pid, gen}
    ...                                            # start serving on spec.listener
    link.send_ready()
    link.start_reporting(get_stats)                # stats every second = the heartbeat

What the worker must do with what arrives (``on_command`` gets each message as a dict):

* ``{"t": "drain", "timeout": s, "handover": bool}``: call :meth:`MasterLink.send_draining`,
  stop accepting, finish the replies in flight, close clients with 1001, exit 0 within
  ``timeout``; ``handover`` (reload, recycle, scale: other workers go on serving) closes a
  late hello with a bare 1001 instead of a ``shutting_down`` error; ``successor`` (a pid, with
  ``handover``): move the open WebSockets to that worker instead (:mod:`chatd.worker.mover`);
* ``{"t": "stop"}``: exit now;
* the LLM slot messages (``MasterSlots.MESSAGES``: ``slot_grant``, ``slot_queued``,
  ``slot_refused``, ``slot_recall``): hand them to its :class:`chatd.worker.slots.MasterSlots`
  of the message's slot class (:func:`chatd.worker.slots.dispatch`);
* anything else: ignore it (later versions of the master may send more).

A worker may also ask the master something and await the answer with :meth:`MasterLink.request`
(``metrics_request`` -> ``metrics``); those answers never reach ``on_command``.

``on_master_gone`` is called once when the link ends (EOF, error, or garbage from the master):
the master is dead, so the worker should stop at once (no one would replace or supervise it).
The master also signals as a fallback: SIGTERM means drain, SIGQUIT and SIGINT mean stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

from chatd.errors import ControlError
from chatd.proto import control as proto
from chatd.spec import WorkerSpec

log = logging.getLogger("chatd.link")


class _LinkProtocol(asyncio.Protocol):
    def __init__(self, link: MasterLink) -> None:
        self._link = link

    def data_received(self, data: bytes) -> None:
        self._link._data_received(data)

    def eof_received(self) -> bool:
        self._link._gone("EOF")
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._link._gone(str(exc) if exc else "closed")


class MasterLink:
    """The worker's framed connection to its master, on the worker's event loop.

    Args:
        sock: the worker's end of the socketpair (``WorkerSpec.link``).
        slot: the worker's slot (1-based) and
        generation: its generation: with both, :meth:`start` sends ``hello {slot, pid, gen}``
            (the master logs a mismatch). :meth:`from_spec` fills them in.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        slot: int | None = None,
        generation: int | None = None,
        max_frame: int = proto.MAX_FRAME,
    ) -> None:
        self.slot = slot
        self.generation = generation
        self._sock = sock
        self._decoder = proto.Decoder(max_frame)
        self._max_frame = max_frame
        self._transport: asyncio.Transport | None = None
        self._on_command: Callable[[dict[str, Any]], None] = lambda msg: None
        self._on_master_gone: Callable[[], None] = lambda: None
        self._gone_called = False
        self._reporter: asyncio.Task[None] | None = None
        self._requests: dict[int, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._next_rid = 0

    @classmethod
    def from_spec(cls, spec: WorkerSpec) -> MasterLink:
        return cls(spec.link, slot=spec.slot, generation=spec.generation)

    @property
    def connected(self) -> bool:
        """True until the link has ended (or :meth:`close` was called)."""
        return self._transport is not None and not self._gone_called

    async def start(
        self,
        on_command: Callable[[dict[str, Any]], None],
        on_master_gone: Callable[[], None],
    ) -> None:
        """Attach the socket to the running loop and send ``hello`` (when slot and generation
        are known).

        Args:
            on_command: called with each message from the master, in order.
            on_master_gone: called once, when the link ends for any reason other than
                :meth:`close`.
        """
        self._on_command = on_command
        self._on_master_gone = on_master_gone
        loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        transport, _ = await loop.create_unix_connection(
            lambda: _LinkProtocol(self), sock=self._sock
        )
        self._transport = transport
        if self.slot is not None and self.generation is not None:
            self.send(proto.hello(self.slot, os.getpid(), self.generation))

    def send(self, msg: Mapping[str, Any]) -> bool:
        """Queue ``msg`` for the master without blocking; False if the link is down.

        The transport buffers what the socket does not take at once; the master reads
        continuously, so the buffer stays small.
        """
        if self._transport is None or self._transport.is_closing():
            return False
        self._transport.write(proto.encode(msg, max_frame=self._max_frame))
        return True

    async def request(self, msg: Mapping[str, Any], answer: str, within: float) -> dict[str, Any]:
        """Send ``msg`` with a fresh ``rid`` and return the master's ``answer`` with that rid.

        Raises:
            TimeoutError: no answer ``within`` seconds (a late one is dropped).
            ConnectionError: the link is down, or ends before the answer.
        """
        self._next_rid += 1
        rid = self._next_rid
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if not self.send({**msg, "rid": rid}):
            raise ConnectionError("the master link is down")
        self._requests[rid] = (answer, future)
        try:
            async with asyncio.timeout(within):
                return await future
        finally:
            self._requests.pop(rid, None)

    def send_ready(self) -> bool:
        """Tell the master this worker serves: it becomes ``ready`` in ``chatctl status``."""
        return self.send({proto.T: proto.READY})

    def send_draining(self) -> bool:
        """Acknowledge a drain order (without it, the master sends SIGTERM after a second)."""
        return self.send({proto.T: proto.DRAINING})

    def start_reporting(
        self, get_stats: Callable[[], Mapping[str, Any]], interval: float = 1.0
    ) -> asyncio.Task[None]:
        """Send ``{"t": "stats", **get_stats()}`` now and every ``interval`` seconds.

        The task runs on the worker's event loop, so it is the heartbeat: a loop blocked by a
        long synchronous call stops it, and the master notices. If ``get_stats`` raises, the
        error is logged and a bare ``stats`` still goes out (the heartbeat must not stop).
        """
        if self._reporter is not None:
            self._reporter.cancel()
        self._reporter = asyncio.get_running_loop().create_task(
            self._report(get_stats, interval), name="chatd-master-link-stats"
        )
        return self._reporter

    async def _report(self, get_stats: Callable[[], Mapping[str, Any]], interval: float) -> None:
        while self.connected:
            try:
                stats = dict(get_stats())
            except Exception:
                log.exception("collecting stats for the master failed")
                stats = {}
            stats[proto.T] = proto.STATS
            self.send(stats)
            await asyncio.sleep(interval)

    def close(self) -> None:
        """Stop reporting and close the link; ``on_master_gone`` is not called."""
        self._gone_called = True
        if self._reporter is not None:
            self._reporter.cancel()
            self._reporter = None
        if self._transport is not None:
            self._transport.close()

    def _data_received(self, data: bytes) -> None:
        try:
            messages = self._decoder.feed(data)
        except ControlError as exc:
            log.error("garbage from the master (%s); treating it as gone", exc)
            self._gone(str(exc))
            return
        for msg in messages:
            rid = msg.get("rid")
            waiting = self._requests.get(rid) if isinstance(rid, int) else None
            if waiting is not None and waiting[0] == msg.get(proto.T):
                if not waiting[1].done():
                    waiting[1].set_result(msg)
            else:
                self._on_command(msg)

    def _gone(self, why: str) -> None:
        if self._gone_called:
            return
        self._gone_called = True
        log.info("the master link ended (%s)", why)
        if self._reporter is not None:
            self._reporter.cancel()
            self._reporter = None
        if self._transport is not None:
            self._transport.close()
        for _, future in self._requests.values():
            if not future.done():
                future.set_exception(ConnectionError(f"the master link ended ({why})"))
        self._on_master_gone()
