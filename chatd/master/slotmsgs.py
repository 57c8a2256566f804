"""What :class:`chatd.master.slotgrant.Granter` answers: each message is addressed to an *owner*
(the master uses the worker's pid) and names the owner's request (``rid``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Reason = Literal["busy", "key_busy", "unavailable"]


@dataclass(frozen=True, slots=True)
class Grant:
    """``owner``'s request ``rid`` holds a slot of ``backend`` until it releases it; with
    ``lease``, the owner may keep the slot for its next requests (nobody waits)."""

    owner: int
    rid: int
    backend: str
    lease: bool = False


@dataclass(frozen=True, slots=True)
class Queued:
    """``owner``'s request ``rid`` waits at ``position`` (1 = next)."""

    owner: int
    rid: int
    position: int


@dataclass(frozen=True, slots=True)
class Refused:
    """``owner``'s request ``rid`` gets no slot: the queue is full (``busy``), its key has
    ``max_queued_per_key`` waiting (``key_busy``), or no backend is usable."""

    owner: int
    rid: int
    reason: Reason


@dataclass(frozen=True, slots=True)
class Recall:
    """``owner`` must give back the slots it keeps unused and keep none until a grant leases
    again (``rid`` is always 0: it answers no request)."""

    owner: int
    rid: int = 0


Output = Grant | Queued | Refused | Recall
