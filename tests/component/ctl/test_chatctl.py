"""The real ``chatctl`` script against a stand-in master on a Unix socket in this process.

The stand-in speaks the control protocol (:mod:`chatd.proto.control`) and misbehaves on
purpose (never answers, refuses, closes at once), which the real master cannot be made to do
on demand: what is checked is what a sysadmin sees, the exit code and the one line on stderr.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chatd.proto.control import Decoder, encode
from tests.support import BIN, t

pytestmark = pytest.mark.timeout(120)

DENIED = (
    "permission denied: uid 1000 is neither root, nor the daemon's uid 999, nor in the "
    "control socket's group 995"
)
COMMANDS = [["status"], ["reload"], ["stop"], ["scale", "3"]]


class FakeMaster:
    """Accepts on ``path``; ``serve(conn)`` runs for each connection in its own thread."""

    def __init__(self, path: str, serve: Callable[[socket.socket], None]) -> None:
        self.path = path
        self.serve = serve
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.conns:
            conn.close()
        self.thread.join(t(5))


@contextlib.contextmanager
def fake_master(serve: Callable[[socket.socket], None]) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="chatctl-") as tmp:
        master = FakeMaster(str(Path(tmp) / "ctl.sock"), serve)
        try:
            yield master.path
        finally:
            master.close()


def silent(conn: socket.socket) -> None:
    """Reads requests, never answers (a stuck master)."""
    with contextlib.suppress(OSError):
        while conn.recv(65536):
            pass


def denying(conn: socket.socket) -> None:
    """What the master does to a peer that may not use the socket: one refusal, read the
    request if it came already, close."""
    conn.sendall(encode({"ok": False, "error": DENIED}))
    conn.close()


def denying_after_the_request(conn: socket.socket) -> None:
    """A refusal as an answer to the request (as a master of the previous version did)."""
    decoder = Decoder()
    while not decoder.feed(conn.recv(65536)):
        pass
    conn.sendall(encode({"ok": False, "error": DENIED}))
    conn.close()


def chatctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "chatctl"), *args], capture_output=True, text=True, timeout=t(30)
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_timeout_means_the_same_before_and_after_the_command(command: list[str]) -> None:
    """``--timeout S`` is how long chatctl waits for the whole command, wherever it is
    written: before the command or after it, against a master that never answers, both give
    up after S seconds with the same sentence and the same exit code (4 for status, 1 for
    the others)."""
    code = 4 if command[0] == "status" else 1
    with fake_master(silent) as path:
        before = chatctl("--socket", path, "--timeout", "0.5", *command)
        after = chatctl("--socket", path, *command, "--timeout", "0.5")
    for r in (before, after):
        assert r.returncode == code, r
        assert r.stderr == f"chatctl: the master at {path} did not answer within 0.5s\n"
        assert r.stdout == ""


def test_help_says_what_timeout_means() -> None:
    """``--help`` of chatctl and of each command give --timeout its one meaning."""
    for args in (["--help"], ["reload", "--help"], ["status", "--help"]):
        text = " ".join(chatctl(*args).stdout.split())
        assert "--timeout S" in text, text
        assert "longest chatctl waits for the whole command" in text, text


@pytest.mark.parametrize("serve", [denying, denying_after_the_request])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_permission_denied_is_exit_4_for_every_command(
    command: list[str], serve: Callable[[socket.socket], None]
) -> None:
    """The master's refusal of the peer is one exit code whatever the command: 4 (LSB: status
    unknown for ``status``, insufficient privilege for the others), with its sentence, even
    when the master closed the connection before chatctl could send its request."""
    with fake_master(serve) as path:
        r = chatctl("--socket", path, *command)
    assert (r.returncode, r.stderr, r.stdout) == (4, f"chatctl: {DENIED}\n", ""), r
