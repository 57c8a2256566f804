"""What the master hands to a worker process it has just forked.

Kept in its own tiny module so that the worker's modules can import it without importing the
master (and the master without importing the worker).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from chatd.config import Config


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker needs, built by the master before the fork.

    Attributes:
        cfg: the configuration of the worker's generation.
        slot: the worker's slot, 1-based: the ``id`` in ``chatctl status`` and the ``2`` of the
            process title ``chatd: worker 2 gen 1``. A replacement gets its predecessor's slot.
        generation: the configuration generation (1 at start; a reload will add one).
        listener: the slot's listening TCP socket (``SO_REUSEPORT``, already listening). The
            master keeps its own copy open, so connections queued on it survive this worker.
            Accept from it; never re-bind.
        link: the worker's end of its socketpair with the master (see
            :class:`chatd.worker.link.MasterLink`); EOF on it means the master is gone.
    """

    cfg: Config
    slot: int
    generation: int
    listener: socket.socket
    link: socket.socket


WorkerMain = Callable[[WorkerSpec], NoReturn]
"""A worker's main function: runs in the forked child and never returns (it exits)."""
