"""Starting ``chatd-local-model`` as a subprocess, for tests and scripts: :func:`start_local_model`.

One job: run the CLI (its console script next to the interpreter, else ``python -m
chatd.dev.local_model.main``) with ``--exit-with-parent``, wait a bounded time for its ready line on
stdout, and return the process with the URL that line carries. The ready line's format is the
contract it shares with :func:`chatd.dev.local_model.server.serve`.
"""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Final

from chatd.dev.local_model.server import DEFAULT_HOST, PROG, LocalModelError

_READY_RE: Final = re.compile(
    r"^chatd-local-model listening on (?P<url>http://\S+) \(model: (?P<model>.+)\)$"
)


def _command() -> list[str]:
    """The argv prefix that runs ``chatd-local-model`` with the current interpreter's env."""
    # The console script sits next to the interpreter in a venv, but PATH may not include
    # that directory (e.g. `.venv/bin/pytest` without activation); `-m` runs the same main().
    script = Path(sys.executable).parent / PROG
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "chatd.dev.local_model.main"]


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Terminate ``proc``, a child we started (SIGTERM, then SIGKILL by its PID after
    ``timeout``), reap it and close its stdout pipe. Also chatd-bench's, for every process
    it starts."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def start_local_model(
    port: int = 0,
    *,
    args: list[str] | tuple[str, ...] = (),
    timeout: float = 60.0,
    stderr: int | IO[Any] | None = None,
) -> tuple[subprocess.Popen[str], str]:
    """Start ``chatd-local-model`` as a subprocess and return ``(process, base_url)``.

    ``base_url`` (e.g. ``"http://127.0.0.1:41234"``, no trailing slash) is parsed from the
    ready line, so it is only returned once ``/health`` answered 200.  ``port=0`` lets the
    server pick a free port itself (no probe-then-bind race).  ``args`` are extra CLI
    arguments (e.g. ``["--threads", "2"]``); ``stderr`` is passed to ``Popen`` (default:
    inherited, so llama.cpp's warnings land where the caller's stderr goes).

    The caller owns the process: stop it with ``proc.terminate()`` and ``proc.wait()``;
    it exits 0.  Its stdout pipe stays open but receives nothing after the ready line.
    Should the caller die first, the server gets SIGTERM from the kernel (Linux,
    ``--exit-with-parent``), so it never outlives e.g. a crashed test run.

    Raises:
        LocalModelError: the process exited before becoming ready (its stderr says why).
        TimeoutError: not ready within ``timeout`` seconds; the process has been killed.
    """
    cmd = [
        *_command(),
        *("--host", DEFAULT_HOST, "--port", str(port)),
        *("--exit-with-parent", str(os.getpid())),
        *args,
    ]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    assert proc.stdout is not None  # stdout=PIPE
    deadline = time.monotonic() + timeout
    buf = b""
    # Read the raw fd with select() so the wait is bounded; the text wrapper is not used.
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout.fileno(), selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stop_process(proc, timeout=2.0)
                raise TimeoutError(f"{PROG} did not become ready within {timeout:g} s")
            if not sel.select(remaining):
                continue  # timed out: the check above raises
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:  # EOF: the process exited (or closed stdout) before the line
                rc = proc.wait()
                raise LocalModelError(f"{PROG} exited with status {rc} before it was ready")
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                # Skip anything else (a library printing to stdout would otherwise break us).
                match = _READY_RE.match(line.decode("utf-8", "replace").rstrip("\r"))
                if match:
                    return proc, match["url"]
