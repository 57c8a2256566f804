"""The deadlines and the exception boundary of one generation (:class:`Guard`).

Kept apart from :mod:`chatd.relay.generate`'s request loop, which only stores the time of the latest
chunk in the guard; the guard's one timer turns a passed deadline into a cancellation, and
its ``__exit__`` turns that cancellation and every transport error into an UpstreamError.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Protocol

from chatd.errors import UpstreamError
from chatd.relay.failures import connection_error, timeout_error


class Backend(Protocol):
    """What the guard reads and updates of a backend's state
    (:class:`chatd.relay.backend.Backend`)."""

    url: str
    api: str
    loaded: dict[str, float]


class Guard:
    """The deadlines and the exception boundary of one generation (``with Guard(...)``).

    Deadlines: one timer serves all three. The hot path only stores the time of the latest
    chunk in :attr:`last` (and sets :attr:`started`); when the timer fires before the real
    deadline it re-arms itself for it, so a reply costs about one timer per idle period
    rather than one per token. On expiry it cancels the task, as ``asyncio.timeout`` does.

    Boundary (cf. httpx's map_exceptions): on exit, the timer's cancellation becomes
    UpstreamTimeout; aiohttp/socket errors and WireError become UpstreamErrors; every
    UpstreamError leaving gets ``first_token_sent = self.sent``. Anything else (an outside
    cancellation, a bug in the caller's on_token) propagates unchanged.
    """

    __slots__ = (
        *("_baseline", "_handle", "_loop", "_task", "at", "b", "expired"),
        *("last", "limits", "model", "sent", "started"),
    )

    def __init__(
        self,
        b: Backend,
        model: str,
        first: float,
        idle: float,
        total: float,
        loop: asyncio.AbstractEventLoop | None = None,
    ):
        """``loop``: the running loop, if the caller knows it (a lookup is a system call on
        CPython 3.11: chatd.relay.pool.Pool.loop)."""
        self._loop = loop = loop or asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None, "generate() must run in a task"
        self._task = task
        self._baseline = task.cancelling()
        self.b, self.model = b, model
        self.limits = {"first": first, "idle": idle, "total": total}
        now = self._loop.time()
        self.at = {"first": now + first, "total": now + total}
        self.last, self.started, self.sent, self.expired = now, False, False, ""
        self._handle: asyncio.TimerHandle | None = None

    def __enter__(self) -> Guard:
        self._handle = self._loop.call_at(min(self.at.values()), self._fire)
        return self

    def _fire(self) -> None:
        if self.started:
            due, kind = self.last + self.limits["idle"], "idle"
        else:
            due, kind = self.at["first"], "first"
        if self.at["total"] <= due:
            due, kind = self.at["total"], "total"
        if self._loop.time() + 0.001 >= due:  # call_at may run a hair early
            self._handle, self.expired = None, kind
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(due, self._fire)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.disarm()
        err: UpstreamError | None = None
        if self.expired:
            # Withdraw our cancel. If uncancel() stays above the count at entry, a cancel
            # from outside is pending too, and that one must win.
            outside = self._task.uncancel() > self._baseline
            if isinstance(exc, asyncio.CancelledError) and not outside:
                kind = self.expired
                if kind == "first":
                    self.b.loaded.pop(self.model, None)  # maybe evicted: ask /api/ps next time
                err = timeout_error(self.b.url, self.model, kind, self.limits[kind])
                exc = None
        if err is None and exc is not None:
            err = exc if isinstance(exc, UpstreamError) else connection_error(self.b, exc)
        if err is not None:
            err.first_token_sent = self.sent
            if err is not exc:
                raise err from exc
