"""The Redis store's writes: the group commit, and what the write scripts' replies mean.

One job, for :class:`~chatd.store.redis.RedisStore`: every write (a script call of
:mod:`chatd.store.redis_lua`) is queued, and ONE writer task sends all the queued ones as one
pipeline (:meth:`~chatd.store.redis_conn.RedisConn.pipeline`: one round trip per master, each
followed by a WAIT when ``min_replicas_acks`` > 0, so one WAIT covers a whole batch); the next
batch gathers while it is in flight, and a lone write goes at once. Each caller's future is
resolved with its own result, or its own StoreError (a failure of the batch fails every
caller of it, never the writer). Transient errors are retried (the scripts are idempotent:
see :mod:`chatd.store.redis`). Commit latencies are sampled for :meth:`Batcher.statistics`.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from chatd.errors import SessionGone, StoreError
from chatd.store.base import Appended, StoreStats
from chatd.store.redis_conn import RedisConn

# (script name, KEYS, ARGV, the caller's future, the session id)
_Request = tuple[str, list[str], list[Any], asyncio.Future[Any], str]
_RESERVOIR = 4096  # commit latency samples kept (uniform over all commits since open)


def short(session: str) -> str:
    """A session id fit for errors and logs: a session id is a capability (it resumes the
    session), so they show a prefix only."""
    return session[:6] + "…"


def _result(script: str, reply: Any, session: str) -> tuple[Any, int, bool]:
    """What a script's reply means for its caller: (result, event rows stored, wrote)."""
    if script == "create":
        return session, 0, True
    if script != "append":  # claim, renew, probe: the script's reply as it is
        return reply, 0, False
    if reply[0] == 0:
        return SessionGone(f"unknown or expired session {short(session)}"), 0, False
    appended = Appended(int(reply[0]), bool(reply[1]))
    return appended, int(not appended.duplicate), not appended.duplicate


class Batcher:
    """The writer of one store (see the module docstring); ``max_batch`` caps the calls of one
    pipeline. :meth:`start` in the running loop, :meth:`stop` sends what is queued first."""

    def __init__(self, conn: RedisConn, max_batch: int) -> None:
        self._conn, self._max_batch = conn, max_batch
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._commits = self._rows = self._n_samples = 0
        self._samples: list[float] = []

    @property
    def running(self) -> bool:
        return self._writer is not None

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="chatd-store-write")

    async def stop(self) -> None:
        """Send every call queued so far, then end the writer (the caller refuses new ones)."""
        if self._writer is not None:
            self._queue.put_nowait(None)
            await self._writer

    async def write(self, script: str, keys: list[str], args: list[Any], session: str) -> Any:
        """Queue one script call; its meaning (:func:`_result`) once its batch is done."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((script, keys, args, fut, session))
        return await fut

    async def _write_loop(self) -> None:
        """Take every queued request (up to ``max_batch``), send them as one pipeline, resolve
        their futures; until the sentinel. A lone request goes at once."""
        running = True
        while running:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                if (item := self._queue.get_nowait()) is None:
                    running = False
                    break
                batch.append(item)
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Request]) -> None:
        start = time.monotonic()
        try:
            calls = [(script, keys, args) for script, keys, args, _, _ in batch]
            replies = await self._conn.retrying(lambda: self._conn.pipeline(calls, wait=True))
        except Exception as exc:  # StoreError, or a bug: fail the batch, never the writer
            replies = [exc] * len(batch)
        rows, wrote = 0, False
        where = self._conn.where
        for (script, _, _, fut, session), reply in zip(batch, replies, strict=True):
            result: Any
            if isinstance(reply, BaseException):  # one instance per caller: tracebacks differ
                why = reply if isinstance(reply, StoreError) else f"{where} failed: {reply}"
                result = StoreError(f"{why}")
                result.__cause__ = reply
            else:
                result, n, w = _result(script, reply, session)
                rows, wrote = rows + n, wrote or w
            if fut.done():  # the caller was cancelled; its write may still have committed
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
        self._record((time.monotonic() - start) * 1000.0, rows, wrote)

    def _record(self, elapsed_ms: float, rows: int, wrote: bool) -> None:
        self._rows += rows
        self._commits += wrote
        self._n_samples += 1
        if len(self._samples) < _RESERVOIR:
            self._samples.append(elapsed_ms)
        elif (j := random.randrange(self._n_samples)) < _RESERVOIR:  # reservoir sampling (R)
            self._samples[j] = elapsed_ms

    def statistics(self) -> StoreStats:
        """Write round trips that stored something, event rows stored (duplicates excluded),
        round-trip latency (retries and WAIT included), and ``busy_retries`` 0 (no lock)."""
        samples = sorted(self._samples)

        def pct(q: float) -> float:
            return samples[min(len(samples) - 1, int(q * len(samples)))] if samples else 0.0

        return StoreStats(self._commits, self._rows, pct(0.50), pct(0.99), 0)
