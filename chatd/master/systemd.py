"""systemd's notify protocol (sd_notify(3)), for the master: readiness, reloads, stop, watchdog.

:class:`Notifier` sends one datagram per call to ``$NOTIFY_SOCKET`` (a path, or an abstract
socket name written with a leading ``@``). Without ``NOTIFY_SOCKET`` every method does nothing,
so the master calls them unconditionally. A send that fails is logged once and never raises:
systemd being unreachable must not stop the daemon.

What the master sends, and when:

* ``READY=1`` once every worker of the first start is ready (never before: gunicorn sends it
  before it forks anything, which makes ``systemctl start`` return too early);
* ``RELOADING=1`` with ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC, µs) *in the same datagram* when a
  reload starts, and ``READY=1`` when it ends, whether it succeeded or failed (without the
  second one ``Type=notify-reload`` waits until its timeout: caddyserver/caddy#7597);
* ``STOPPING=1`` when a stop starts;
* ``STATUS=...`` lines for ``systemctl status``;
* ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2`` when the watchdog is on (``WATCHDOG_USEC`` set,
  and ``WATCHDOG_PID`` unset or equal to our pid), from the master's loop only, so a master
  whose loop is stuck stops pinging and systemd restarts it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("chatd.master")


def _address(value: str) -> str:
    """The ``connect()`` address of a ``NOTIFY_SOCKET`` value (``@name`` is abstract)."""
    return "\0" + value[1:] if value.startswith("@") else value


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``MONOTONIC_USEC=`` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Talks to systemd for the master; every method is a no-op without ``NOTIFY_SOCKET``.

    Args:
        env: the environment to read (``os.environ`` by default).
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        socket_path = env.get("NOTIFY_SOCKET", "")
        self.address = _address(socket_path) if socket_path else None
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or (pid.isdigit() and int(pid) == os.getpid())
        if self.address and usec.isdigit() and int(usec) > 0 and ours:
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._next_watchdog = 0.0
        self._last_status = ""
        self._warned = False
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``fields`` (``"READY=1"``, ...) as one datagram; True when it was sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._warned:  # once: a missing socket would otherwise flood the log
                log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> None:
        """Send ``STATUS=text`` unless it is the line sent last."""
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def watchdog_due(self, now: float) -> float | None:
        """Seconds until the next ``WATCHDOG=1`` is due (None when the watchdog is off)."""
        if self.watchdog_interval is None:
            return None
        return max(0.0, self._next_watchdog - now)

    def watchdog(self, now: float) -> None:
        """Send ``WATCHDOG=1`` if it is due; call it from the master's loop, every iteration."""
        if self.watchdog_interval is not None and now >= self._next_watchdog:
            self._next_watchdog = now + self.watchdog_interval
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close_in_child(self) -> None:
        """In a forked worker: drop our socket (the worker never notifies)."""
        self.close()
