"""The leases of a worker's running generations (contract 6 of :mod:`chatd.store.base`).

Every acknowledged message is leased to the worker generating it for ``LEASE_S``; one task per
worker renews the leases of all its running generations every ``RENEW_S`` (one batched store
call per worker, not a task per message) and stops a generation whose lease another worker
took. A worker that stops generations unanswered hands their leases back at once. A worker
that died is not waited for either: the master, which reaped it, tells a live worker
``owner_gone {owner}`` (:mod:`chatd.master.takeover`), and that worker releases the dead
store's leases and claims the messages at once (:func:`owner_gone`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Container, Mapping
from typing import Protocol

from chatd.logs import about
from chatd.store.base import LEASE_S, RENEW_S, Store

log = logging.getLogger("chatd.generation")


async def renew_forever(
    store: Store,
    running: Mapping[tuple[str, str], asyncio.Task[None]],
    finishing: Container[tuple[str, str]],
    on_lost: Callable[[str, asyncio.Task[None]], None] | None = None,
) -> None:
    """Renew the leases of the ``running`` generations each RENEW_S, until cancelled.

    One store call per session, all issued in the same tick (the store sends them as one
    batch). A generation whose lease is gone was claimed by another worker (this one
    stalled for a whole lease): it is stopped without storing anything, so the message is
    generated once, there; ``on_lost(session, task)`` is told (the reply stored there must
    still reach this worker's clients of the session). A failed renewal is retried next
    round: the lease outlives two missed renewals.
    """
    while True:
        await asyncio.sleep(RENEW_S)
        by_session: dict[str, list[str]] = {}
        for session, msg_id in running:
            by_session.setdefault(session, []).append(msg_id)
        if not by_session:
            continue
        sessions = list(by_session)
        results = await asyncio.gather(
            *(store.renew(s, by_session[s], LEASE_S) for s in sessions),
            return_exceptions=True,
        )
        for session, held in zip(sessions, results, strict=True):
            if isinstance(held, BaseException):
                log.warning("lease renewal failed (%s); retrying in %.1fs", held, RENEW_S)
                continue
            for msg_id in by_session[session]:
                key = (session, msg_id)
                task = running.get(key)
                if msg_id in held or task is None or key in finishing:
                    continue
                log.warning(
                    "lease of %s/%s lost to another worker: stopping", *key, extra=about(*key)
                )
                task.cancel()  # not in _cancelled: nothing is stored for it here
                if on_lost is not None:
                    on_lost(session, task)


async def hand_back(store: Store, keys: list[tuple[str, str]]) -> None:
    """Let the leases of ``keys`` (generations this worker stopped unanswered) lapse now,
    so another worker takes them over at its next claim instead of a lease later."""
    by_session: dict[str, list[str]] = {}
    for session, msg_id in keys:
        by_session.setdefault(session, []).append(msg_id)
    await asyncio.gather(
        *(store.renew(s, ids, 0.0) for s, ids in by_session.items()),
        return_exceptions=True,
    )


class Claimer(Protocol):
    """What :func:`owner_gone` needs of the hub (:class:`chatd.worker.generation.Hub`)."""

    store: Store
    sweeping: bool

    async def take_over(self, session: str | None) -> int: ...


# The owner_gone tasks running (the loop keeps only a weak reference to a task).
_gone: set[asyncio.Task[tuple[int, int]]] = set()


def on_owner_gone(hub: Claimer, owner: object) -> None:
    """The master's ``owner_gone {owner}``: :func:`owner_gone` in a task of its own (the
    link's handler must not wait); a message without an owner id is ignored."""
    if isinstance(owner, str) and owner:
        task = asyncio.get_running_loop().create_task(owner_gone(hub, owner))
        _gone.add(task)
        task.add_done_callback(_gone.discard)


async def owner_gone(hub: Claimer, owner: str) -> tuple[int, int]:
    """Release the leases of the dead store ``owner`` and claim them here; returns (leases
    released, messages taken over here).

    Only the master calls for it, once it reaped the process (:mod:`chatd.master.takeover`):
    a live store's leases must never be released. Claims as a sweep does (any lapsed message,
    a batch at a time) until the released ones are taken (by this worker, or before it by a
    resume or another worker's sweep: then fewer are taken here); a draining worker claims
    nothing, the release alone lets the others' sweeps take them. A store error (or a bug) is
    logged: the leases then lapse by themselves, within LEASE_S, and the sweeps take them.
    """
    try:
        released = await hub.store.release(owner)
    except Exception as exc:
        log.warning(
            "worker died: its leases were not released (%s); they lapse within %.0fs",
            *(exc, LEASE_S),
        )
        return 0, 0
    taken = 0
    try:
        while hub.sweeping and taken < released:
            started = await hub.take_over(None)
            if not started:
                break
            taken += started
    except Exception as exc:  # released: the next sweep (of any worker) claims them
        log.warning("worker died: its messages were not claimed here (%s)", exc)
    log.info("worker died: its %d leases released, %d messages taken over here", released, taken)
    return released, taken
