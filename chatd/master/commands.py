"""What the master answers on its control socket, and the status it shows systemd.

chatctl's commands (``{"t": ...}`` requests, see :mod:`chatd.proto.control`):

* ``status``: the ``chatctl status --json`` document (:func:`status_document`);
* ``reload``: queued (:class:`chatd.master.operations.Operations`); answered when the reload has
  finished, with ``{"generation", "message"}`` or one error sentence;
* ``scale {workers: N}``: answered at once (the new workers start in the background);
  refused while a reload or a recycle runs;
* ``stop``: answered at once with ``{"pid", "graceful_timeout", "shutdown_delay"}``, then
  the graceful stop starts (after the pre-drain of ``shutdown_delay`` seconds, if any); the
  connection stays open until the master exits (it is exempt from the control server's idle
  timeout), so the caller can wait for EOF.

:func:`status_line` is the one-liner for systemd's ``STATUS=``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any

from chatd import __version__
from chatd.master.listeners import BindError
from chatd.master.requests import Commands, Request
from chatd.master.scale import scale_to
from chatd.master.status import aggregate_status
from chatd.master.supervision import looping
from chatd.proto import control as proto

if TYPE_CHECKING:
    from chatd.master.arbiter import Master


def handlers(master: Master) -> Commands:
    """The control socket's handlers, bound to ``master``; the control server built with
    them runs its timers from the master's loop through ``master.services``."""

    def status(request: Request) -> None:
        request.ok(status_document(master))

    def reload(request: Request) -> None:
        if master.stopping:
            request.fail("the daemon is stopping; reload refused")
            return
        assert master.ops is not None
        master.ops.request_reload(request, "chatctl")

    def scale(request: Request) -> None:
        count = request.msg.get("workers")
        if not isinstance(count, int) or isinstance(count, bool):
            request.fail(f"scale needs an integer 'workers', got {count!r}")
            return
        why = master.scale_refusal()
        if why:
            request.fail(why)
            return
        assert master.workers is not None
        try:
            text = scale_to(master.workers, count)
        except (ValueError, BindError) as exc:
            request.fail(str(exc))
            return
        request.ok({"workers": count, "message": text})

    def stop(request: Request) -> None:
        server = master.cfg.server
        request.hold()  # the caller waits for EOF: the master has exited
        answer = {"pid": os.getpid(), "graceful_timeout": server.graceful_timeout}
        request.ok({**answer, "shutdown_delay": server.shutdown_delay})
        master.handle_term()

    table = {proto.STATUS: status, proto.RELOAD: reload, proto.SCALE: scale, proto.STOP: stop}
    return Commands(table, [] if master.services is None else master.services.clocks)


def status_document(master: Master) -> dict[str, Any]:
    """The ``chatctl status --json`` document (``spec/interfaces.md``, plus extra fields)."""
    workers, ops = master.workers, master.ops
    assert workers is not None and ops is not None
    now = time.monotonic()
    rows, others = workers.snapshots(now)
    doc = {
        "pid": os.getpid(),
        "uptime_s": round(now - master.started, 3),
        "generation": workers.generation,
        "config": master.cfg.path or None,
        "bind": master.bind,
        "state": master.state,
        "workers_wanted": len(workers.slots),
        "workers_ready": sum(1 for r in rows if r.state == "ready"),
        "operation": ops.busy,
        "last_reload": ops.last_reload,
        "tcp_migrate_req": master.tcp_migrate_req,
        "systemd": master.notifier.enabled,
        "python": sys.version.split()[0],
        "version": __version__,
        "store_writer": None if master.store_writer is None else master.store_writer.snapshot(),
    }
    return aggregate_status(
        master=doc,
        workers=rows,
        others=others,
        cfg=master.cfg,
        restarts_total=workers.restarts_total,
        retired=workers.retired,
        slots=None if master.services is None else master.services.granter.statistics(),
        embed_slots=None if master.services is None else master.services.embed_granter.statistics(),
        table=None if master.services is None else master.services.current,
        discovery=() if master.services is None else master.services.discovery(),
        fleet=None if master.services is None else master.services.fleet(),
    )


def status_line(master: Master) -> str:
    """``2/2 workers ready, 37 connections, 120 msg/s, generation 3`` (+ what is wrong)."""
    workers = master.workers
    assert workers is not None
    now = time.monotonic()
    rows, others = workers.snapshots(now)
    ready = sum(1 for r in rows if r.state == "ready")
    counts = (r.stats.get("connections") for r in (*rows, *others))
    conns = sum(c for c in counts if isinstance(c, int) and not isinstance(c, bool))
    rate = sum(r.msg_per_s for r in (*rows, *others))
    line = (
        f"{ready}/{len(rows)} workers ready, {conns} connections, {rate:.0f} msg/s, "
        f"generation {workers.generation}"
    )
    for slot in looping(workers.slots):
        line += f"; worker slot {slot.id} crash-looping"
    if master.ops is not None and master.ops.busy:
        line += f"; {master.ops.busy} in progress"
    last = master.ops.last_reload if master.ops is not None else None
    if last is not None and not last["ok"]:
        line += f"; last reload failed ({last['message'][:200]})"
    return line
