"""Log lines: pid and role in each; syslog priorities for journald when under systemd."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatd.config import LogConfig
from chatd.logs import JournalPrefix, TextFormatter, about, setup_logging


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


def _log_to(stream: object, monkeypatch: pytest.MonkeyPatch, journal: str | None) -> None:
    if journal is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        monkeypatch.setenv("JOURNAL_STREAM", journal)
    monkeypatch.setattr("sys.stderr", stream)
    setup_logging(LogConfig(format="json"), "master")
    logging.getLogger("chatd.test.journal").error("boom")


def test_journal_prefix_only_when_stderr_is_the_journal_stream(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """JOURNAL_STREAM naming stderr's own DEVICE:INODE (systemd gave stderr to the journal):
    prefixed; the variable with another stream's (a child whose stderr was redirected), a
    malformed one, or none: plain JSON (systemd.exec(5))."""
    with open(tmp_path / "journal", "w+") as journal, open(tmp_path / "other", "w+") as other:
        st = os.fstat(journal.fileno())
        _log_to(journal, monkeypatch, f"{st.st_dev}:{st.st_ino}")
        journal.seek(0)
        line = journal.read().splitlines()[-1]
        assert line.startswith("<3>") and json.loads(line[3:])["msg"] == "boom"
        for value in (f"{st.st_dev}:{st.st_ino}", "8:1234", "junk", None):
            other.seek(0)
            other.truncate()
            _log_to(other, monkeypatch, value)
            other.seek(0)
            line = other.read().splitlines()[-1]
            assert json.loads(line)["level"] == "ERROR", (value, line)
    plain = io.StringIO()  # no file descriptor at all
    _log_to(plain, monkeypatch, "8:1234")
    assert json.loads(plain.getvalue().splitlines()[-1])["level"] == "ERROR"


def test_json_lines_carry_session_message_and_worker_as_fields() -> None:
    """A line logged with extra=about(session, msg_id) in a worker has them as JSON fields
    (whole ids), next to ``worker`` SLOT/PID; other lines have no such fields."""
    out = io.StringIO()
    setup_logging(LogConfig(format="json"), "worker 3", out)
    logger = logging.getLogger("chatd.test.fields")
    logger.warning("lease of %s lost", "s" * 8, extra=about("s" * 24, "m-1"))
    logger.info("nothing about a session")
    about_line, other = (json.loads(x) for x in out.getvalue().splitlines())
    assert about_line["session"] == "s" * 24 and about_line["msg_id"] == "m-1"
    assert about_line["worker"] == f"3/{os.getpid()}" == other["worker"]
    assert "session" not in other and "msg_id" not in other
    setup_logging(LogConfig(format="json"), "master", out)
    logger.info("from the master", extra=about("x"))
    last = json.loads(out.getvalue().splitlines()[-1])
    assert "worker" not in last and last["session"] == "x"
