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
        store_writer: the host's SQLite writer (a :class:`WriterSpec`'s ``path`` and
            ``address``), when the master runs one: the worker's store writes through it if
            its ``[sessions] store`` names that file. None: the worker writes the file itself.
    """

    cfg: Config
    slot: int
    generation: int
    listener: socket.socket
    link: socket.socket
    store_writer: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class WriterSpec:
    """What the master hands to the host's SQLite writer process (chatd.store.sqlite_host).

    Attributes:
        cfg: the configuration at the master's start (its logging).
        path: the SQLite file, as ``[sessions] store`` names it.
        address: the unix socket it serves (an abstract name: starts with NUL).
        link: its end of a socketpair with the master; EOF on it means the master is gone.
    """

    cfg: Config
    path: str
    address: str
    link: socket.socket


WorkerMain = Callable[[WorkerSpec], NoReturn]
"""A worker's main function: runs in the forked child and never returns (it exits)."""

WriterMain = Callable[[WriterSpec], NoReturn]
"""The store writer's main function: runs in the forked child and never returns (it exits)."""
