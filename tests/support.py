"""Helpers for the system tests: a real chatd subprocess, and a protocol client from the spec.

The client here speaks the chat protocol as ``docs/protocol.md`` describes it, with plain
JSON over the ``websockets`` sync client: it shares no code with the server, so a bug in the
server's frame builders cannot hide itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

FACTOR = float(os.environ.get("CHATD_TESTS_TIMEOUT_FACTOR", "1"))
BIN = Path(sys.executable).parent


def t(seconds: float) -> float:
    """A time limit, scaled for slow machines."""
    return seconds * FACTOR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def system_python() -> str | None:
    """A Python of this venv's major.minor outside /root and /home, as a host's daemon would run
    (the unit's ProtectHome=yes hides those), or None."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        real = os.path.realpath(candidate)
        if not os.access(real, os.X_OK) or real.startswith(("/root/", "/home/")):
            continue
        r = subprocess.run(
            [real, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
        )
        if r.stdout.strip() == "{}.{}".format(*sys.version_info[:2]):
            return candidate
    return None


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + t(timeout)
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {t(timeout):.1f}s waiting for {what}")
        time.sleep(interval)


async def until(cond: Callable[[], Any], what: str, within: float = 5.0) -> None:
    """From a running loop: poll ``cond`` every 10 ms until it is truthy (the loop runs on
    meanwhile); fail naming ``what`` after ``within`` s (scaled by :func:`t`)."""
    for _ in range(int(t(within) / 0.01) + 1):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {t(within):.1f}s waiting for {what}")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """GET a URL; returns (status, headers, body) for any status."""
    try:
        with urllib.request.urlopen(url, timeout=t(timeout)) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def http_post_json(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=t(5)) as r:
        return json.loads(r.read())


class Chatd:
    """A real ``chatd`` master run as a subprocess on loopback, with its own config file."""

    def __init__(
        self,
        tmp: Path,
        backend_url: str,
        workers: int = 2,
        env: dict[str, str] | None = None,
        **sections: dict[str, Any],
    ):
        self.tmp = tmp
        self.env = dict(env or {})  # added to chatd's environment (CHATD_FAULT, NOTIFY_SOCKET)
        self.port = free_port()
        self.socket = str(tmp / "control.sock")
        self.db = tmp / "sessions.db"
        self.log_path = tmp / "chatd.log"
        cfg: dict[str, dict[str, Any]] = {
            "server": {
                "bind": f"127.0.0.1:{self.port}",
                "workers": workers,
                "graceful_timeout": 10.0,
            },
            "control": {"socket": self.socket},
            "llm": {"model": "qwen2.5-coder:7b", "first_token_timeout": 5.0},
            "sessions": {"store": f"sqlite://{self.db}"},
            "log": {"level": "info"},
        }
        backends = sections.pop("backends", [{"url": backend_url, "max_parallel": 8}])
        for name, values in sections.items():
            cfg.setdefault(name, {}).update(values)
        self.config = tmp / "chatd.toml"
        self.config.write_text(_toml(cfg, backends))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> Chatd:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "chatd"), "--config", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **self.env},
        )
        if wait_ready:
            wait_for(self.all_ready, 20, "every worker ready")
        return self

    def status(self) -> dict[str, Any] | None:
        """``chatctl status --json``, or None when it does not answer."""
        r = subprocess.run(
            [str(BIN / "chatctl"), "--socket", self.socket, "status", "--json"],
            capture_output=True,
            timeout=t(10),
        )
        if r.returncode not in (0, 1) or not r.stdout:
            return None
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    def all_ready(self) -> dict[str, Any] | None:
        st = self.status()
        if st and st["workers"] and all(w["state"] == "ready" for w in st["workers"]):
            return st
        return None

    def worker_pids(self) -> list[int]:
        st = self.status()
        assert st is not None
        return sorted(w["pid"] for w in st["workers"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal the master and wait for it; returns its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(t(timeout))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise
        finally:
            self._log.close()
        return code

    def kill_all(self) -> None:
        """Last resort cleanup: SIGKILL the whole process group we started."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def chatctl(d: Chatd, *args: str) -> subprocess.CompletedProcess[str]:
    """The real ``chatctl`` on ``d``'s control socket."""
    return subprocess.run(
        [str(BIN / "chatctl"), "--socket", d.socket, *args],
        capture_output=True,
        text=True,
        timeout=t(60),
    )


def client_frame(payload: bytes) -> bytes:
    """A masked client text frame, built by hand (a zero masking key: legal, and the payload
    stays as is): for tests that split a frame where they want."""
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 65536:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _toml(cfg: dict[str, dict[str, Any]], backends: list[dict[str, Any]]) -> str:
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for b in backends:
        lines.append("[[llm.backends]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in b.items()]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def running_chatd(tmp: Path, backend_url: str, **kwargs: Any) -> Iterator[Chatd]:
    """A started chatd, stopped (SIGTERM, then SIGKILL of its group) at the end."""
    d = Chatd(tmp, backend_url, **kwargs)
    try:
        yield d.start()
    finally:
        try:
            if d.proc is not None and d.proc.poll() is None:
                d.stop()
        finally:
            d.kill_all()


@contextlib.contextmanager
def two_hosts(tmp: Path, backend_url: str, **kwargs: Any) -> Iterator[tuple[Chatd, Chatd]]:
    """Two started chatd masters ("hosts" a and b, in ``tmp/a`` and ``tmp/b``) built alike
    (``kwargs`` as :class:`Chatd`'s: give them one Redis ``sessions`` store); both stopped at
    the end, whatever happens (one the test killed already included)."""
    with contextlib.ExitStack() as stack:
        hosts = []
        for name in ("a", "b"):
            (tmp / name).mkdir()
            hosts.append(stack.enter_context(running_chatd(tmp / name, backend_url, **kwargs)))
        yield hosts[0], hosts[1]


class Client:
    """A protocol client from the spec: JSON text frames over a sync WebSocket."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.ws: ClientConnection = connect(url, open_timeout=t(10), legacy=True, **kwargs)

    def send(self, obj: dict[str, Any] | str | bytes) -> None:
        if isinstance(obj, dict):
            obj = json.dumps(obj)
        self.ws.send(obj)

    def recv(self, timeout: float = 10) -> dict[str, Any]:
        raw = self.ws.recv(timeout=t(timeout))
        assert isinstance(raw, str), f"binary frame from the server: {raw!r}"
        return json.loads(raw)  # type: ignore[no-any-return]

    def hello(self, session: str | None = None, last_seq: int = 0) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "hello", "last_seq": last_seq}
        if session:
            frame["session"] = session
        self.send(frame)
        return self.recv()

    def until(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> list[dict[str, Any]]:
        """Frames received until (and including) the first for which ``pred`` holds."""
        got = []
        deadline = time.monotonic() + t(timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching frame; got {got}")
            frame = self.recv(left / FACTOR)
            got.append(frame)
            if pred(frame):
                return got

    def ask(
        self, msg_id: str, text: str, timeout: float = 20, **extra: Any
    ) -> list[dict[str, Any]]:
        """Send a message; return every frame up to its reply or final error."""
        self.send({"type": "message", "id": msg_id, "text": text, **extra})
        return self.until(
            lambda f: f.get("id") == msg_id and f["type"] in ("reply", "error") and "seq" in f,
            timeout,
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()


class Reader(threading.Thread):
    """Reads a :class:`Client`'s frames into ``frames`` as they come, until the connection
    closes, as a real client does. A client that stops reading stalls websockets' reader (its
    queue fills), so it would not answer the server's close and a drain would wait for it."""

    def __init__(self, client: Client, frames: list[dict[str, Any]]) -> None:
        super().__init__(daemon=True)
        self.client, self.frames = client, frames
        self.start()

    def run(self) -> None:
        while True:
            try:
                self.frames.append(self.client.recv(3600))
            except (ConnectionClosed, TimeoutError):
                return

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> None:
        """Until a frame received so far satisfies ``pred``."""
        wait_for(lambda: any(pred(f) for f in list(self.frames)), timeout, what)

    def closed(self, timeout: float) -> int | None:
        """The close code the server sent, once the connection has closed."""
        self.join(t(timeout))
        assert not self.is_alive(), "the connection is still open"
        return self.client.ws.close_code


def fake_config(fake_url: str, **knobs: Any) -> Any:
    """Change the fake Ollama's knobs while it runs."""
    return http_post_json(f"{fake_url}/_fake/config", knobs)


def fake_stats(fake_url: str) -> dict[str, int]:
    status, _, body = http_get(f"{fake_url}/_fake/stats")
    assert status == 200
    return json.loads(body)  # type: ignore[no-any-return]
