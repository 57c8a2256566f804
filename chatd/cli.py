"""``chatd``: validate the configuration, or run the master in the foreground.

::

    chatd [--config PATH] [--bind HOST:PORT] [--workers N] [--control-socket PATH]
          [--store URL] [--backend URL]... [--check]

Flags override the file. Without ``--config``, ``/etc/chatd/chatd.toml`` is read if it exists,
else the built-in defaults are used. ``--check`` validates and exits (0 valid, 78 invalid, each
problem on its own line on stderr); it never binds anything.

Test hook: ``CHATD_TEST_WORKER=module:function`` makes the master fork ``function`` (a
:data:`chatd.spec.WorkerMain`) instead of ``chatd.worker.main.run_worker``. The system tests use it
to run the master with a stand-in worker; a warning is logged whenever it is set.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, cast

from chatd import __version__
from chatd.config import load, with_overrides
from chatd.errors import ConfigError, ExitCode
from chatd.logs import setup_logging
from chatd.master.arbiter import Master
from chatd.spec import WorkerMain, WriterMain

ENV_TEST_WORKER = "CHATD_TEST_WORKER"

log = logging.getLogger("chatd.master")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatd", description="Chatbot gateway daemon: runs the master in the foreground."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", metavar="PATH", help="config file (/etc/chatd/chatd.toml)")
    parser.add_argument("--bind", metavar="HOST:PORT", help="overrides [server] bind")
    parser.add_argument("--workers", metavar="N", type=int, help="overrides [server] workers")
    parser.add_argument("--control-socket", metavar="PATH", help="overrides [control] socket")
    parser.add_argument("--store", metavar="URL", help="overrides [sessions] store")
    parser.add_argument(
        "--backend",
        metavar="URL",
        action="append",
        help="replaces [[llm.backends]]; repeat for several; URL#openai for the OpenAI API",
    )
    parser.add_argument(
        "--check", action="store_true", help="validate the configuration and exit (0 or 78)"
    )
    return parser


def load_writer_main() -> WriterMain | None:
    """The SQLite store writer's main function, imported now (before any fork); None with a
    test worker (``CHATD_TEST_WORKER``: it opens no store, so no writer is started)."""
    if os.environ.get(ENV_TEST_WORKER):
        return None
    from chatd.store.sqlite_host import run_writer  # type: ignore[import-not-found,unused-ignore]

    return cast(WriterMain, run_writer)


def load_worker_main() -> WorkerMain:
    """The worker's main function, imported now (before any fork), so forks import nothing.

    Raises:
        ImportError, AttributeError: the worker (or the test hook's target) cannot be loaded.
    """
    hook = os.environ.get(ENV_TEST_WORKER)
    if hook:
        module, _, name = hook.partition(":")
        log.warning("%s=%s: running a test worker, not chatd's", ENV_TEST_WORKER, hook)
        return cast(WorkerMain, getattr(importlib.import_module(module), name or "main"))
    from chatd.worker.main import run_worker  # type: ignore[import-not-found,unused-ignore]

    return cast(WorkerMain, run_worker)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``chatd`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {
        "bind": args.bind,
        "workers": args.workers,
        "control_socket": args.control_socket,
        "store": args.store,
        "backends": args.backend,
    }
    try:
        cfg = with_overrides(load(args.config), **overrides)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return ExitCode.CONFIG
    if args.check:
        print(f"{cfg.path or 'built-in defaults'}: configuration is valid")
        return ExitCode.OK
    setup_logging(cfg.log, "master")
    try:
        worker_main = load_worker_main()
        writer_main = load_writer_main()
    except (ImportError, AttributeError) as exc:
        log.error("cannot load the worker: %s", exc)
        return ExitCode.FAILURE
    try:
        # A reload reads the same file again, and the flags given now still win over it.
        path = cfg.path or args.config
        reload = lambda: with_overrides(load(path), **overrides)  # noqa: E731
        return Master(cfg, worker_main, reload, writer_main).run()
    except KeyboardInterrupt:  # Ctrl-C before the master's own handlers were installed
        return 128 + signal.SIGINT
