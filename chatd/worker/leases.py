"""The leases of a worker's running generations (contract 6 of :mod:`chatd.store.base`).

Every acknowledged message is leased to the worker generating it for ``LEASE_S``; one task per
worker renews the leases of all its running generations every ``RENEW_S`` (one batched store
call per worker, not a task per message) and stops a generation whose lease another worker
took. A worker that stops generations unanswered hands their leases back at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Container, Mapping

from chatd.logs import about
from chatd.store.base import LEASE_S, RENEW_S, Store

log = logging.getLogger("chatd.generation")


async def renew_forever(
    store: Store,
    running: Mapping[tuple[str, str], asyncio.Task[None]],
    finishing: Container[tuple[str, str]],
) -> None:
    """Renew the leases of the ``running`` generations each RENEW_S, until cancelled.

    One store call per session, all issued in the same tick (the store sends them as one
    batch). A generation whose lease is gone was claimed by another worker (this one
    stalled for a whole lease): it is stopped without storing anything, so the message is
    generated once, there. A failed renewal is retried next round: the lease outlives
    two missed renewals.
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
