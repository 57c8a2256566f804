"""Forking a worker (chatd.master.fork): what the child's garbage collector sees.

The master imports the worker's modules before the first fork; ``fork_worker`` freezes them
(``gc.freeze()``), so a worker's collections walk only what the worker made itself, never the
preloaded heap (a full collection of it was 25-250 ms with the event loop stopped). A real
fork, a real child: it reports what its collector tracks over its link, and exits.
"""

from __future__ import annotations

import gc
import os
import socket
import struct
import sys
from typing import NoReturn

from chatd.config import Config
from chatd.master.fork import fork_worker
from chatd.spec import WorkerSpec


def _report(spec: WorkerSpec) -> NoReturn:
    """The worker: send (objects its collector tracks, objects frozen), then exit 0."""
    tracked = len(gc.get_objects())  # every generation but the permanent one
    spec.link.sendall(struct.pack("!qq", tracked, gc.get_freeze_count()))
    sys.exit(0)


def test_a_forked_worker_does_not_scan_the_masters_heap() -> None:
    tracked_before = len(gc.get_objects())
    listener = socket.socket()
    ours, theirs = socket.socketpair()
    spec = WorkerSpec(Config(), 1, 1, listener, theirs)
    try:
        pid = fork_worker(spec, _report, lambda: ours.close())
        ours.settimeout(30)
        data = b""
        while len(data) < 16:
            chunk = ours.recv(16 - len(data))
            assert chunk, "the worker closed its link without reporting"
            data += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        gc.unfreeze()  # this test's process: back to collecting everything
        for s in (listener, ours, theirs):
            s.close()
    tracked, frozen = struct.unpack("!qq", data)
    assert os.waitstatus_to_exitcode(status) == 0
    # What the master held at the fork is frozen in the worker, so its collector tracks a
    # small fraction of it (the objects made since, by setting up the worker).
    assert frozen >= tracked_before // 2, (frozen, tracked_before)
    assert tracked < tracked_before // 4, (tracked, tracked_before)
