"""Where a message's time goes, and the worker's own stalls: histograms for ``/metrics``.

A chat message passes these *stages* in its worker (each the time from the end of the one
before, in seconds in ``chatd_stage_seconds{stage}``):

=============  ===============================================================================
commit         frame handled → user message committed to the store (the ``ack`` goes then)
queue          committed → LLM slot granted (all attempts' waits)
first_token    slot granted → the backend's first token
stream         first token → last token
store_reply    last token → reply committed (its append to the store)
publish        reply committed → written to the subscribers' sockets (the end of that loop
               tick; a client that is not reading is not waited for)
=============  ===============================================================================

The first four go to the client in the reply's ``stats.stages`` (milliseconds:
``commit_ms``, ``queue_ms``, ``first_token_ms``, ``stream_ms``; the last two come after the
reply is built), so a load generator can tell where the time of its *slowest* messages went,
which histograms cannot.

Two more histograms say when the worker itself was the tail: ``loop_lag`` (how late a 100 ms
timer fires: the event loop was blocked or busy) and ``gc_pause`` (each collection of the
garbage collector, which stops the loop).
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from chatd.stats import Histogram

STAGES = ("commit", "queue", "first_token", "stream", "store_reply", "publish")
LOOP_TICK = 0.1  # seconds between two event-loop lag probes


class StageClock:
    """The times one message passed its stages (``time.monotonic()`` readings)."""

    __slots__ = ("committed", "granted", "received")

    def __init__(self, received: float) -> None:
        self.received = received
        self.committed = received
        self.granted = received


class Stages:
    """This worker's stage, loop lag and GC pause histograms (all in milliseconds)."""

    def __init__(self) -> None:
        self.histograms: dict[str, Histogram] = {name: Histogram() for name in STAGES}
        self.loop_lag = Histogram()
        self.gc_pause = Histogram()
        self._gc_started = 0.0

    def observe(self, stage: str, seconds: float) -> None:
        self.histograms[stage].observe(max(0.0, seconds) * 1000.0)

    def reply_stages(self, clock: StageClock, ttft_ms: float, total_ms: float) -> dict[str, float]:
        """Observe a replied message's first four stages; return them for its
        ``stats.stages`` (stored with the reply, so a replay says the same).

        ``ttft_ms`` and ``total_ms`` are the relay's, counted from the request it sent
        (right after the slot was granted). ``store_reply`` and ``publish`` come after the
        reply is built: :meth:`observe` them.
        """
        ms = {
            "commit_ms": max(0.0, (clock.committed - clock.received) * 1000.0),
            "queue_ms": max(0.0, (clock.granted - clock.committed) * 1000.0),
            "first_token_ms": max(0.0, ttft_ms),
            "stream_ms": max(0.0, total_ms - ttft_ms),
        }
        for stage, key in zip(STAGES, ms, strict=False):
            self.histograms[stage].observe(ms[key])
        return {k: round(v, 2) for k, v in ms.items()}

    def report(self) -> dict[str, Any]:
        """The ``stages`` part of the worker's ``stats`` message (cumulative)."""
        wire = {name: _wire(h) for name, h in self.histograms.items()}
        wire["loop_lag"] = _wire(self.loop_lag)
        wire["gc_pause"] = _wire(self.gc_pause)
        return wire

    async def watch_loop(self) -> None:
        """Until cancelled: every LOOP_TICK, how late the timer fired (the loop's lag)."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LOOP_TICK
            await asyncio.sleep(LOOP_TICK)
            self.loop_lag.observe(max(0.0, loop.time() - due) * 1000.0)

    def watch_gc(self) -> None:
        """Time every garbage collection of this process (``gc.callbacks``)."""
        gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            self.gc_pause.observe((time.perf_counter() - self._gc_started) * 1000.0)
            self._gc_started = 0.0


def _wire(h: Histogram) -> dict[str, Any]:
    # A copy first: gc_pause is observed from the collector's callback, which may run at any
    # allocation (sorted's included), in any thread; a dict's copy allocates no tracked object
    # while it copies, so no collection (and no new bucket) can come in the middle of it.
    return {"buckets": sorted(dict(h.counts).items()), "sum_ms": h.total_ms}
