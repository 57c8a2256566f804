"""LLM slots: how many requests may be in flight to each backend, and who waits for one.

A slot is the right to send one generation request to one backend. Requests in flight to a
backend never exceed its ``max_parallel``; waiters are served first in, first out, each by
the least-loaded healthy backend it accepts; at most ``max_queue`` wait (then ``busy``).

This module is the per-worker granter (:class:`LocalSlots`). The daemon-wide cap, where the
master grants slots to all workers, implements the same :class:`Slots` protocol, so the
generation code does not change when it arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from chatd.config import BackendConfig
from chatd.errors import UpstreamUnavailable

POSITION_NOTICE_INTERVAL = 1.0  # seconds: queued{position} at most once a second per waiter


class QueueFull(Exception):
    """The queue of waiters is full: the client gets ``busy``."""


class Slots(Protocol):
    """What a generation needs: a slot on some backend, and to give it back."""

    async def acquire(
        self, on_position: Callable[[int], None], exclude: frozenset[int] = frozenset()
    ) -> int:
        """Wait for a slot; return the backend index. Raises QueueFull or UpstreamUnavailable."""

    def release(self, backend: int) -> None:
        """Give back a slot taken by ``acquire``."""

    def set_healthy(self, backend: int, healthy: bool) -> None:
        """Record a health check; an unhealthy backend gets no slots until it recovers."""


@dataclass(slots=True, eq=False)
class _Waiter:
    future: asyncio.Future[int]
    on_position: Callable[[int], None]
    exclude: frozenset[int]
    last_position: int = 0
    last_sent: float = field(default=0.0)


class LocalSlots:
    """Slots granted within one worker process (FIFO, least-loaded healthy backend)."""

    def __init__(self, backends: Sequence[BackendConfig], max_queue: int) -> None:
        self.backends = tuple(backends)
        self.max_queue = max_queue
        self.in_flight = [0] * len(self.backends)
        self.healthy = [True] * len(self.backends)
        self._waiters: deque[_Waiter] = deque()

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    def _pick(self, exclude: frozenset[int]) -> int | None:
        """The least-loaded healthy backend with a free slot, not in ``exclude``."""
        best: int | None = None
        best_load = 2.0
        for i, b in enumerate(self.backends):
            if i in exclude or not self.healthy[i] or self.in_flight[i] >= b.max_parallel:
                continue
            load = self.in_flight[i] / b.max_parallel
            if load < best_load:
                best, best_load = i, load
        return best

    def _any_usable(self, exclude: frozenset[int]) -> bool:
        return any(self.healthy[i] for i in range(len(self.backends)) if i not in exclude)

    async def acquire(
        self, on_position: Callable[[int], None], exclude: frozenset[int] = frozenset()
    ) -> int:
        if not self._any_usable(exclude):
            raise UpstreamUnavailable(
                "No healthy LLM backend is available right now: retry in a few seconds."
            )
        if not self._waiters:
            picked = self._pick(exclude)
            if picked is not None:
                self.in_flight[picked] += 1
                return picked
        if len(self._waiters) >= self.max_queue:
            raise QueueFull
        waiter = _Waiter(asyncio.get_running_loop().create_future(), on_position, exclude)
        self._waiters.append(waiter)
        waiter.last_position = len(self._waiters)
        waiter.last_sent = time.monotonic()
        on_position(waiter.last_position)
        try:
            return await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                # Granted but the waiter went away (cancelled): give the slot back.
                self.release(waiter.future.result())
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self, backend: int) -> None:
        self.in_flight[backend] -= 1
        self._grant()

    def set_healthy(self, backend: int, healthy: bool) -> None:
        self.healthy[backend] = healthy
        if healthy:
            self._grant()
            return
        # Waiters that can use no healthy backend at all fail now rather than time out.
        for w in list(self._waiters):
            if not self._any_usable(w.exclude) and not w.future.done():
                self._waiters.remove(w)
                w.future.set_exception(
                    UpstreamUnavailable(
                        "Every LLM backend this message could use went down while it "
                        "waited: retry in a few seconds."
                    )
                )

    def _grant(self) -> None:
        """Hand free slots to waiters in FIFO order, then tell the others their position."""
        granted = False
        for w in list(self._waiters):
            if w.future.done():
                self._waiters.remove(w)
                continue
            picked = self._pick(w.exclude)
            if picked is None:
                if self._pick(frozenset()) is None:
                    break  # nothing free at all: keep FIFO order
                continue
            self._waiters.remove(w)
            self.in_flight[picked] += 1
            w.future.set_result(picked)
            granted = True
        if granted:
            self._tell_positions()

    def _tell_positions(self) -> None:
        now = time.monotonic()
        for pos, w in enumerate(self._waiters, 1):
            if pos != w.last_position and now - w.last_sent >= POSITION_NOTICE_INTERVAL:
                w.last_position, w.last_sent = pos, now
                w.on_position(pos)
