"""Log lines: pid and role in each; syslog priorities for journald when under systemd."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from chatd.config import LogConfig
from chatd.logs import JournalPrefix, TextFormatter, setup_logging


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """Leave the root logger as the test found it (setup_logging installs a handler)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("chatd.test", level, __file__, 1, msg, None, None)


def test_text_line_has_level_logger_pid_and_role() -> None:
    """TIME LEVEL LOGGER[PID] ROLE: MESSAGE."""
    setup_logging(LogConfig(), "worker 2", io.StringIO())
    line = TextFormatter().format(record(logging.WARNING, "hello"))
    assert " WARNING chatd.test[" in line and "] worker 2: hello" in line


def test_journal_prefix_carries_the_syslog_priority_on_every_line() -> None:
    """<3> for ERROR, <4> WARNING, <6> INFO, <7> DEBUG; a traceback's lines too."""
    fmt = JournalPrefix(TextFormatter())
    assert fmt.format(record(logging.ERROR, "bad")).startswith("<3>")
    assert fmt.format(record(logging.WARNING, "hm")).startswith("<4>")
    assert fmt.format(record(logging.INFO, "ok")).startswith("<6>")
    assert fmt.format(record(logging.DEBUG, "x")).startswith("<7>")
    assert all(
        line.startswith("<3>") for line in fmt.format(record(logging.ERROR, "a\nb")).split("\n")
    )


def test_journal_prefix_only_under_journald(monkeypatch: pytest.MonkeyPatch) -> None:
    """JOURNAL_STREAM set (systemd gives stderr to the journal): prefixed; else plain JSON."""
    logger = logging.getLogger("chatd.test.journal")
    out = io.StringIO()
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    monkeypatch.setattr("sys.stderr", out)
    setup_logging(LogConfig(format="json"), "master")
    logger.error("boom")
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("<3>") and json.loads(line[3:])["msg"] == "boom"
    monkeypatch.delenv("JOURNAL_STREAM")
    plain = io.StringIO()
    monkeypatch.setattr("sys.stderr", plain)
    setup_logging(LogConfig(format="json"), "master")
    logger.error("boom")
    assert json.loads(plain.getvalue().splitlines()[-1])["level"] == "ERROR"
