"""Logging setup for chatd's processes: stdlib ``logging`` to stderr, for journald.

Every line carries the time (UTC, milliseconds), the level, the logger, the pid and the role of
the process::

    2026-11-27T13:45:33.123Z INFO chatd.master[1234] master: worker 2 (pid 1240) started

or, with ``[log] format = "json"``, one JSON object per line with the same fields
(``ts``, ``level``, ``logger``, ``pid``, ``role``, ``msg`` and ``exc`` for a traceback), plus
``worker`` (``SLOT/PID``, as in the welcome frame) in a worker, and ``session`` and ``msg_id``
(whole) on a line about a session or a message: a call site passes ``extra=about(...)``.

Under systemd, lines carry a syslog priority prefix for journald only when stderr really is
the journal: ``JOURNAL_STREAM`` names the journal stream's ``DEVICE:INODE`` and is compared
with stderr's, as systemd.exec(5) asks (the variable is inherited by children whose stderr
was redirected elsewhere, where a ``<3>`` prefix would be garbage).

Only entry points configure logging (:func:`setup_logging`); modules just use
``logging.getLogger(__name__)``. After a fork the worker calls :func:`set_role`: the handler
stays, the pid is read per record, so nothing else has to change.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

from chatd.config import LogConfig

_role = "chatd"


def set_role(role: str) -> None:
    """Name this process's role in every later line (``master``, ``worker 2``, ``chatctl``)."""
    global _role
    _role = role


def about(session: str | None, msg_id: str | None = None) -> dict[str, str]:
    """The ``extra=`` of a log call about ``session`` (and message ``msg_id``): JSON lines
    carry them as the fields ``session`` and ``msg_id``; text lines are unchanged."""
    fields = {"session": session, "msg_id": msg_id}
    return {k: v for k, v in fields.items() if v is not None}


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER[PID] ROLE: MESSAGE`` plus the traceback, if any, on the next lines."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record)} {record.levelname} {record.name}[{record.process}] "
            f"{_role}: {record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a traceback goes into ``exc`` (so one record stays one line)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "role": _role,
            "msg": record.getMessage(),
        }
        if _role.startswith("worker "):  # set_role(f"worker {slot}") in a worker process
            doc["worker"] = f"{_role[len('worker ') :]}/{record.process}"
        for key in ("session", "msg_id"):  # from extra=about(...)
            value = getattr(record, key, None)
            if isinstance(value, str):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


_SYSLOG_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}


class JournalPrefix(logging.Formatter):
    """Prefixes each line with its syslog priority (``<3>`` for ERROR, ...), which journald
    reads from a service's stderr, so ``journalctl -p err`` finds chatd's errors."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_SYSLOG_PRIORITY.get(record.levelname, 6)}>"
        # Every line of a multi-line record (a traceback) carries it, or journald would
        # store the continuation lines at the default priority.
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def writes_to_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd connected: ``JOURNAL_STREAM`` is
    ``DEVICE:INODE`` of that stream, compared with the stream's own (systemd.exec(5)). The
    variable alone is not enough: a child of a service inherits it with stderr redirected."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        expected = (int(dev), int(ino))
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # unset or malformed; no fd (a StringIO)
        return False
    return (st.st_dev, st.st_ino) == expected


class _ChatdHandler(logging.StreamHandler[TextIO]):
    """Marks the handler this module installed, so a second setup replaces it."""


def setup_logging(cfg: LogConfig, role: str, stream: TextIO | None = None) -> None:
    """Send every log record at ``cfg.level`` or above to ``stream`` (stderr by default).

    Idempotent: a second call (a reload, a test) replaces the handler it installed before and
    leaves handlers installed by others (pytest's, for example) alone.
    """
    set_role(role)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ChatdHandler)]:
        root.removeHandler(old)
    handler = _ChatdHandler(stream if stream is not None else sys.stderr)
    formatter: logging.Formatter = JsonFormatter() if cfg.format == "json" else TextFormatter()
    if stream is None and writes_to_journal(sys.stderr):
        formatter = JournalPrefix(formatter)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(cfg.level.upper())
    # websockets logs its own line per connection open and close, which chatd.worker.connection's
    # lines already carry (with the session and close code): keep only its warnings, unless
    # debugging.
    debug = cfg.level.lower() == "debug"
    logging.getLogger("websockets").setLevel(logging.DEBUG if debug else logging.WARNING)


def flush_logging() -> None:
    """Flush every root handler: call before ``os._exit`` (which skips Python's cleanup)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
