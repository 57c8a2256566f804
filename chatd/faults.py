"""Fault hooks for tests: ``CHATD_FAULT`` in the environment makes a worker misbehave on purpose.

Read by the worker when it starts (the environment is inherited from the master, so set it in
chatd's environment). Values:

* ``crash_at_start``: the worker exits with code 1 before it is ready, every time: the slot
  becomes ``crash-looping`` and the master backs off.

Anything else is ignored. Production never sets it; a worker that obeys it says so on stderr.

``CHATD_TEST_LEASE`` (seconds, a float) shortens the owner lease of unanswered messages
(:data:`chatd.store.base.LEASE_S`), so tests see takeovers within their time; read when
:mod:`chatd.store.base` is imported. Production never sets it.
"""

from __future__ import annotations

import os
import sys

ENV = "CHATD_FAULT"
LEASE_ENV = "CHATD_TEST_LEASE"


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
