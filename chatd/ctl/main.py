"""``chatctl``: talk to a running chatd master over its control socket.

::

    chatctl [--socket PATH] [--config PATH] [--timeout S] status [--json] [--timeout S]
    chatctl ... reload [--timeout S]
    chatctl ... stop [--timeout S]
    chatctl ... scale N [--timeout S]

The socket is ``--socket``, else ``$CHATD_CONTROL_SOCKET``, else the config's ``[control]
socket`` (``--config``, or ``/etc/chatd/chatd.toml`` when it exists), else
``/run/chatd/control.sock``.

``--timeout S`` means one thing wherever it is written, before or after the command: the
longest chatctl waits for the whole command, from connecting to its end (given twice, the
last one counts). Without it: ``status`` 10 s, ``reload`` 120 s, ``scale`` 30 s, ``stop`` 10 s
for the master's answer, then its ``shutdown_delay`` + ``graceful_timeout`` + 15 s for it
to exit.

What each command waits for, and its exit codes (LSB: ``status`` as ``systemctl status``,
the others as init scripts):

* ``status``: 0 running and healthy (every worker ready, no backend known to be unhealthy),
  1 running but degraded (the reasons are printed), 3 not running, 4 unknown (no answer in
  time, or the master turned the connection away).
* ``reload``: returns when the reload has finished: every worker of the new generation
  ready, no worker of the old one accepting (they may still be draining). 0 with the new
  generation; 1 with what was wrong (every problem of an invalid config), or no answer in
  time; the daemon then still serves the old generation, unchanged. 7 not running.
* ``stop``: graceful stop (as SIGTERM); returns when the master has exited: 0. 1 when it
  has not exited in time. Already stopped: 0.
* ``scale N``: sets the number of workers until the next reload or restart; returns when N
  workers are ready: 0; 1 when refused, or when they are not all ready in time. 7 not
  running.

4 in every case: permission denied, by the socket file's mode or by the master's peer check
(LSB: "user had insufficient privilege" for actions, "status unknown" for ``status``: one code,
whatever the command). 78 in every case: the config file given to find the socket is invalid.
Transport (:func:`request`, :class:`Connection`) and formatting (:mod:`chatd.ctl.statusfmt`)
are kept apart, so that scripts and tests can use either alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from chatd import __version__
from chatd.config import load
from chatd.ctl.statusfmt import format_status, is_healthy
from chatd.errors import ConfigError, ControlError, ExitCode
from chatd.proto import control as proto

__all__ = ["Connection", "NotRunning", "find_socket", "format_status", "is_healthy", "main"]

ENV_SOCKET = "CHATD_CONTROL_SOCKET"
STATUS_UNKNOWN = 4  # LSB status: "program or service status is unknown"
PERMISSION_DENIED = 4  # LSB init actions: "user had insufficient privilege"; status: unknown
NOT_RUNNING_ACTION = 7  # LSB init actions: "program is not running"
STOP_MARGIN = 15.0  # seconds beyond the master's graceful_timeout that `stop` waits by default
TIMEOUTS = {"status": 10.0, "reload": 120.0, "stop": 10.0, "scale": 30.0}
"""The default ``--timeout`` of each command (``stop``: for the master's answer only)."""
DENIED_PREFIX = "permission denied"
"""How the master's refusal of a peer begins (:mod:`chatd.proto.control`)."""


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


class Connection:
    """One blocking connection to the master: send a command, read its reply, wait for EOF.

    ``timeout`` bounds everything done on it: connecting and every :meth:`call` together
    (a deadline, not a time per call).

    Raises (from the constructor):
        NotRunning: the socket does not exist or nobody accepts on it.
        OSError: anything else (a permission problem, for example).
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._decoder = proto.Decoder()
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise NotRunning(
                f"chatd is not running (control socket {path}: {exc.strerror})"
            ) from None
        except OSError:
            self.sock.close()
            raise

    def _left(self) -> float:
        """Sets the socket's timeout to what is left of the deadline; TimeoutError if none."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        return left

    def call(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        """Send ``msg`` and return the master's reply.

        Raises:
            TimeoutError: no complete reply before the deadline.
            ControlError: the master closed the connection or sent garbage.
        """
        self._left()
        # The master answers a connection it turns away (a refused peer, too many
        # connections) and closes it at once, maybe before our request arrived: its answer
        # is still there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(proto.encode(msg))
        while True:
            self._left()
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""  # closed with our request unread: the same as EOF here
            if not data:
                raise ControlError("the master closed the connection without answering")
            replies = self._decoder.feed(data)
            if replies:
                return replies[0]

    def wait_closed(self, timeout: float) -> bool:
        """Wait until the master closes the connection (it does so when it exits)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


class Refused(Exception):
    """The master turned the request away: ``code`` is chatctl's exit code for it."""

    def __init__(self, error: str, code: int) -> None:
        super().__init__(error)
        self.code = code


def _answer(conn: Connection, msg: Mapping[str, Any], failure: int) -> dict[str, Any]:
    """The ``data`` of the master's answer to ``msg``.

    Raises:
        Refused: the answer is a refusal: permission denied (exit 4 whatever the command),
            anything else (exit ``failure``).
    """
    reply = conn.call(msg)
    if reply.get("ok"):
        data = reply.get("data")
        return data if isinstance(data, dict) else {}
    error = str(reply.get("error") or "the master refused")
    denied = error.startswith(DENIED_PREFIX)
    raise Refused(error, PERMISSION_DENIED if denied else failure)


def request(path: str, msg: Mapping[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one command to the master and return its reply (see :class:`Connection`)."""
    conn = Connection(path, timeout)
    try:
        return conn.call(msg)
    finally:
        conn.close()


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(") ", 1)[1].startswith(("Z", "X"))
    except (OSError, IndexError):
        return True


def _print(text: str) -> None:
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # `chatctl status --json | head`: the reader left; that is not our failure.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _status(conn: Connection, args: argparse.Namespace) -> int:
    data = _answer(conn, {proto.T: proto.STATUS}, STATUS_UNKNOWN)
    _print(json.dumps(data, indent=2, default=str) if args.json else format_status(data))
    return ExitCode.OK if is_healthy(data) else ExitCode.FAILURE


def _reload(conn: Connection, args: argparse.Namespace) -> int:
    data = _answer(conn, {proto.T: proto.RELOAD}, ExitCode.FAILURE)
    _print(str(data.get("message") or f"reloaded: generation {data.get('generation')}"))
    return ExitCode.OK


def _stop(conn: Connection, args: argparse.Namespace) -> int:
    data = _answer(conn, {proto.T: proto.STOP}, ExitCode.FAILURE)
    pid = int(data.get("pid") or 0)
    # The drain starts after the master's shutdown_delay (absent from older masters: 0).
    graceful = float(data.get("graceful_timeout") or 30.0) + float(data.get("shutdown_delay") or 0)
    if args.timeout is not None:
        deadline = conn.deadline
    else:
        deadline = time.monotonic() + graceful + STOP_MARGIN
    wait = max(0.0, deadline - time.monotonic())
    print(f"stopping chatd (master pid {pid}): draining, up to {wait:g}s", file=sys.stderr)
    conn.wait_closed(wait)
    while not process_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not process_gone(pid):
        print(f"chatctl: chatd (pid {pid}) is still stopping after {wait:g}s", file=sys.stderr)
        return ExitCode.FAILURE
    _print("chatd stopped")
    return ExitCode.OK


def _scale(conn: Connection, args: argparse.Namespace) -> int:
    _answer(conn, {proto.T: proto.SCALE, "workers": args.workers}, ExitCode.FAILURE)
    while True:
        data = _answer(conn, {proto.T: proto.STATUS}, ExitCode.FAILURE)
        workers = data.get("workers") or []
        ready = sum(1 for w in workers if w.get("state") == "ready")
        if len(workers) == args.workers and ready == args.workers:
            _print(f"{ready} workers ready (until the next reload or restart)")
            return ExitCode.OK
        if time.monotonic() + 0.1 > conn.deadline:
            print(
                f"chatctl: {args.workers} workers wanted, {ready} ready after {_limit(args):g}s",
                file=sys.stderr,
            )
            return ExitCode.FAILURE
        time.sleep(0.1)


_COMMANDS: dict[str, Callable[[Connection, argparse.Namespace], int]] = {
    "status": _status,
    "reload": _reload,
    "stop": _stop,
    "scale": _scale,
}


TIMEOUT_HELP = (
    "seconds: the longest chatctl waits for the whole command, from connecting to its end, "
    "wherever --timeout is written (before or after the command; given twice, the last one "
    "counts). "
    "Default: status 10, reload 120, scale 30; stop 10 for the master's answer, then its "
    "shutdown_delay + graceful_timeout + 15 for it to exit"
)


def _limit(args: argparse.Namespace) -> float:
    """The command's ``--timeout``, or its default."""
    return float(args.timeout) if args.timeout is not None else TIMEOUTS[args.command]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatctl",
        description="Control a running chatd.",
        epilog="Exit codes: 0 done (status: healthy); 1 failed (status: degraded); "
        "3 not running (status); 4 permission denied (every command), or status unknown; "
        "7 not running (reload, scale); 78 invalid config file.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--socket", help="control socket path")
    parser.add_argument("--config", help="chatd config file, to find the control socket")
    parser.add_argument("--timeout", type=float, metavar="S", help=TIMEOUT_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="whole-daemon status")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    reload = commands.add_parser("reload", help="re-read the config, replace every worker")
    stop = commands.add_parser("stop", help="graceful stop; waits for the master to exit")
    scale = commands.add_parser("scale", help="set the number of workers until the next reload")
    scale.add_argument("workers", type=int, help="number of workers")
    for sub in (status, reload, stop, scale):
        # The same option as before the command: SUPPRESS keeps the value given there
        # when it is not repeated here.
        sub.add_argument(
            "--timeout", type=float, metavar="S", default=argparse.SUPPRESS, help=TIMEOUT_HELP
        )
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
    unknown = STATUS_UNKNOWN if args.command == "status" else ExitCode.FAILURE
    limit = _limit(args)
    try:
        conn = Connection(path, limit)
    except NotRunning as exc:
        print(f"chatctl: {exc}", file=sys.stderr)
        return {"status": ExitCode.NOT_RUNNING, "stop": ExitCode.OK}.get(
            args.command, NOT_RUNNING_ACTION
        )
    except PermissionError as exc:
        print(f"chatctl: {path}: {exc.strerror or exc}", file=sys.stderr)
        return PERMISSION_DENIED
    except TimeoutError:
        print(f"chatctl: the master at {path} did not answer within {limit:g}s", file=sys.stderr)
        return unknown
    except OSError as exc:
        print(f"chatctl: {path}: {exc.strerror or exc}", file=sys.stderr)
        return unknown
    try:
        return _COMMANDS[args.command](conn, args)
    except Refused as exc:
        print(f"chatctl: {exc}", file=sys.stderr)
        return exc.code
    except TimeoutError:
        print(f"chatctl: the master at {path} did not answer within {limit:g}s", file=sys.stderr)
        return unknown
    except (ControlError, OSError) as exc:
        print(f"chatctl: {path}: {exc}", file=sys.stderr)
        return unknown
    finally:
        conn.close()
