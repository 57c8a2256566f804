"""``chatd-bench``: run one scenario, or all of them into the seed report.

::

    chatd-bench run SCENARIO [--duration S] [--json] [--procs P] [TARGET]
    chatd-bench seed-report [--duration S] [--out DIR] [--procs P] [--plots] [TARGET]

TARGET: nothing (start an own fake Ollama and chatd with ``--workers`` workers), or ``--url
ws://HOST:PORT/ws --control-socket PATH`` for a running chatd (``--fake-url`` for the
fake-only knobs of the failure scenarios, and for the direct baseline).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chatd.bench import report, scenarios
from chatd.bench.server import OwnChatd, Target


def _target(args: argparse.Namespace) -> Target:
    if args.url:
        if not args.control_socket:
            raise SystemExit("chatd-bench: --url needs --control-socket")
        return Target(args.url, args.control_socket, args.fake_url)
    return OwnChatd(workers=args.workers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chatd-bench", description=__doc__.split("::")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one scenario and print its table")
    run.add_argument("scenario", choices=list(scenarios.SCENARIOS))
    run.add_argument("--json", action="store_true", help="print the figures as JSON")
    seed = sub.add_parser("seed-report", help="run every scenario, write report.md/.json")
    seed.add_argument("--out", default="bench-report", help="output directory")
    seed.add_argument("--plots", action="store_true", help="PNG plots (needs matplotlib)")
    seed.add_argument("--only", nargs="*", help="run only these scenarios")
    for sp in (run, seed):
        sp.add_argument("--duration", type=float, help="measured seconds per scenario")
        sp.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
        sp.add_argument("--workers", type=int, default=2, help="own chatd's workers")
        sp.add_argument("--url", help="a running chatd: ws://HOST:PORT/ws")
        sp.add_argument("--control-socket", help="its control socket (for chatctl status)")
        sp.add_argument("--fake-url", help="the fake Ollama behind it (http://HOST:PORT)")
        sp.add_argument("--no-direct", action="store_true", help="skip the direct baseline")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = not args.no_progress and sys.stderr.isatty()
    target = _target(args)
    try:
        if args.command == "run":
            res = scenarios.run_scenario(
                args.scenario,
                target,
                args.duration,
                args.procs,
                progress=progress,
                direct=not args.no_direct,
            )
            if args.json:
                print(json.dumps(res, indent=1, default=str))
            else:
                print(report.scenario_markdown(res))
            return 0
        names = args.only or list(scenarios.SCENARIOS)
        duration = 3.0 if args.duration is None else args.duration
        results = []
        for name in names:
            print(f"chatd-bench: {name} ({duration:g} s)", file=sys.stderr)
            results.append(
                scenarios.run_scenario(
                    name, target, duration, args.procs, progress, direct=not args.no_direct
                )
            )
        out = Path(args.out)
        doc = report.build(results, report.meta(argv, target))
        paths = report.write(doc, out)
        if args.plots:
            from chatd.bench import plots

            paths += plots.write(results, out)
        for path in paths:
            print(path)
        return 0
    finally:
        target.stop()


if __name__ == "__main__":
    sys.exit(main())
