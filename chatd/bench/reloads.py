"""``chatd-bench run reload``: what chatting clients see of reloads.

N clients (:class:`chatd.client.ChatClient`, which resumes by itself after a disconnect) chat
with a pause between messages; after ``before`` seconds, K ``chatctl reload`` run back to
back. Counted per run: the disconnects the clients saw (their ``Reconnecting`` events) and how
many clients saw one, the TCP connections that changed (a client's local port), messages
without an answer, the reply latency p50/p99 before the reloads and while they ran, and how
long each ``chatctl reload`` took (it returns once the old workers have moved their
connections). The daemon's own count (``chatctl status``: ``totals.handoff``) is reported too.

With its own chatd the scenario runs twice, side by side: ``[server] handoff`` on (the
default: open WebSockets move to the new workers) and off (the old drain: 1001 and a resume),
so the table shows what handoff changes. Against a running chatd (``--url``,
``--control-socket``) it runs once, in that chatd's mode.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from chatd.bench.server import BIN, OwnChatd, Target
from chatd.bench.stats import percentile
from chatd.client import ChatClient
from chatd.client.events import Error, Event, Reconnecting

NAME = "reload"


@dataclass(frozen=True, slots=True)
class ReloadParams:
    """The scenario's knobs (``--conns``, ``--reloads``; ``--duration`` is ``before``)."""

    clients: int = 200
    reloads: int = 10
    before: float = 5.0  # seconds of chat before the first reload
    think: tuple[float, float] = (0.2, 1.0)  # seconds between a reply and the next message


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reloads", type=int, default=10, help="reload: reloads in a row (10)")


def params_from(args: argparse.Namespace) -> ReloadParams:
    base = ReloadParams()
    return ReloadParams(
        clients=args.conns or base.clients,
        reloads=args.reloads,
        before=base.before if args.duration is None else args.duration,
    )


@dataclass
class _Seen:
    """What the clients saw, shared by their tasks (one event loop)."""

    phase: str = "before"
    latency: dict[str, list[float]] = field(default_factory=lambda: {"before": [], "during": []})
    disconnects: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    clients_disconnected: set[int] = field(default_factory=set)
    errors: int = 0
    changed_connection: int = 0


async def _chat(url: str, i: int, seen: _Seen, stop: asyncio.Event, p: ReloadParams) -> None:
    def on_event(event: Event) -> None:
        if isinstance(event, Reconnecting) and event.attempt == 1:
            seen.disconnects += 1
            seen.clients_disconnected.add(i)
            reason = event.reason.split(":")[0][:60]
            seen.reasons[reason] = seen.reasons.get(reason, 0) + 1

    client = ChatClient(url, on_event=on_event, connect_options={"compression": None})
    async with client:
        local = client.local_address
        await asyncio.sleep(random.uniform(0, p.think[1]))  # spread the clients' rhythm
        while not stop.is_set():
            phase, t0 = seen.phase, time.monotonic()
            answer = await client.ask("hello")
            if isinstance(answer, Error):
                seen.errors += 1
            else:
                seen.latency[phase].append((time.monotonic() - t0) * 1000)
            await asyncio.sleep(random.uniform(*p.think))
        if client.local_address != local:
            seen.changed_connection += 1


def _reload(target: Target) -> float:
    t0 = time.monotonic()
    r = subprocess.run(
        [str(BIN / "chatctl"), "--socket", target.control_socket, "reload"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"chatctl reload failed: {r.stdout}{r.stderr}")
    return time.monotonic() - t0


def measure(target: Target, p: ReloadParams) -> dict[str, Any]:
    """One run against ``target`` (see the module docstring)."""
    seen, loop = _Seen(), asyncio.new_event_loop()
    stop = asyncio.Event()

    async def crowd() -> None:
        await asyncio.gather(*(_chat(target.url, i, seen, stop, p) for i in range(p.clients)))

    thread = threading.Thread(target=loop.run_until_complete, args=(crowd(),), daemon=True)
    thread.start()
    time.sleep(p.before)
    seen.phase = "during"
    took = [_reload(target) for _ in range(p.reloads)]
    time.sleep(p.think[1] * 2)  # the last replies of the reload phase
    loop.call_soon_threadsafe(stop.set)
    thread.join(60)
    status = target.status() or {}
    before, during = sorted(seen.latency["before"]), sorted(seen.latency["during"])
    return {
        "clients": p.clients,
        "reloads": p.reloads,
        "disconnects": seen.disconnects,
        "clients_disconnected": len(seen.clients_disconnected),
        "disconnect_reasons": seen.reasons,
        "connections_changed": seen.changed_connection,
        "errors": seen.errors,
        "replies": {"before": len(before), "during": len(during)},
        "p50_before_ms": percentile(before, 50),
        "p99_before_ms": percentile(before, 99),
        "p50_during_ms": percentile(during, 50),
        "p99_during_ms": percentile(during, 99),
        "reload_s": {"mean": sum(took) / len(took), "max": max(took)} if took else {},
        "handoff": (status.get("totals") or {}).get("handoff", {}),
    }


def run_reload(target: Target | None, p: ReloadParams, workers: int) -> dict[str, Any]:
    """The scenario: on ``target`` once, or (None) on two own chatds, handoff on and off."""
    runs: dict[str, Any] = {}
    if target is not None:
        runs["target"] = measure(target, p)
    else:
        for mode, on in (("handoff", True), ("drain (handoff = false)", False)):
            own = OwnChatd(workers=workers, extra={"server": {"handoff": on}})
            try:
                runs[mode] = measure(own, p)
            finally:
                own.stop()
    return {"name": NAME, "params": vars_of(p), "runs": runs}


def vars_of(p: ReloadParams) -> dict[str, Any]:
    return {"clients": p.clients, "reloads": p.reloads, "before_s": p.before, "think_s": p.think}


def markdown(r: dict[str, Any]) -> str:
    p = r["params"]
    lines = [
        f"### reload: {p['clients']} clients chatting, {p['reloads']} reloads in a row",
        "",
        "| mode | disconnects seen | clients disconnected | TCP connections changed | "
        "unanswered | reply p50 / p99 before (ms) | p50 / p99 during (ms) | "
        "chatctl reload (s, mean / max) | moved / fell back (status) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, run in r["runs"].items():
        took, moved = run.get("reload_s") or {}, run.get("handoff") or {}
        lines.append(
            f"| {mode} | {run['disconnects']} | {run['clients_disconnected']} | "
            f"{run['connections_changed']} | {run['errors']} | "
            f"{_ms(run['p50_before_ms'])} / {_ms(run['p99_before_ms'])} | "
            f"{_ms(run['p50_during_ms'])} / {_ms(run['p99_during_ms'])} | "
            f"{took.get('mean', 0):.2f} / {took.get('max', 0):.2f} | "
            f"{moved.get('moved', 0)} / {moved.get('fell_back', 0)} |"
        )
    return "\n".join(lines)


def _ms(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.1f}"  # x != x: nan, no sample
