"""The rolling reload: a new configuration and generation, without dropping a message.

Triggered by SIGHUP or ``chatctl reload``; driven by :class:`chatd.master.operations.Operations`
(steps 1-4 and 9) and :class:`Reload` (steps 5-8):

1. Tell systemd ``RELOADING=1`` with ``MONOTONIC_USEC``.
2. Read the file the master was started with again, apply the command-line overrides given
   at start, and validate the whole configuration. Any problem: nothing changes, and the
   caller gets every problem.
3. Refuse what a reload cannot apply (:func:`refusals`): a new ``[server] bind`` or
   ``[control] socket``. The listening sockets are kept across reloads, precisely so that no
   queued connection is reset; binding new ones means a restart. Nothing changes then either.
4. Pre-flight the new workers' surroundings that the master can check cheaply: the SQLite
   store's directory must exist or be creatable.
5. generation + 1. When the new configuration wants more workers, bind the extra slot sockets
   now (a failure ends the reload here, nothing changed).
6. The canary: slot 1 is rolled first (:mod:`chatd.master.roll`): its new worker is forked onto slot
   1's socket next to the old one, and the old one drains only once the new one is ready.
7. The other slots, one at a time, the same way; then the extra slots (no old worker there).
8. Success: fewer workers wanted means the highest slots are retired (drained, their sockets
   closed); the new configuration becomes the daemon's. Failure at 6 or 7: the new worker is
   killed and its slot keeps its old worker; slots already moved are rolled back to their old
   configuration the same way (new worker first, then drain); extra slots are closed; the
   daemon is left serving the old generation.
9. Answer every caller (the new generation, or one sentence saying what failed) and tell
   systemd ``READY=1`` with a ``STATUS=`` line, whatever the outcome.

``[log] level`` and ``format`` apply to the master at step 8, and to each new worker when it
is forked; ``[control] mode`` is applied to the socket file; the LLM slot limits are handed
to the master's slot service.
"""

from __future__ import annotations

import logging
import os

from chatd.config import Config
from chatd.master.cpus import usable_cpus
from chatd.master.listeners import BindError
from chatd.master.roll import Roll, Target
from chatd.master.scale import add_slots, remove_last_slot
from chatd.master.supervision import Slot
from chatd.master.workers import Workers

log = logging.getLogger("chatd.master")


def worker_count(cfg: Config) -> int:
    """The number of workers ``cfg`` asks for (0: one per CPU this process may use, its
    affinity and its cgroup's quota considered: :func:`chatd.master.cpus.usable_cpus`)."""
    return cfg.server.workers or usable_cpus()


def refusals(old: Config, new: Config) -> list[str]:
    """What in ``new`` a reload cannot apply (step 3) or will certainly fail on (step 4)."""
    problems = []
    if new.server.bind != old.server.bind:
        problems.append(
            f"[server] bind changed from {old.server.bind} to {new.server.bind}: the listening "
            "sockets are kept across reloads, so a new bind needs a restart "
            "(systemctl restart chatd)"
        )
    if new.control.socket != old.control.socket:
        problems.append(
            f"[control] socket changed from {old.control.socket} to {new.control.socket}: "
            "the control socket is kept across reloads, so moving it needs a restart"
        )
    path = new.sessions.sqlite_path
    if path:
        problem = _unusable_directory(os.path.dirname(os.path.abspath(path)))
        if problem:
            problems.append(f"[sessions] store {new.sessions.store}: {problem}")
    return problems


def _unusable_directory(directory: str) -> str | None:
    """Why a worker could not create a file in ``directory`` (creating it if needed)."""
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    return None


class Reload:
    """Steps 5-8 of the module docstring, for a configuration already validated.

    Args:
        workers: the master's workers.
        cfg: the new configuration.
        generation: its generation number.

    After :attr:`done`, :attr:`failure` is None on success, else one sentence.
    """

    def __init__(self, workers: Workers, cfg: Config, generation: int) -> None:
        self.workers = workers
        self.cfg = cfg
        self.generation = generation
        self.old_generation = workers.generation
        self.count = worker_count(cfg)
        self.done = False
        self.failure: str | None = None
        self._added: list[Slot] = []
        self._roll: Roll | None = None
        self._rolling_back = False

    def begin(self, now: float) -> None:
        """Steps 5 and 6: bind what is missing, start the canary."""
        workers = self.workers
        kept = workers.slots[: self.count]
        if self.count > len(workers.slots):
            try:
                self._added = add_slots(
                    workers, self.count - len(workers.slots), self.cfg, self.generation
                )
            except BindError as exc:
                self.failure = f"the sockets of the new slots cannot be bound: {exc}"
                self.done = True
                return
        targets = [Target(slot, self.cfg, self.generation) for slot in kept + self._added]
        log.info(
            "reload to generation %d: %d workers, slot 1 first (the canary)",
            *(self.generation, self.count),
        )
        self._roll = Roll(
            workers,
            targets,
            self.cfg.server.worker_timeout,
            f"reload to generation {self.generation}",
        )
        self._roll.step(now)
        self.step(now)

    def step(self, now: float) -> None:
        """Steps 7 and 8; call on every loop iteration until :attr:`done`."""
        roll = self._roll
        if self.done or roll is None:
            return
        roll.step(now)
        if not roll.done:
            return
        if self._rolling_back:
            assert self.failure is not None
            if roll.failure is not None:
                self.failure += f"; rolling back failed too: {roll.failure}"
            self.done = True
            return
        if roll.failure is None:
            self._succeed()
            return
        self.failure = roll.failure
        for slot in reversed(self._added):
            if slot in self.workers.slots:
                remove_last_slot(self.workers, f"reload to generation {self.generation} failed")
        back = [t for t in roll.switched if t.slot in self.workers.slots]
        if not back:
            self.done = True
            return
        log.warning(
            "reload to generation %d failed: rolling slots %s back to generation %d",
            *(self.generation, ", ".join(str(t.slot.id) for t in back), self.old_generation),
        )
        self.failure += f"; slots {', '.join(str(t.slot.id) for t in back)} were rolled back"
        self._rolling_back = True
        self._roll = Roll(self.workers, back, self.workers.cfg.server.worker_timeout, "rollback")
        self.step(now)

    def abort(self) -> None:
        """The master is stopping: stop where we are (the stop drains every worker anyway)."""
        if self._roll is not None:
            self._roll.abort()
        if not self.done:
            self.failure = self.failure or "the daemon is stopping"
            self.done = True

    def handoff_summary(self) -> str:
        """What moved during this reload (:meth:`chatd.master.roll.Roll.handoff_summary`)."""
        return self._roll.handoff_summary() if self._roll is not None else ""

    def _succeed(self) -> None:
        workers = self.workers
        while len(workers.slots) > self.count:
            remove_last_slot(
                workers,
                f"reload to generation {self.generation}: {self.count} wanted",
                keep=self.count,
            )
        workers.cfg = self.cfg
        workers.generation = self.generation
        self.done = True
