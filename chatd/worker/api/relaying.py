"""One API request relayed to a backend under an LLM slot: queueing, failover, error shapes.

:meth:`Relaying.stream` takes a slot of the master's (for the request's key: round robin
across keys, ``max_queued_per_key``, ``max_in_flight_per_key``), sends the request the caller
prepares for that backend (its API decides the path and body) and passes on the chunks. As
for a chat message: a failure before the first chunk is retried on another backend (at most
MAX_ATTEMPTS in all), a backend known not to have the model is skipped; after the first
chunk, never. The slot is given back when the request ends, however it ends: a client that
leaves while queued cancels its wait (it leaves the queue at once), one that leaves during
the reply cancels the backend request (the connection closes, which stops Ollama).

:meth:`Relaying.call` does the same for a request answered whole (the embeddings, in their
own slot class, so a burst of them never delays a chat).

:func:`api_error` says what each failure is for the client, as an
:class:`~chatd.proto.httpapi.ApiError` (each API renders it in its own shape).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chatd.errors import UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from chatd.proto.httpapi import OLLAMA_BUSY, ApiError
from chatd.relay.passthrough import Passthrough
from chatd.worker.api.catalog import Catalog
from chatd.worker.slots import KeyBusy, QueueFull, Slots

MAX_ATTEMPTS = 3
RETRY_AFTER_KEY = 1  # seconds: a key over its own bound (its own requests free it soon)
RETRY_AFTER_BUSY = 2  # seconds: the daemon's queue is full
RETRY_AFTER_DOWN = 5  # seconds: no backend is healthy

Prepare = Callable[[int], tuple[str, dict[str, Any], Callable[[dict[str, Any]], None]]]
"""For a backend index: the path, the body and the chunk callback of one attempt."""


@dataclass(slots=True)
class Timing:
    """When a relayed request waited and answered (seconds, monotonic)."""

    queued: float = 0.0  # time spent waiting for slots, all attempts
    first_chunk: float | None = None  # from the start to the first chunk
    backend: int = -1


def api_error(exc: BaseException, max_queued_per_key: int = 0) -> ApiError:
    """The client's error for a failed relay (slot refusals and UpstreamErrors)."""
    if isinstance(exc, KeyBusy):
        bound = f" ({max_queued_per_key} at most)" if max_queued_per_key else ""
        return ApiError(
            "rate_limited",
            f"too many requests of this client are waiting for the model{bound}: retry later",
            retry_after=RETRY_AFTER_KEY,
        )
    if isinstance(exc, QueueFull):
        return ApiError("busy", OLLAMA_BUSY, retry_after=RETRY_AFTER_BUSY)
    if isinstance(exc, UpstreamError):
        if exc.status is not None:
            retry = RETRY_AFTER_BUSY if exc.status in (429, 503) else None
            return ApiError(
                "backend", exc.detail or exc.message, status=exc.status, retry_after=retry
            )
        if isinstance(exc, UpstreamTimeout):
            return ApiError("timeout", exc.message)
        if isinstance(exc, UpstreamRejected) and exc.detail:
            return ApiError("backend", exc.detail, status=500)
        if isinstance(exc, UpstreamUnavailable) and not exc.backend:
            return ApiError("unavailable", exc.message, retry_after=RETRY_AFTER_DOWN)
        return ApiError("unavailable", exc.message)
    raise exc


class Relaying:
    """Relays API requests under slots (``slots`` for generations, ``embed_slots`` for
    embeddings), on the backends of ``passthrough``; see the module."""

    def __init__(
        self,
        passthrough: Passthrough,
        slots: Slots,
        embed_slots: Slots,
        catalog: Catalog,
        max_queued_per_key: int,
    ) -> None:
        self.pt = passthrough
        self._slots = slots
        self._embed_slots = embed_slots
        self._catalog = catalog
        self._max_queued_per_key = max_queued_per_key

    def _exclude(self, model: str, failed: set[int]) -> frozenset[int]:
        live = set(self.pt.relay.live)  # retired backends (addresses gone) never count
        lacking = {i for i in live if self._catalog.lacks(i, model)}
        if not live <= failed | lacking:
            return frozenset(failed | lacking)
        return frozenset(failed) if not live <= failed else frozenset()

    async def stream(self, key: str, model: str, prepare: Prepare, timing: Timing) -> None:
        """Relay a streamed request (see the module); raises ApiError, or lets the client's
        cancellation through."""
        failed: set[int] = set()
        t0 = time.monotonic()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            backend = await self._acquire(self._slots, key, self._exclude(model, failed), timing)
            timing.backend = backend
            try:  # from here the slot is this request's: given back however it ends
                path, body, on_chunk = prepare(backend)

                def chunk(
                    obj: dict[str, Any], on_chunk: Callable[[dict[str, Any]], None] = on_chunk
                ) -> None:
                    if timing.first_chunk is None:
                        timing.first_chunk = time.monotonic() - t0
                    on_chunk(obj)

                await self.pt.stream(backend, path, body, model, chunk)
                return
            except UpstreamError as exc:
                if not self._retry(exc, attempt, failed, backend):
                    raise api_error(exc) from exc
            finally:
                self._slots.release(backend, key)

    async def call(
        self,
        key: str,
        model: str,
        prepare: Callable[[int], tuple[str, dict[str, Any]]],
        timing: Timing,
        *,
        limit: float,
        max_bytes: int,
    ) -> tuple[int, bytes, int]:
        """Relay a request answered whole under an embedding slot: ``(status, body,
        backend)`` of the first backend that does not fail (a 404 is tried elsewhere)."""
        failed: set[int] = set()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            slots = self._embed_slots
            backend = await self._acquire(slots, key, self._exclude(model, failed), timing)
            timing.backend = backend
            try:  # from here the slot is this request's: given back however it ends
                path, body = prepare(backend)
                status, answer = await self.pt.call(
                    backend, "POST", path, body, limit=limit, max_bytes=max_bytes
                )
            except UpstreamError as exc:
                if not self._retry(exc, attempt, failed, backend):
                    raise api_error(exc) from exc
                continue
            finally:
                slots.release(backend, key)
            others = set(self.pt.relay.live) - failed - {backend}
            if status == 404 and attempt < MAX_ATTEMPTS and others:
                failed.add(backend)
                continue
            return status, answer, backend
        raise AssertionError("unreachable")  # pragma: no cover

    async def _acquire(
        self, slots: Slots, key: str, exclude: frozenset[int], timing: Timing
    ) -> int:
        t = time.monotonic()
        try:
            return await slots.acquire(_no_position, exclude, key)
        except (QueueFull, UpstreamError) as exc:
            raise api_error(exc, self._max_queued_per_key) from exc
        finally:
            timing.queued += time.monotonic() - t

    def _retry(self, exc: UpstreamError, attempt: int, failed: set[int], backend: int) -> bool:
        """Whether to try once more elsewhere: nothing reached the client, attempts are left,
        and the failure is one another backend may not have (a 404 too: that backend lacks
        the model). A deadline passed on every backend is not retried (the client would wait
        it twice)."""
        if exc.first_token_sent or attempt >= MAX_ATTEMPTS:
            return False
        live = set(self.pt.relay.live)
        if not (exc.retryable or (exc.status == 404 and len(live) > 1)):
            return False
        failed.add(backend)
        # Every backend failed: a transient failure may be tried again, not a deadline (the
        # client would wait it twice) nor a 404 (each said it lacks the model).
        return not live <= failed or not (isinstance(exc, UpstreamTimeout) or exc.status == 404)


def _no_position(_position: int) -> None:
    """The APIs have no way to say a queue position (an HTTP response waits for its head)."""
