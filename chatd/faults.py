"""Fault hooks for tests: ``CHATD_FAULT`` in the environment makes a worker misbehave on purpose.

Read by the worker when it starts (the environment is inherited from the master, so set it in
chatd's environment). Values:

* ``crash_at_start``: the worker exits with code 1 before it is ready, every time: the slot
  becomes ``crash-looping`` and the master backs off.

Anything else is ignored. Production never sets it; a worker that obeys it says so on stderr.

``CHATD_TEST_HANDOFF_STALL`` names a file; when it holds ``POINT SECONDS``, the workers stall
that long at that point of each connection handoff (:mod:`chatd.worker.mover`: ``offer``, before
an offer is sent, and ``commit``, before the commit; :mod:`chatd.worker.adopter`: ``answer``,
before the answer, and ``adopt``, between the commit and the adoption), saying so on stderr, so
a test can kill a worker right there. Read at each handoff: a test changes it between reloads.

``CHATD_TEST_LEASE`` (seconds, a float) shortens the owner lease of unanswered messages
(:data:`chatd.store.base.LEASE_S`), so tests see takeovers within their time; read when
:mod:`chatd.store.base` is imported. Production never sets it.
"""

from __future__ import annotations

import asyncio
import os
import sys

ENV = "CHATD_FAULT"
LEASE_ENV = "CHATD_TEST_LEASE"
HANDOFF_ENV = "CHATD_TEST_HANDOFF_STALL"


def at_worker_start() -> None:
    """Apply the start-time fault named by ``CHATD_FAULT``, if any (may exit the process)."""
    if os.environ.get(ENV) == "crash_at_start":
        sys.stderr.write(f"{ENV}=crash_at_start: worker pid {os.getpid()} exits 1 before ready\n")
        sys.stderr.flush()
        os._exit(1)


def lease_seconds(default: float) -> float:
    """The message lease: ``CHATD_TEST_LEASE`` when set to a positive number, else ``default``."""
    raw = os.environ.get(LEASE_ENV)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            return default
        if value > 0:
            sys.stderr.write(f"{LEASE_ENV}={value:g}: message leases shortened (tests only)\n")
            return value
    return default


async def handoff_stall(point: str) -> None:
    """Stall at ``point`` of a handoff when ``CHATD_TEST_HANDOFF_STALL`` says so (tests only)."""
    path = os.environ.get(HANDOFF_ENV)
    if not path:
        return
    try:
        words = _words(path)  # a tiny file, tests only: no need for a thread
        seconds = float(words[1]) if len(words) == 2 and words[0] == point else 0.0
    except (OSError, ValueError):
        return
    if seconds > 0:
        sys.stderr.write(f"{HANDOFF_ENV}: pid {os.getpid()} stalls {seconds:g}s at {point}\n")
        sys.stderr.flush()
        await asyncio.sleep(seconds)


def _words(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().split()
