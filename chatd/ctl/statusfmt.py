"""``chatctl status`` for people: the status document as a table read at a glance.

Pure formatting of the ``chatctl status --json`` document (``spec/interfaces.md``); the
transport is in :mod:`chatd.ctl.main`. :func:`is_healthy` and :func:`problems` decide the exit code
(0 healthy, 1 degraded) and say why.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

_COLUMNS = (
    "SLOT",
    "PID",
    "GEN",
    "STATE",
    "UPTIME",
    "CONNS",
    "MSG/S",
    "P50 MS",
    "P99 MS",
    "RSS MB",
    "CPU%",
    "RESTARTS",
    "HEARTBEAT",
)
_OTHER_STATES = {"starting": "starting (new)", "draining": "draining (old)", "stopping": "killed"}


def problems(data: Mapping[str, Any]) -> list[str]:
    """Why the daemon is not healthy (empty when it is): each reason is one short phrase."""
    out = []
    m = data.get("master") or {}
    if m.get("state") != "running":
        out.append(f"master {m.get('state', 'in an unknown state')}")
    workers = data.get("workers") or []
    if not workers:
        out.append("no worker")
    for w in workers:
        if w.get("state") != "ready":
            out.append(f"worker slot {w.get('id')} {w.get('state')}")
    for b in data.get("backends") or []:
        if b.get("healthy") is False:
            out.append(f"backend {b.get('url')} unhealthy")
    for d in data.get("discovery") or []:
        if isinstance(d, Mapping) and d.get("addresses") == []:
            out.append(f"backend {d.get('url')} resolves to no address")
    writer = (data.get("master") or {}).get("store_writer")
    if isinstance(writer, Mapping) and not writer.get("pid"):
        out.append("the session store's writer is not running (the master restarts it)")
    store = data.get("store") or {}
    if store.get("healthy") is False:
        out.append(f"session store unavailable ({store.get('error') or 'no detail'})")
    fleet = data.get("fleet")
    if isinstance(fleet, Mapping) and fleet.get("error"):
        out.append(f"fleet LLM slots not renewed ({fleet['error']})")
    return out


def is_healthy(data: Mapping[str, Any]) -> bool:
    """Running, every worker ready, no backend that is known to be unhealthy, and no dns
    table that resolves to no address (one whose resolution fails keeps its last addresses:
    shown, not a problem as long as it has some)."""
    return not problems(data)


def duration(seconds: float | None) -> str:
    """``4.2s``, ``37s``, ``5m02s``, ``2h03m``, ``3d04h``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _ms(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) and value else "-"


def _cells(w: Mapping[str, Any], other: bool) -> list[str]:
    rss = w.get("rss_bytes") or 0
    reported = w.get("latency_ms")
    latency: Mapping[str, Any] = reported if isinstance(reported, Mapping) else {}
    state = str(w.get("state", "?"))
    heartbeat = w.get("last_heartbeat_s")
    return [
        str(w.get("id", "?")),
        str(w.get("pid") or "-"),
        str(w.get("generation", "?")),
        _OTHER_STATES.get(state, state) if other else state,
        duration(w.get("uptime_s")) if w.get("pid") else "-",
        str(w.get("connections", 0)),
        f"{w.get('msg_per_s', 0.0):.1f}",
        _ms(latency.get("p50")),
        _ms(latency.get("p99")),
        f"{rss / 1e6:.1f}" if rss else "-",
        f"{w.get('cpu_percent', 0.0):.1f}",
        str(w.get("restarts", 0)),
        duration(heartbeat) + " ago" if heartbeat is not None else "-",
    ]


def _slots(b: Mapping[str, Any]) -> str:
    """``1/4 in use, 1 leased (idle)``: a slot a worker keeps leased while nothing runs on it
    is not load, so it is shown apart. ``2/4 in flight`` (slots granted) for a document
    without the split (a master older than it)."""
    limit = b.get("max_parallel", "?")
    in_use, idle = b.get("in_use"), b.get("leased_idle")
    if isinstance(in_use, int) and isinstance(idle, int):
        return f"{in_use}/{limit} in use, {idle} leased (idle)"
    return f"{b.get('in_flight', 0)}/{limit} in flight"


def _fleet(b: Mapping[str, Any]) -> str:
    """`` (fleet: 4/4 in flight over 2 hosts, 2 held here)``, or "" when not shared."""
    f = b.get("fleet")
    if not isinstance(f, Mapping):
        return ""
    return (
        f" (fleet: {f.get('in_flight', 0)}/{b.get('max_parallel', '?')} in flight over "
        f"{f.get('hosts', 0)} hosts, {f.get('here_held', 0)} held here)"
    )


def _keys(keys: Any, label: str = "busiest clients") -> str:
    """``busiest clients (queued/in flight): 3f2a9c1b0d4e 12/1, 10.0.0.7 1/0``, or "" when no
    client has requests waiting. A key is a token's hash (cut to 12 characters: enough to
    tell clients apart) or an address; ``(none)`` is the key of takeovers."""
    rows = [k for k in keys if isinstance(k, Mapping)] if isinstance(keys, list) else []
    if not any(isinstance(k.get("queued"), int) and k["queued"] > 0 for k in rows):
        return ""
    cells = []
    for k in rows:
        key = str(k.get("key") or "(none)")
        if len(key) == 32 and all(c in "0123456789abcdef" for c in key):
            key = key[:12]
        cells.append(f"{key} {k.get('queued', 0)}/{k.get('in_flight', 0)}")
    return f"{label} (queued/in flight): " + ", ".join(cells)


def _table(rows: Sequence[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _master_lines(data: Mapping[str, Any]) -> list[str]:
    m = data.get("master") or {}
    workers = data.get("workers") or []
    ready = sum(1 for w in workers if w.get("state") == "ready")
    first = (
        f"chatd {m.get('state', '?')}: master pid {m.get('pid')}, generation "
        f"{m.get('generation')}, up {duration(m.get('uptime_s'))}, bind {m.get('bind')}, "
        f"{ready}/{len(workers)} workers ready"
    )
    second = [f"config {m.get('config') or '(built-in defaults)'}"]
    if m.get("version"):
        second.insert(0, f"chatd {m['version']}")
    last = m.get("last_reload")
    if isinstance(last, Mapping):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.get("at") or 0))
        second.append(f"last reload {when} {'ok' if last.get('ok') else 'FAILED'}")
    if m.get("operation"):
        second.append(f"{m['operation']} in progress")
    migrate = m.get("tcp_migrate_req")
    if migrate is not None:
        note = " (a retired slot's queued connections are reset)" if migrate == 0 else ""
        second.append(f"tcp_migrate_req {migrate}{note}")
    lines = [first, "; ".join(second)]
    if isinstance(last, Mapping) and not last.get("ok"):
        lines.append(f"last reload: {last.get('message')}")
    return lines


def _discovery(d: Mapping[str, Any]) -> str:
    """One dns table: ``dns http://ollama:11434: 2 addresses (10.0.0.5, 10.0.0.6), resolved
    1.2s ago``; a failing resolution says so, and that the last addresses are kept."""
    addresses = d.get("addresses")
    line = f"dns {d.get('url')}: "
    if addresses is None:
        line += "not resolved yet"
    else:
        listed = f" ({', '.join(map(str, addresses))})" if addresses else ""
        line += f"{len(addresses)} address{'es' if len(addresses) != 1 else ''}{listed}"
        line += f", resolved {duration(d.get('resolved_s_ago'))} ago"
    if d.get("error"):
        line += f"; CANNOT RESOLVE {d.get('host')}: {d['error']}"
        line += " (the last addresses are kept)" if addresses else ""
    return line


def format_status(data: Mapping[str, Any]) -> str:
    """The human-readable ``chatctl status``: master lines, the worker table, backends, queue,
    totals, and what is wrong when something is. A dns table's addresses are backends of
    their own (``from`` the table), and each table has a ``dns`` line. The embed class
    (embeddings: slots and a queue of their own) is shown after the chat figures when the
    document has it: ``; embed ...`` on each backend line, and an ``embed queue`` line."""
    lines = _master_lines(data)
    rows = [list(_COLUMNS)]
    rows += [_cells(w, False) for w in data.get("workers") or []]
    rows += [_cells(w, True) for w in data.get("other_workers") or []]
    lines += ["", *_table(rows), ""]
    for b in data.get("backends") or []:
        health = {True: "healthy", False: "UNHEALTHY", None: "health unknown"}.get(
            b.get("healthy"), "?"
        )
        origin = f", from {b['discovered_from']}" if b.get("discovered_from") else ""
        line = f"backend {b.get('url')} ({b.get('api')}{origin}): {health}, {_slots(b)}"
        line += _fleet(b)
        embed = b.get("embed")
        if isinstance(embed, Mapping):
            line += f"; embed {_slots(embed)}{_fleet(embed)}"
        lines.append(line)
    fleet = data.get("fleet")
    if isinstance(fleet, Mapping):
        lines.append(
            f"LLM slots shared with the other hosts of the Redis store, as {fleet.get('host')}"
        )
    lines += [_discovery(d) for d in data.get("discovery") or [] if isinstance(d, Mapping)]
    writer = (data.get("master") or {}).get("store_writer")
    if isinstance(writer, Mapping):
        pid = writer.get("pid")
        state = f"pid {pid}" if pid else "NOT RUNNING (restarting)"
        restarts = writer.get("restarts") or 0
        line = f"store writer {state} for {writer.get('path')}"
        line += f", {restarts} restart{'s' if restarts != 1 else ''}" if restarts else ""
        fig = writer.get("store")
        if isinstance(fig, Mapping) and "commits" in fig:
            line += (
                f": {fig['commits']} commits, commit p50/p99 {fig.get('commit_p50_ms', 0):.2f}/"
                f"{fig.get('commit_p99_ms', 0):.2f} ms"
            )
            if "wal_pages" in fig:
                line += f", WAL {fig['wal_pages']} pages, {fig.get('checkpoints', 0)} checkpoints"
        lines.append(line)
    store = data.get("store") or {}
    if store.get("healthy") is False:
        slots = ", ".join(str(s) for s in store.get("failing_workers") or [])
        lines.append(f"session store: UNAVAILABLE (workers {slots}): {store.get('error')}")
    q, t = data.get("queue") or {}, data.get("totals") or {}
    lat = t.get("latency_ms") or {}
    lines.append(f"queue {q.get('depth', 0)}/{q.get('max', '?')} waiting for an LLM slot")
    busiest = _keys(q.get("keys"))
    if busiest:
        lines.append(busiest)
    eq = data.get("embed_queue")
    if isinstance(eq, Mapping):
        lines.append(
            f"embed queue {eq.get('depth', 0)}/{eq.get('max', '?')} waiting for an embed slot"
        )
        busiest = _keys(eq.get("keys"), "busiest embedding clients")
        if busiest:
            lines.append(busiest)
    lines.append(
        f"totals: {t.get('connections', 0)} connections, {t.get('msg_per_s', 0):.1f} msg/s, "
        f"{t.get('messages_total', 0)} messages, {t.get('errors_total', 0)} errors, "
        f"{t.get('worker_restarts_total', 0)} worker restarts, latency p50/p95/p99 "
        f"{_ms(lat.get('p50'))}/{_ms(lat.get('p95'))}/{_ms(lat.get('p99'))} ms"
    )
    moves = t.get("handoff")
    if isinstance(moves, Mapping) and any(moves.values()):
        lines.append(
            f"handoffs: {moves.get('moved', 0)} open WebSockets moved to a new worker, "
            f"{moves.get('fell_back', 0)} closed with 1001 instead, "
            f"{moves.get('deferred', 0)} deferred, {moves.get('aborted', 0)} aborted, "
            f"{moves.get('refused', 0)} refused"
        )
    wrong = problems(data)
    if wrong:
        lines.append("DEGRADED: " + "; ".join(wrong))
    return "\n".join(lines)
