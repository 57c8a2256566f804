"""What the master serves its workers over their links, besides supervision.

* **LLM slots**: the master owns the daemon's :class:`chatd.master.slotgrant.Granter` (one
  per slot class, below) and answers each worker's ``slot_acquire {rid, exclude, key}`` with
  ``slot_grant {rid, backend, lease}``, ``slot_queued {rid, position}`` or ``slot_refused
  {rid, reason}`` (``busy``, ``key_busy``, ``unavailable``), and sends ``slot_recall`` when
  leased slots must come back;
  ``slot_release {backend, count, key}`` and ``slot_cancel {rid}`` need no answer (a missing or
  malformed ``key`` is ``""`` in an acquire, and none in a release: the slots were leased);
  ``health {backend, healthy}`` is a worker's health check result. The slots and waiters of a
  worker that exits are taken back when it is reaped: only then are its requests to the
  backends certainly over, so the cap stays exact. (The worker side is
  :class:`chatd.worker.slots.MasterSlots`.)
* **Slot classes**: ``chat`` (generations) and ``embed`` (embeddings) each have a granter of
  their own, built from the same backends (``max_parallel``, resp. ``max_parallel_embed``
  slots each) with the same bounds (``max_queue``, ``max_queued_per_key``,
  ``max_in_flight_per_key``, each per class), so a burst of embedding requests never delays a
  chat generation and chat never delays embeddings beyond their own cap. Every ``slot_*``
  message names its class (``class``, absent: chat; :func:`chatd.proto.control.slot_class`),
  and the answers carry it back; one of an unknown class is logged and dropped. What the
  classes share: a ``health`` report applies to both, a new configuration reconfigures both,
  and a worker that exits gives back its slots and waiters of both. Leases work in each
  class alone, as in :mod:`chatd.master.slotgrant` (an embed waiter recalls embed leases
  only). A backend may thus see ``max_parallel + max_parallel_embed`` requests at once.
* **Metrics**: ``metrics_request {rid}`` is answered with ``metrics {rid, data}``, the
  daemon-wide figures of :func:`chatd.metrics_aggregate.aggregate`, which the worker renders for
  ``GET /metrics``.
* **Live handoff**: a worker that resumed a session whose reply another worker generates
  sends ``watch {rid, session}`` (answered ``watching {rid, session}`` once registered) and
  ``unwatch {session}`` when its last client of the session leaves; a worker that stored a
  final with no client of the session of its own sends ``stored {session, seq}``, which is
  forwarded to every other worker watching the session (and dropped when none does). The
  watches of a worker that exits go with it.

On the wire a backend is an index into the worker's own table of backends: its static
``[[llm.backends]]`` (its ``cfg``), then the addresses of its dns tables, which the master
keeps a replica of per worker (:mod:`chatd.backendtable`); the granter names backends by their
key (their base URL: :func:`chatd.stats.backend_keys`, an address's URL), so that workers of
two generations with different lists can share the slots during a reload. The dns tables'
addresses are those last given to :meth:`Services.set_addresses` (by
:mod:`chatd.master.discovery`). The slot limits (``max_parallel``, ``max_parallel_embed``,
``max_queue``, ``[limits] max_queued_per_key`` and ``max_in_flight_per_key``) are those last
given to :meth:`Services.configure`: the master calls it when a new configuration takes effect.

Runs in the master's single-threaded selector loop; every handler returns at once.

**Other timers.** The master's loop calls :meth:`Services.timeout` and :meth:`Services.tick` on
every turn; the :class:`chatd.master.requests.Clock` objects in ``clocks`` ride on them (the
control server's idle connections and accept back-off: it adds itself when it is built).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from chatd.backendtable import BackendTable
from chatd.config import Config
from chatd.master.requests import Clock
from chatd.master.slotgrant import Grant, Granter, Output, Queued, Recall, Refused
from chatd.master.workers import Worker, Workers
from chatd.metrics_aggregate import Retired, aggregate
from chatd.proto import control as proto

log = logging.getLogger("chatd.master")


class Services:
    """LLM slots and metrics for the workers of ``workers`` (registers its handlers there).

    Args:
        cfg: the configuration of the current generation.
        workers: the master's workers; their message handlers and exit hooks are installed.
    """

    def __init__(self, cfg: Config, workers: Workers) -> None:
        self.workers = workers
        self.granter = Granter([], cfg.llm.max_queue)  # the chat class (generations)
        self.embed_granter = Granter([], cfg.llm.max_queue)  # the embed class (embeddings)
        self.granters: dict[str, Granter] = {
            proto.SLOT_CLASS_CHAT: self.granter,
            proto.SLOT_CLASS_EMBED: self.embed_granter,
        }
        self.retired = Retired()
        self.cfg = cfg
        self.sets: dict[str, tuple[str, ...]] = {}  # dns tables' addresses (set_addresses)
        self.current = BackendTable(cfg.llm.backends)  # the current generation's backends
        # pid -> the worker's table of backends, as the worker keeps it (chatd.backendtable).
        self._tables: dict[int, BackendTable] = {}
        # The dns tables' state for status and /metrics (chatd.master.discovery sets it).
        self.discovery: Callable[[], list[dict[str, Any]]] = list
        # The fleet's slots for status (chatd.master.fleet sets it; None: not shared).
        self.fleet: Callable[[], dict[str, Any] | None] = lambda: None
        # The SQLite store writer's figures for /metrics (the arbiter sets it; None: none).
        self.store_writer: Callable[[], dict[str, Any] | None] = lambda: None
        # session -> the pids watching it, and pid -> the sessions it watches.
        self.watchers: dict[str, set[int]] = {}
        self._watched: dict[int, set[str]] = {}
        self.clocks: list[Clock] = []  # other timers of the master's loop (module docstring)
        self.configure(cfg)
        workers.handlers.update(
            {
                proto.SLOT_ACQUIRE: self._acquire,
                proto.SLOT_RELEASE: self._release,
                proto.SLOT_CANCEL: self._cancel,
                proto.HEALTH: self._health,
                proto.METRICS_REQUEST: self._metrics,
                proto.WATCH: self._watch,
                proto.UNWATCH: self._unwatch,
                proto.STORED: self._stored,
            }
        )
        workers.on_exit.append(self._exited)
        workers.on_spawn.append(self._spawned)

    def configure(self, cfg: Config) -> None:
        """Apply ``cfg``'s backends (``max_parallel`` for chat, ``max_parallel_embed`` for
        embed), ``max_queue`` and per-key bounds to the slots of both classes from now on.
        Backends kept by URL keep their slots in flight and their health; a lower limit takes
        effect as slots come back; dropped backends get no new slots. A dns table's backends
        are its addresses of :meth:`set_addresses`."""
        self.cfg = cfg
        self._reconfigure()

    def set_addresses(self, sets: Mapping[str, tuple[str, ...]]) -> None:
        """The addresses of the dns tables (by table URL; from :mod:`chatd.master.discovery`)
        are now ``sets``. Each worker whose table changes is told (``backends``) before
        anything that could name a new backend, and its waiters may use the new ones; the
        slots are reconfigured: a new address gets its slots, one gone gets no new slot and
        is drained (its requests in flight finish)."""
        before = {e.key: e for e in self.current.entries}
        self.sets = dict(sets)
        msg = {proto.T: proto.BACKENDS, "sets": {url: list(a) for url, a in self.sets.items()}}
        for worker in list(self.workers.by_pid.values()):
            table = self._tables.get(worker.pid)
            change = table.apply(self.sets) if table is not None else None
            if table is None or not change:
                continue
            self.workers.tell(worker, msg)
            new = [table.entries[n].key for n in (*change.added, *change.revived)]
            for kind, granter in self.granters.items():
                self.deliver(granter.allow(worker.pid, new), kind)
        self._reconfigure()
        after = {e.key: e for e in self.current.entries}
        held = {b.key: b.in_flight for b in self.granter.statistics().backends}
        for key in after.keys() - before.keys():
            e = after[key]
            log.info(
                "backend %s appeared (an address of %s): %d slots, %d embed slots",
                *(key, e.origin, e.config.max_parallel, e.config.max_parallel_embed),
            )
        for key in before.keys() - after.keys():
            log.info(
                "backend %s disappeared (no longer an address of %s): no new requests; "
                "its %d in flight finish",
                *(key, before[key].origin, held.get(key, 0)),
            )

    def _reconfigure(self) -> None:
        """The granters' backends from the current configuration and addresses: the live
        entries of a fresh table (the current generation's, for status and new keys)."""
        table = BackendTable(self.cfg.llm.backends)
        for url, origin in table.apply(self.sets).skipped:
            log.warning(
                "%s (an address of %s) is already another backend's: it keeps that one's "
                "slots, this table's settings do not apply to it",
                *(url, origin),
            )
        self.current = table
        limits, llm = self.cfg.limits, self.cfg.llm
        bounds = (llm.max_queue, limits.max_queued_per_key, limits.max_in_flight_per_key)
        for kind, granter in self.granters.items():
            pairs = [(e.key, e.config.capacity(kind)) for e in table.entries if e.live]
            self.deliver(granter.reconfigure(pairs, *bounds), kind)

    # -- the master loop's hooks ---------------------------------------------------------------

    def timeout(self, now: float, longest: float) -> float:
        """How long the loop may sleep before :meth:`tick` has position updates to send (or
        one of ``clocks`` has something to do)."""
        for granter in self.granters.values():
            due = granter.next_due()
            longest = longest if due is None else max(0.0, min(longest, due - now))
        for clock in self.clocks:
            longest = clock.timeout(now, longest)
        return longest

    def tick(self, now: float) -> None:
        """Send the queue position updates that are due (both classes); tick ``clocks``."""
        for kind, granter in self.granters.items():
            self.deliver(granter.tick(now), kind)
        for clock in self.clocks:
            clock.tick(now)

    # -- handlers (Workers._on_message) --------------------------------------------------------

    def _acquire(self, worker: Worker, msg: dict[str, Any]) -> None:
        kind = self._class_of(worker, msg)
        rid = msg.get("rid")
        if kind is None:
            return
        if not isinstance(rid, int):
            log.warning("worker %d: slot_acquire without an integer rid: %r", worker.slot, msg)
            return
        exclude = msg.get("exclude")
        excluded = set(exclude) if isinstance(exclude, list) else set()
        entries = self._table_of(worker).entries
        allowed = [e.key for i, e in enumerate(entries) if i not in excluded and e.live]
        client = msg.get("key")
        client = client if isinstance(client, str) else ""  # a worker that sends none: ""
        granter = self.granters[kind]
        self.deliver(granter.acquire(worker.pid, rid, allowed, time.monotonic(), client), kind)

    def _release(self, worker: Worker, msg: dict[str, Any]) -> None:
        kind = self._class_of(worker, msg)
        if kind is None:
            return
        key, count = self._key(worker, msg.get("backend")), msg.get("count", 1)
        client = msg.get("key")  # the client the slots were counted for; none: leased ones
        if key is not None and isinstance(count, int):
            client = client if isinstance(client, str) else None
            self.deliver(self.granters[kind].release(worker.pid, key, count, client), kind)

    def _cancel(self, worker: Worker, msg: dict[str, Any]) -> None:
        kind = self._class_of(worker, msg)
        rid = msg.get("rid")
        if kind is not None and isinstance(rid, int):
            self.deliver(self.granters[kind].cancel(worker.pid, rid), kind)

    def _health(self, worker: Worker, msg: dict[str, Any]) -> None:
        key, healthy = self._key(worker, msg.get("backend")), msg.get("healthy")
        if key is None or not isinstance(healthy, bool):
            return
        b = self.granter.backends.get(key)
        if b is not None and b.healthy is not healthy:
            level = logging.INFO if healthy else logging.WARNING
            log.log(
                level,
                "backend %s is %s (reported by worker %d); %s",
                *(key, "healthy" if healthy else "unhealthy", worker.slot),
                "granting its slots again" if healthy else "no slots for it until it recovers",
            )
        # One report for every class: the backend is the same server whatever it is asked.
        for kind, granter in self.granters.items():
            self.deliver(granter.report_health(key, healthy), kind)

    def _metrics(self, worker: Worker, msg: dict[str, Any]) -> None:
        live = [(w.state, w.stats) for w in self.workers.by_pid.values()]
        data = aggregate(
            live,
            self.retired,
            self.granter.statistics(),
            self.workers.restarts_total,
            embed=self.embed_granter.statistics(),
        )
        # RSS is sampled by the master (psutil, every second), not reported by the workers.
        data["memory"] = [
            {"slot": w.slot, "generation": w.generation, "rss": w.rss}
            for w in self.workers.by_pid.values()
            if w.rss
        ]
        data["memory_limit"] = worker.cfg.server.max_worker_rss_mb * 1024 * 1024
        data["discovery"] = self.discovery()  # the dns tables (chatd.master.discovery)
        data["fleet"] = self.fleet()  # the fleet's slots (chatd.master.fleet), None: not shared
        data["store_writer"] = self.store_writer()  # chatd.master.storewriter, None: none
        self.workers.tell(worker, {proto.T: proto.METRICS, "rid": msg.get("rid"), "data": data})

    def _watch(self, worker: Worker, msg: dict[str, Any]) -> None:
        session = msg.get("session")
        if not isinstance(session, str):
            log.warning("worker %d: watch without a session: %r", worker.slot, msg)
            return
        self.watchers.setdefault(session, set()).add(worker.pid)
        self._watched.setdefault(worker.pid, set()).add(session)
        answer = {proto.T: proto.WATCHING, "rid": msg.get("rid"), "session": session}
        self.workers.tell(worker, answer)

    def _unwatch(self, worker: Worker, msg: dict[str, Any]) -> None:
        session = msg.get("session")
        if isinstance(session, str):
            self._drop_watch(worker.pid, session)

    def _drop_watch(self, pid: int, session: str) -> None:
        pids = self.watchers.get(session)
        if pids is not None:
            pids.discard(pid)
            if not pids:
                del self.watchers[session]
        sessions = self._watched.get(pid)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._watched[pid]

    def _stored(self, worker: Worker, msg: dict[str, Any]) -> None:
        session, seq = msg.get("session"), msg.get("seq")
        if not isinstance(session, str) or not isinstance(seq, int):
            return
        notice = {proto.T: proto.STORED, "session": session, "seq": seq}
        for pid in self.watchers.get(session, ()):
            watcher = self.workers.by_pid.get(pid)
            if watcher is not None and pid != worker.pid:
                self.workers.tell(watcher, notice)

    def _spawned(self, worker: Worker) -> None:
        """A new worker: its table starts as it does (its static tables), then gets the
        current addresses, told first thing over its link."""
        table = self._tables[worker.pid] = BackendTable(worker.cfg.llm.backends)
        if table.apply(self.sets):
            sets = {url: list(a) for url, a in self.sets.items()}
            self.workers.tell(worker, {proto.T: proto.BACKENDS, "sets": sets})

    def _exited(self, worker: Worker) -> None:
        self._tables.pop(worker.pid, None)
        for session in list(self._watched.get(worker.pid, ())):
            self._drop_watch(worker.pid, session)
        self.retired.fold(worker.stats)
        held = {kind: sum(g.held(worker.pid).values()) for kind, g in self.granters.items()}
        if any(held.values()):
            log.info(
                "worker %d (pid %d) held %d LLM slots: taken back (%d chat, %d embed)",
                *(worker.slot, worker.pid, sum(held.values())),
                *(held[proto.SLOT_CLASS_CHAT], held[proto.SLOT_CLASS_EMBED]),
            )
        for kind, granter in self.granters.items():
            self.deliver(granter.owner_gone(worker.pid), kind)

    # -- helpers -------------------------------------------------------------------------------

    def _class_of(self, worker: Worker, msg: dict[str, Any]) -> str | None:
        """The slot class ``msg`` is about (absent: chat); None, logged, for an unknown one."""
        kind = proto.slot_class(msg)
        if kind is None:
            log.warning(
                "worker %d: %s of an unknown slot class: %r", worker.slot, msg[proto.T], msg
            )
        return kind

    def _table_of(self, worker: Worker) -> BackendTable:
        """The worker's table of backends (one never announced by a spawn: its static ones)."""
        table = self._tables.get(worker.pid)
        if table is None:
            table = self._tables[worker.pid] = BackendTable(worker.cfg.llm.backends)
        return table

    def _key(self, worker: Worker, index: Any) -> str | None:
        entries = self._table_of(worker).entries
        if isinstance(index, int) and 0 <= index < len(entries):
            return entries[index].key
        log.warning("worker %d: no backend %r in its configuration", worker.slot, index)
        return None

    def deliver(self, outputs: Iterable[Output], kind: str) -> None:
        """Deliver the answers of the granter of class ``kind``, naming it (chat: unnamed); a
        worker without a link gets nothing (the slots it was granted come back when it is
        reaped)."""
        for out in outputs:
            worker = self.workers.by_pid.get(out.owner)
            if worker is None:
                continue
            if isinstance(out, Grant):
                # Granted keys are those of the worker's table (its acquire, allow): found.
                index = self._table_of(worker).find(out.backend)
                msg = {proto.T: proto.SLOT_GRANT, "rid": out.rid, "backend": index}
                if out.lease:
                    msg["lease"] = True
            elif isinstance(out, Queued):
                msg = {proto.T: proto.SLOT_QUEUED, "rid": out.rid, "position": out.position}
            elif isinstance(out, Refused):
                msg = {proto.T: proto.SLOT_REFUSED, "rid": out.rid, "reason": out.reason}
            elif isinstance(out, Recall):
                msg = {proto.T: proto.SLOT_RECALL}
            self.workers.tell(worker, proto.with_class(msg, kind))
