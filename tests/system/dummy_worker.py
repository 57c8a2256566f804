"""A stand-in worker for the master's system tests (``CHATD_TEST_WORKER=...dummy_worker:run``).

It serves plain HTTP on the inherited listener: every request gets ``200`` with the body
``worker SLOT pid PID``, then the connection closes. It speaks to the master through the real
:class:`chatd.worker.link.MasterLink` (that is the part under test, with the master), sends
``ready`` and ``stats`` every second, and obeys ``drain``/``stop``, SIGTERM/SIGINT/SIGQUIT and
the master's disappearance.

Knobs (environment):

* ``DUMMY_IGNORE_DRAIN=1``: ignore drain orders and SIGTERM, so the master has to SIGKILL it at
  the end of ``graceful_timeout``;
* ``DUMMY_BOOT_DELAY_FILE=PATH``: if PATH exists when a worker starts, sleep the seconds it holds
  before serving (nothing accepts on the slot's socket meanwhile);
* ``DUMMY_BOOT_FAIL_FILE=PATH``: if PATH exists when a worker starts, exit 3 before ``ready``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any, NoReturn

import uvloop

from chatd.spec import WorkerSpec
from chatd.worker.link import MasterLink


class DummyWorker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.link = MasterLink.from_spec(spec)
        self.connections = 0
        self.served = 0
        self.ignore_drain = os.environ.get("DUMMY_IGNORE_DRAIN") == "1"
        self.done: asyncio.Future[int] | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            body = f"worker {self.spec.slot} pid {os.getpid()}\n".encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            self.served += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.connections -= 1
            writer.close()

    def stats(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "messages_total": self.served,
            "errors_total": 0,
            "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
        }

    def finish(self, code: int) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(code)

    def on_command(self, msg: dict[str, Any]) -> None:
        if msg.get("t") == "drain":
            self.drain()
        elif msg.get("t") == "stop":
            self.finish(0)

    def drain(self) -> None:
        if self.ignore_drain:
            return
        self.link.send_draining()
        self.finish(0)

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, self.drain)
        loop.add_signal_handler(signal.SIGINT, self.finish, 0)
        loop.add_signal_handler(signal.SIGQUIT, self.finish, 0)
        server = await asyncio.start_server(self.handle, sock=self.spec.listener)
        await self.link.start(self.on_command, lambda: self.finish(0))
        self.link.send_ready()
        self.link.start_reporting(self.stats, 1.0)
        code = await self.done
        server.close()
        self.link.close()
        return code


def run(spec: WorkerSpec) -> NoReturn:
    fail_file = os.environ.get("DUMMY_BOOT_FAIL_FILE")
    if fail_file and os.path.exists(fail_file):
        os._exit(3)
    delay_file = os.environ.get("DUMMY_BOOT_DELAY_FILE")
    if delay_file and os.path.exists(delay_file):
        with open(delay_file) as f:
            time.sleep(float(f.read()))
    code = uvloop.run(DummyWorker(spec).main())
    os._exit(code)
