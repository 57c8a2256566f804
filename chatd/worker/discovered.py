"""Backends from DNS, a worker's side: resolving for the master, and following its sets.

The master resolves the dns tables' names through the workers and tells each worker the
addresses of each table (:mod:`chatd.master.discovery`); this module handles the two
messages of that (:data:`Discovered.MESSAGES`):

* ``resolve {rid, host, nameservers}``: resolve the name (:func:`chatd.relay.resolve.resolve`)
  in a task, answer ``resolved {rid, ok, addresses, error}``. Nothing else here uses the
  answer: only the master's verdict counts, so every worker and the master agree.
* ``backends {sets}``: apply it to the worker's table (:class:`chatd.backendtable.BackendTable`,
  the same steps as the master's replica of it), then to the relay and to the slots of each
  class, index for index: a new address is appended (its model prewarmed, as at start), a
  gone one retired (its requests in flight finish; nothing new goes to it), one back
  revived.

A retired backend's connections are closed once nothing has run on it for
:data:`CLOSE_AFTER` seconds and it holds no slot of either class (:meth:`Discovered.sweep`,
every :data:`SWEEP_EVERY` seconds); they open again if it is revived.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from chatd.backendtable import BackendTable
from chatd.proto import control as proto
from chatd.relay.generate import Relay
from chatd.relay.resolve import resolve
from chatd.worker.slots import MasterSlots

log = logging.getLogger("chatd.worker")

CLOSE_AFTER = 60.0
"""Seconds after its retirement before an idle retired backend's connections are closed
(longer than a catalog request to it, which holds no slot, may take)."""

SWEEP_EVERY = 5.0
"""Seconds between two looks for retired backends to close."""


class Discovered:
    """The worker's table of backends and what follows it (see the module).

    Args:
        table: the worker's table, built from its configuration (the relay and ``slots``
            were built from its entries, in order).
        relay: the worker's relay.
        slots: the worker's slots, one per class.
        send: queues a message for the master (``MasterLink.send``).
        prewarm: loads the default model on a backend (by index), as at start.
    """

    MESSAGES = frozenset((proto.RESOLVE, proto.BACKENDS))
    """The message types from the master that :meth:`on_message` handles."""

    def __init__(
        self,
        table: BackendTable,
        relay: Relay,
        slots: Sequence[MasterSlots],
        send: Callable[[Mapping[str, Any]], bool],
        prewarm: Callable[[int], Any],
    ) -> None:
        self.table = table
        self.relay = relay
        self.slots = tuple(slots)
        self._send = send
        self._prewarm = prewarm
        self._retired_at: dict[int, float] = {}  # retired index -> when (monotonic)
        self._tasks: set[asyncio.Task[Any]] = set()

    def on_message(self, msg: Mapping[str, Any]) -> None:
        """Handle a ``resolve`` or a ``backends`` message of the master's."""
        if msg.get(proto.T) == proto.RESOLVE:
            self._spawn(self._resolve(msg))
            return
        sets = msg.get("sets")
        if not isinstance(sets, Mapping):
            log.error("a backends message without its sets: %r", msg)
            return
        self.apply({str(url): a for url, a in sets.items() if isinstance(a, list)})

    def apply(self, sets: Mapping[str, Sequence[str]]) -> None:
        """The master's addresses of the dns tables: the table, the relay and the slots
        follow, index for index."""
        change = self.table.apply(sets)
        for n in change.added:
            entry = self.table.entries[n]
            index = self.relay.add(entry.config)
            for slots in self.slots:
                slots.add(entry.config)
            if index != n:  # the master's replica would disagree on every index from here
                raise RuntimeError(f"backend {entry.key} is {index} in the relay, {n} here")
        for n in change.retired:
            self.relay.retire(n)
            for slots in self.slots:
                slots.retire(n)
            self._retired_at[n] = time.monotonic()
        for n in change.revived:
            self.relay.revive(n)
            for slots in self.slots:
                slots.revive(n)
            self._retired_at.pop(n, None)
        for n in (*change.added, *change.revived):
            log.debug("backend %s is an address of %s", *self._about(n))
            self._spawn(self._prewarm(n))
        for n in change.retired:
            log.debug("backend %s is no longer an address of %s", *self._about(n))

    async def sweep(self) -> None:
        """Every :data:`SWEEP_EVERY` seconds, close the retired backends that are done."""
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = time.monotonic()
            for n, since in list(self._retired_at.items()):
                idle = all(s.held[n] == 0 for s in self.slots)
                if idle and now - since >= CLOSE_AFTER:
                    del self._retired_at[n]
                    await self.relay.close_backend(n)

    def close(self) -> None:
        """Cancel the resolutions and prewarms under way."""
        for task in self._tasks:
            task.cancel()

    # -- internals ---------------------------------------------------------------------------

    def _about(self, n: int) -> tuple[str, str | None]:
        entry = self.table.entries[n]
        return entry.key, entry.origin

    async def _resolve(self, msg: Mapping[str, Any]) -> None:
        host, servers = msg.get("host"), msg.get("nameservers")
        servers = servers if isinstance(servers, list) else []
        nameservers = [s for s in servers if isinstance(s, str)]
        if not isinstance(host, str) or not host:
            result = {"ok": False, "addresses": [], "error": f"no host to resolve: {msg!r}"}
        else:
            try:
                found = await resolve(host, nameservers)
            except Exception as exc:  # a bad nameserver, a bug: the master must hear back
                log.exception("resolving %s failed unexpectedly", host)
                result = {"ok": False, "addresses": [], "error": str(exc) or type(exc).__name__}
            else:
                result = {"ok": found.ok, "addresses": list(found.addresses), "error": found.error}
        self._send({proto.T: proto.RESOLVED, "rid": msg.get("rid"), **result})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
