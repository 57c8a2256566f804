"""``chatd-bench``: run one scenario, or all of them into the seed report.

::

    chatd-bench run SCENARIO [--duration S] [--json] [--procs P] [--profile DIR] [TARGET]
    chatd-bench run real [--duration S] [--model-url URL] [--slots N] [--max-queue N] ...
    chatd-bench run fairness [--duration S] [--flood N] [--light N] [--reply-s S] [--phase P]
    chatd-bench run http [--duration S] [--paths ws ollama openai] [TARGET | --target URL]
    chatd-bench run max [--step R] [--start R] [--conns N] [--duration S] [TARGET]
    chatd-bench run closed [--conns N] [--duration S] [--bare-workers N] [TARGET]
    chatd-bench run reload [--conns N] [--reloads K] [--duration BEFORE_S] [TARGET]
    chatd-bench run capacity [--conns USERS] [--msgs-per-min M] [--headroom H]
                             [--real-result PATH] [--duration S] [TARGET]
    chatd-bench seed-report [--duration S] [--out DIR] [--procs P] [--plots] [TARGET]

TARGET: nothing (start an own fake Ollama and chatd with ``--workers`` workers), or ``--url
ws://HOST:PORT/ws --control-socket PATH`` for a running chatd (``--fake-url`` for the
fake-only knobs of the failure scenarios, and for the direct baseline). ``real`` (the real
model, :mod:`chatd.bench.realmodel`) starts its own model and chatd, and is not part of the
seed report; nor are ``fairness`` (:mod:`chatd.bench.fairness`: a chatd of its own per phase,
or ``--target URL``) and ``http`` (:mod:`chatd.bench.httpapi`: ``/ws`` and the HTTP APIs of
TARGET, or only the HTTP APIs of ``--target URL``, e.g. the fake Ollama's). ``capacity``
(:mod:`chatd.bench.capacity`: chatd's costs per connection and per message, and the seed's
deployment tiers derived from them) is the seed report's first scenario: it wants a fresh
chatd. ``closed`` (:mod:`chatd.bench.closed`): the closed-loop rate of TARGET and of the bare
relay (on TARGET's fake), and their ratio. ``run --out
DIR`` also writes ``NAME.json`` and ``NAME.md`` there (and with ``--plots`` the PNGs of the
load scenarios); ``--profile DIR``: a py-spy profile of one worker (:mod:`chatd.bench.pyspy`),
its summary printed after the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from chatd import __version__
from chatd.bench import (
    capacity,
    fairness,
    httpapi,
    longrun,
    pyspy,
    realmodel,
    reloads,
    report,
    scenarios,
)
from chatd.bench.server import OwnChatd, Target


def _target(args: argparse.Namespace) -> Target:
    if args.url:
        if not args.control_socket:
            raise SystemExit("chatd-bench: --url needs --control-socket")
        return Target(args.url, args.control_socket, args.fake_url)
    return OwnChatd(workers=args.workers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chatd-bench", description=__doc__.split("::")[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one scenario and print its table")
    run.add_argument(
        "scenario",
        choices=[
            *scenarios.SCENARIOS,
            *("real", *longrun.NAMES, capacity.NAME, "fairness", "http", reloads.NAME),
        ],
    )
    run.add_argument("--json", action="store_true", help="print the figures as JSON")
    run.add_argument("--out", type=Path, help="also write NAME.json and NAME.md into DIR")
    run.add_argument("--plots", action="store_true", help="PNG plots into --out (matplotlib)")
    run.add_argument("--profile", type=Path, metavar="DIR", help="py-spy one worker into DIR")
    realmodel.add_arguments(run)
    fairness.add_arguments(run)
    reloads.add_arguments(run)
    run.add_argument(
        "--target",
        metavar="URL",
        help="fairness, http: send the HTTP requests to this base URL (http://HOST:PORT), "
        "start no chatd (http: no /ws load)",
    )
    run.add_argument(
        "--paths",
        nargs="+",
        choices=httpapi.PATHS,
        help="http: the paths to load (default: ws ollama openai)",
    )
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
        longrun.add_arguments(sp)
        capacity.add_arguments(sp)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = not args.no_progress and sys.stderr.isatty()
    if args.command == "run" and args.scenario == "real":
        if args.url:
            raise SystemExit("chatd-bench: run real starts its own chatd (no --url)")
        return _emit(args, realmodel.run(realmodel.params_from(args), args.profile))
    if args.command == "run" and args.scenario == "fairness":
        if args.url:
            raise SystemExit("chatd-bench: run fairness starts its own chatd, or --target URL")
        res = fairness.run(fairness.params_from(args), args.target, args.fake_url, progress)
        return _emit(args, res)
    if args.command == "run" and args.scenario == reloads.NAME:
        target = Target(args.url, args.control_socket) if args.url else None
        res = reloads.run_reload(target, reloads.params_from(args), args.workers)
        return _emit(args, res)
    if args.command == "run" and args.scenario == "http" and args.target:
        return _emit(args, httpapi.run_http(None, _http_params(args), args.target, progress))
    real = capacity.read_real(args.real_result)  # before anything starts: a bad path fails fast
    target = _target(args)
    try:
        if args.command == "run" and args.scenario == "http":
            return _emit(args, httpapi.run_http(target, _http_params(args), None, progress))
        if args.command == "run" and args.scenario in longrun.NAMES:
            return _emit(args, longrun.run(args.scenario, target, args, progress, args.duration))
        if args.command == "run" and args.scenario == capacity.NAME:
            cap = capacity.params_from(args, args.duration)
            return _emit(args, capacity.run_capacity(target, cap, args.procs, progress, real))
        if args.command == "run":
            res = scenarios.run_scenario(
                args.scenario,
                target,
                args.duration,
                args.procs,
                progress=progress,
                direct=not args.no_direct,
                profile=args.profile,
            )
            return _emit(args, res)
        names = args.only or [capacity.NAME, *scenarios.SCENARIOS]
        # capacity first: it measures what connections cost on a chatd no load has grown yet
        names = sorted(names, key=lambda n: n != capacity.NAME)
        duration = 3.0 if args.duration is None else args.duration
        results = []
        for name in names:
            if name == capacity.NAME:
                cap = capacity.params_from(args, duration)
                print(f"chatd-bench: {name} ({cap.window():g} s)", file=sys.stderr)
                results.append(capacity.run_capacity(target, cap, args.procs, progress, real))
                continue
            print(f"chatd-bench: {name} ({duration:g} s)", file=sys.stderr)
            if name in longrun.NAMES:
                results.append(longrun.run(name, target, args, progress, duration))
                continue
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

            loads = [r for r in results if "chatd" in r and r["name"] not in longrun.NAMES]
            paths += plots.write(loads, out)
        for path in paths:
            print(path)
        return 0
    finally:
        target.stop()


def _http_params(args: argparse.Namespace) -> httpapi.HttpParams:
    base = httpapi.HttpParams()
    return httpapi.HttpParams(
        duration=base.duration if args.duration is None else args.duration,
        paths=tuple(args.paths or base.paths),
        procs=args.procs,
    )


def _emit(args: argparse.Namespace, res: dict[str, Any]) -> int:
    """Print one scenario's result (JSON, or its table and the profile's summary); with
    ``--out`` write it there too (with ``--plots`` the PNGs); exit status 0."""
    md = report.scenario_markdown(res)
    if args.json:
        print(json.dumps(res, indent=1, default=str))
    else:
        print(md)
        if "profile" in res:
            print(pyspy.format_summary(res["profile"]))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        paths = [args.out / f"{res['name']}.json", args.out / f"{res['name']}.md"]
        paths[0].write_text(json.dumps(res, indent=1, default=str) + "\n")
        paths[1].write_text(md + "\n")
        if args.plots and "chatd" in res:  # the load scenarios' timelines
            from chatd.bench import plots

            paths += plots.write([res], args.out)
        for path in paths:
            print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
