"""One change to the workers at a time: reloads (queued and coalesced) and RSS recycles.

The master calls :meth:`Operations.tick` on every loop iteration. Rules:

* at most one operation runs at a time (a reload, or the RSS recycle of one slot);
* reload requests (SIGHUP, ``chatctl reload``) that arrive while something runs are queued;
  all of them are served by *one* next reload, which re-reads the file then: each caller gets
  the outcome of a reload that started after its request;
* an RSS recycle starts only when nothing else runs (see :mod:`chatd.master.supervision`);
* scaling is refused while an operation runs (:attr:`Operations.busy`).

The steps of a reload are in :mod:`chatd.master.reload`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from chatd.config import Config
from chatd.errors import ConfigError
from chatd.master.reload import Reload, refusals
from chatd.master.requests import Request
from chatd.master.roll import Roll, Target
from chatd.master.supervision import rss_recycle_candidate
from chatd.master.systemd import Notifier
from chatd.master.workers import Workers

log = logging.getLogger("chatd.master")


class Operations:
    """Reloads and RSS recycles of one master's workers.

    Args:
        workers: the master's workers.
        load_config: reads and validates the configuration again (the file the master was
            started with, plus its command-line overrides); raises ConfigError.
        notifier: systemd (RELOADING=1 ... READY=1 around every reload).
        apply: called with a new configuration once a reload has succeeded, to apply what
            the master itself uses (logging, control socket mode, LLM slot limits).
    """

    def __init__(
        self,
        workers: Workers,
        load_config: Callable[[], Config],
        notifier: Notifier,
        apply: Callable[[Config], None],
    ) -> None:
        self.workers = workers
        self.load_config = load_config
        self.notifier = notifier
        self.apply = apply
        self.current: Reload | Roll | None = None
        self.last_reload: dict[str, Any] | None = None
        """For status: ``{"generation", "ok", "message", "at"}`` of the last reload."""
        self._queued: list[Request | None] = []  # None: a SIGHUP (nobody to answer)
        self._callers: list[Request | None] = []  # waiting for the reload in progress

    @property
    def busy(self) -> str | None:
        """What runs now (``"a reload"``, ``"an RSS recycle"``), or None."""
        if isinstance(self.current, Reload):
            return "a reload"
        return "an RSS recycle" if self.current is not None else None

    def request_reload(self, request: Request | None, source: str) -> None:
        """Queue a reload; ``request`` (None for SIGHUP) is answered when it has finished."""
        log.info("reload requested (%s)", source)
        self._queued.append(request)

    def tick(self, now: float) -> None:
        """Advance the operation in progress; start the next one when there is none."""
        if self.current is not None:
            self.current.step(now)
            if not self.current.done:
                return
            self._finished(self.current)
            self.current = None
        if self._queued:
            self._start_reload(now)
        elif self.workers.replacing:
            slot = rss_recycle_candidate(self.workers.slots, now)
            if slot is not None and slot.worker is not None:
                w = slot.worker
                log.warning(
                    "worker %d (pid %d): RSS %.1f MB over max_worker_rss_mb %d for %d samples "
                    "in a row; recycling it (a new worker first, then this one drains)",
                    *(slot.id, w.pid, w.rss / 1e6, w.cfg.server.max_worker_rss_mb, w.rss_over),
                )
                slot.last_recycle = now
                target = Target(slot, slot.cfg, slot.generation)
                what = f"RSS recycle of slot {slot.id}"
                self.current = Roll(self.workers, [target], slot.cfg.server.worker_timeout, what)
                self.current.step(now)

    def abort(self, why: str) -> None:
        """The master is stopping: end what runs, and answer every caller with ``why``."""
        if self.current is not None:
            self.current.abort()
            if isinstance(self.current, Reload):
                self._answer(False, f"reload interrupted: {why}")
            self.current = None
        self._callers, self._queued = self._queued, []
        self._answer(False, f"reload refused: {why}")

    # -- reloads -------------------------------------------------------------------------------

    def _start_reload(self, now: float) -> None:
        """Steps 1-4 of :mod:`chatd.master.reload`, then hand over to :class:`Reload`."""
        self._callers, self._queued = self._queued, []
        self.notifier.reloading()
        old = self.workers.cfg
        try:
            new = self.load_config()
        except ConfigError as exc:
            self._refused(["the new configuration is invalid", *exc.problems])
            return
        problems = refusals(old, new)
        if problems:
            self._refused(["the new configuration cannot be applied by a reload", *problems])
            return
        reload = Reload(self.workers, new, self.workers.generation + 1)
        self.current = reload
        reload.begin(now)
        if reload.done:
            self._finished(reload)
            self.current = None

    def _refused(self, lines: list[str]) -> None:
        head, problems = lines[0], lines[1:]
        log.error("reload refused: %s: %s", head, "; ".join(problems))
        text = f"reload refused, nothing was changed: {head}:\n" + "\n".join(
            f"  {p}" for p in problems
        )
        self._record(False, f"reload refused: {head}")
        self._answer(False, text)

    def _finished(self, op: Reload | Roll) -> None:
        if isinstance(op, Roll):
            if op.failure is not None:
                log.error("%s failed: %s; the old worker keeps serving", op.what, op.failure)
            elif moved := op.handoff_summary():
                log.info("%s done: %s", op.what, moved)
            return
        if op.failure is None:
            self.apply(op.cfg)
            text = f"reloaded: generation {op.generation}, {len(self.workers.slots)} workers ready"
            moved = op.handoff_summary()
            log.info("%s%s", text, f"; {moved}" if moved else "")
            self._record(True, text)
            self._answer(True, text)
            return
        text = (
            f"reload to generation {op.generation} failed: {op.failure}; "
            f"generation {op.old_generation} keeps serving"
        )
        log.error("%s", text)
        self._record(False, text)
        self._answer(False, text)

    def _record(self, ok: bool, text: str) -> None:
        gen = self.workers.generation
        self.last_reload = {"generation": gen, "ok": ok, "message": text, "at": time.time()}
        # READY=1 ends every reload for systemd, whatever its outcome (caddy#7597).
        self.notifier.ready(text[:500])

    def _answer(self, ok: bool, text: str) -> None:
        for request in self._callers:
            if request is None:
                continue
            if ok:
                request.ok({"generation": self.workers.generation, "message": text})
            else:
                request.fail(text)
        self._callers = []
