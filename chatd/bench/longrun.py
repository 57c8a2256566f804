"""The long scenarios against the bare reference relay: ``max``, ``idle`` and ``closed``.

``max`` (:mod:`chatd.bench.maxrate`): the highest rate sustained with reply p99 < 50 ms and
no error, for chatd, the bare relay and direct to the backend. ``idle``
(:mod:`chatd.bench.idle`): KB of worker RSS per idle connection, chatd and the bare relay.
``closed`` (:mod:`chatd.bench.closed`): the closed-loop rate (each connection sends its next
message when its reply is in), chatd and the bare relay, and their ratio. Each starts the
bare relay (:mod:`chatd.bench.bare`) with as many workers as the own chatd (``--workers``),
or ``--bare-workers`` (default 2 for a running chatd). They are not in the seed report's
default list (they take minutes at their defaults): ``chatd-bench run max``, ``chatd-bench
run idle --conns 10000``, ``chatd-bench run closed``, or ``seed-report --only max idle``.
"""

from __future__ import annotations

import argparse
from typing import Any

from chatd.bench import closed, idle, maxrate
from chatd.bench.server import Target

NAMES = ("max", "idle", closed.NAME)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``max``, ``idle`` and ``closed`` (``--duration`` is the seconds per
    step of ``max``, per target of ``closed``)."""
    p.add_argument(
        "--conns",
        type=int,
        help="connections: max 100 (default), idle 1,000 (default; 10,000 works), "
        "closed 100 (default), capacity: users, 1,000 (default)",
    )
    p.add_argument(
        "--step",
        type=_positive,
        default=500.0,
        help="max: msg/s between steps (default 500; any positive rate, e.g. 250 for finer "
        "bounds on the sustained rate and the ratios)",
    )
    p.add_argument(
        "--start",
        type=_positive,
        help="max: the first step's rate in msg/s (default: --step); e.g. --step 250 "
        "--start 1500 to skip the low steps",
    )
    p.add_argument(
        "--bare-workers",
        type=int,
        help="the bare relay's workers (default: --workers for the own chatd, else 2)",
    )
    p.add_argument(
        "--bare-store",
        action="store_true",
        help="max, closed: also measure the bare relay + store (the bare relay keeping chatd's "
        "promises in its SQLite store): what chatd costs beyond them",
    )


def _positive(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive rate: {text!r}")
    return x


def run(
    name: str, target: Target, args: argparse.Namespace, progress: bool, duration: float | None
) -> dict[str, Any]:
    """Run ``max``, ``idle`` or ``closed`` against ``target`` with the command line's
    options."""
    bare = args.bare_workers or (2 if args.url else args.workers)
    if name == closed.NAME:
        return closed.run_closed(
            target, closed.params_from(args, duration), args.procs, progress, bare, args.bare_store
        )
    if name == "idle":
        conns = 1000 if args.conns is None else args.conns
        return idle.run_idle(target, conns, args.procs, progress, bare)
    base = maxrate.MaxParams()
    params = maxrate.MaxParams(
        connections=base.connections if args.conns is None else args.conns,
        start=args.step if args.start is None else args.start,
        step=args.step,
        duration=base.duration if duration is None else duration,
    )
    return maxrate.run_max(
        target, params, args.procs, progress, bare, not args.no_direct, args.bare_store
    )


def markdown(r: dict[str, Any]) -> str:
    """The table of a ``max``, ``idle`` or ``closed`` result."""
    if r["name"] == closed.NAME:
        return closed.markdown(r)
    return maxrate.markdown(r) if r["name"] == "max" else idle.markdown(r)
