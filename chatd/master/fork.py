"""Forking one worker: the master's signals across the fork, and the child's first steps.

:func:`fork_worker` returns the child's pid in the master. In the child it never returns: it
sheds the master's state (signal handlers, every fd of the master's), sets up logging and the
process title for the worker's generation, runs the worker's main function and exits with its
code, without ever unwinding into the master's code.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections.abc import Callable

import setproctitle

from chatd.config import Config
from chatd.logs import flush_logging, setup_logging
from chatd.spec import WorkerMain, WorkerSpec

log = logging.getLogger("chatd.master")

MASTER_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGCHLD,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
)
"""The signals the master handles: blocked across fork, back to their defaults in the child."""


def fork_worker(
    spec: WorkerSpec, worker_main: WorkerMain, close_in_child: Callable[[], None]
) -> int:
    """Fork the worker described by ``spec``; returns its pid (in the master).

    Args:
        spec: what the worker gets.
        worker_main: runs in the child and never returns.
        close_in_child: closes, in the child, every fd of the master's that the worker must
            not hold (above all the master's end of every link: while a worker holds one, the
            master's death would not show as EOF on it).

    Raises:
        OSError: the fork failed.
    """
    return fork_child(
        lambda: worker_main(spec),
        close_in_child,
        cfg=spec.cfg,
        role=f"worker {spec.slot}",
        title=f"chatd: worker {spec.slot} gen {spec.generation}",
    )


def fork_child(
    child_main: Callable[[], object],
    close_in_child: Callable[[], None],
    *,
    cfg: Config,
    role: str,
    title: str,
) -> int:
    """Fork a child of the master's (a worker, the store writer); returns its pid (in the
    master). In the child: ``close_in_child()``, logging as ``cfg`` says under ``role``, the
    process title ``title``, then ``child_main()``, which must exit (it never returns into
    the master's code). Raises OSError: the fork failed."""
    # Everything the master holds now (the worker's modules, imported before the first fork:
    # chatd.cli.load_worker_main) goes to the permanent generation, so the worker's garbage
    # collections never scan it: a full collection of a worker went through the whole
    # preloaded heap, 25-250 ms with the loop stopped (chatd_gc_pause_seconds under
    # chatd-bench run closed), and touching those objects' GC headers copied their pages.
    gc.freeze()
    # Block the master's signals across the fork: the child must never run its handlers.
    signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
        raise
    if pid == 0:
        _become_child(child_main, close_in_child, cfg, role, title)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
    return pid


def _become_child(
    child_main: Callable[[], object],
    close_in_child: Callable[[], None],
    cfg: Config,
    role: str,
    title: str,
) -> None:
    """In the child: shed the master's state and run ``child_main``. Never returns."""
    code = 1
    try:
        # 1. Python's default signal dispositions, then let pending signals in.
        signal.set_wakeup_fd(-1)
        for signum in MASTER_SIGNALS:
            default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, default)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
        # 2. Close every fd of the master's.
        close_in_child()
        # 3. Logging as this generation's config says (a reload may have changed the level),
        #    the process's name, then hand over.
        setup_logging(cfg.log, role)
        setproctitle.setproctitle(title)
        child_main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:
        log.exception("%s crashed", role)
    finally:
        # Never unwind into the master's code: its `finally` would clean up *its* state.
        flush_logging()
        os._exit(code)


def kill_and_reap(pids: set[int], within: float) -> set[int]:
    """Reap the (SIGKILLed) children ``pids``, waiting at most ``within`` seconds.

    Returns:
        the pids not reaped in time.
    """
    left = set(pids)
    deadline = time.monotonic() + within
    while left and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            left.discard(pid)
        else:
            time.sleep(0.01)
    return left
