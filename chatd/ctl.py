"""``chatctl``: talk to a running chatd master over its control socket.

::

    chatctl [--socket PATH] [--config PATH] [--timeout S] status [--json]

The socket is ``--socket``, else ``$CHATD_CONTROL_SOCKET``, else the config's ``[control]
socket`` (``--config``, or ``/etc/chatd/chatd.toml`` when it exists), else
``/run/chatd/control.sock``.

Exit codes of ``status`` (LSB, as ``systemctl status``): 0 running and healthy (every worker
ready, no backend known to be unhealthy), 1 running but degraded, 3 not running (no socket, or
nobody accepts on it), 4 unknown (the master does not answer, or we may not ask it). 78: the
config file given to find the socket is invalid.

Transport (:func:`request`) and formatting (:func:`format_status`) are kept apart, so that
scripts and tests can use either alone.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from chatd.config import load
from chatd.errors import ConfigError, ControlError, ExitCode
from chatd.proto import control as proto

ENV_SOCKET = "CHATD_CONTROL_SOCKET"
STATUS_UNKNOWN = 4  # LSB: "program or service status is unknown"


class NotRunning(Exception):
    """Nothing listens on the control socket."""


def find_socket(option: str | None, config_path: str | None) -> str:
    """The control socket path, by the precedence in the module docstring.

    Raises:
        ConfigError: ``config_path`` (or the default config file) is invalid.
    """
    if option:
        return option
    if os.environ.get(ENV_SOCKET):
        return os.environ[ENV_SOCKET]
    # load(None) reads the default file if it exists, else returns the built-in defaults.
    return load(config_path).control.socket


def request(path: str, msg: Mapping[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one command to the master and return its reply.

    Raises:
        NotRunning: the socket does not exist or nobody accepts on it.
        TimeoutError: no complete reply within ``timeout`` seconds.
        ControlError: the master closed the connection or sent garbage.
        OSError: anything else (a permission problem, for example).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotRunning(
                f"chatd is not running (control socket {path}: {exc.strerror})"
            ) from None
        sock.sendall(proto.encode(msg))
        decoder = proto.Decoder()
        while True:
            data = sock.recv(65536)
            if not data:
                raise ControlError("the master closed the connection without answering")
            replies = decoder.feed(data)
            if replies:
                return replies[0]


def is_healthy(data: Mapping[str, Any]) -> bool:
    """Running, every worker ready, and no backend that the workers report unhealthy."""
    workers = data.get("workers") or []
    return (
        data.get("master", {}).get("state") == "running"
        and bool(workers)
        and all(w.get("state") == "ready" for w in workers)
        and not any(b.get("healthy") is False for b in data.get("backends") or [])
    )


def _duration(seconds: float | None) -> str:
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


_COLUMNS = ("ID", "PID", "STATE", "UPTIME", "CONNS", "MSGS", "ERRORS", "RESTARTS", "RSS MB", "CPU%")


def _worker_cells(w: Mapping[str, Any]) -> list[str]:
    rss = w.get("rss_bytes") or 0
    return [
        str(w.get("id", "?")),
        str(w.get("pid") or "-"),
        str(w.get("state", "?")),
        _duration(w.get("uptime_s")) if w.get("pid") else "-",
        str(w.get("connections", 0)),
        str(w.get("messages_total", 0)),
        str(w.get("errors_total", 0)),
        str(w.get("restarts", 0)),
        f"{rss / 1e6:.1f}",
        f"{w.get('cpu_percent', 0.0):.1f}",
    ]


def format_status(data: Mapping[str, Any]) -> str:
    """The human-readable ``chatctl status``: a master line, a worker table, backends, totals."""
    m = data.get("master", {})
    lines = [
        f"chatd {m.get('state', '?')}: master pid {m.get('pid')}, generation "
        f"{m.get('generation')}, up {_duration(m.get('uptime_s'))}, bind {m.get('bind')}, "
        f"config {m.get('config') or '(built-in defaults)'}",
        "",
    ]
    rows = [list(_COLUMNS)] + [_worker_cells(w) for w in data.get("workers") or []]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    for b in data.get("backends") or []:
        health = {True: "healthy", False: "UNHEALTHY", None: "health unknown"}.get(
            b.get("healthy"), "?"
        )
        lines.append(
            f"backend {b.get('url')} ({b.get('api')}): {health}, "
            f"{b.get('in_flight', 0)}/{b.get('max_parallel', '?')} in flight"
        )
    q, t = data.get("queue", {}), data.get("totals", {})
    lat = t.get("latency_ms") or {}
    lines.append(f"queue {q.get('depth', 0)}/{q.get('max', '?')}")
    lines.append(
        f"totals: {t.get('connections', 0)} connections, {t.get('messages_total', 0)} messages, "
        f"{t.get('errors_total', 0)} errors, {t.get('worker_restarts_total', 0)} worker restarts, "
        f"latency p50/p95/p99 {lat.get('p50', 0)}/{lat.get('p95', 0)}/{lat.get('p99', 0)} ms"
    )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatctl", description="Control a running chatd.")
    parser.add_argument("--socket", help="control socket path")
    parser.add_argument("--config", help="chatd config file, to find the control socket")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the master (10)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="whole-daemon status")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``chatctl`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        path = find_socket(args.socket, args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return ExitCode.CONFIG
    try:
        reply = request(path, {proto.T: proto.STATUS}, timeout=args.timeout)
    except NotRunning as exc:
        print(f"chatctl: {exc}", file=sys.stderr)
        return ExitCode.NOT_RUNNING
    except TimeoutError:
        print(f"chatctl: the master at {path} did not answer in {args.timeout:g}s", file=sys.stderr)
        return STATUS_UNKNOWN
    except (ControlError, OSError) as exc:
        print(f"chatctl: {path}: {exc}", file=sys.stderr)
        return STATUS_UNKNOWN
    if not reply.get("ok"):
        print(f"chatctl: {reply.get('error', 'the master refused the command')}", file=sys.stderr)
        return ExitCode.FAILURE
    data = reply.get("data") or {}
    try:
        print(json.dumps(data, indent=2, default=str) if args.json else format_status(data))
        sys.stdout.flush()
    except BrokenPipeError:
        # `chatctl status --json | head`: the reader left; that is not our failure.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return ExitCode.OK if is_healthy(data) else ExitCode.FAILURE
