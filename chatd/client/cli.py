"""``chatd-chat``: chat with a chatd server from a terminal.

Usage: ``chatd-chat [ws://127.0.0.1:8000/ws] [--session ID] [--token T] [--model M]``.
Each line typed is sent as a message; the reply streams as it is generated. The session id is
printed at the start: pass it with ``--session`` to resume the conversation later (every
event you missed is replayed). With stdin not a terminal, the lines are sent one by one,
each after the previous reply, then the program exits (handy in scripts).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from chatd import __version__


def _print(*parts: str, end: str = "\n") -> None:
    sys.stdout.write("".join(parts) + end)
    sys.stdout.flush()


async def _read_until_answer(ws: ClientConnection, msg_id: str) -> None:
    """Print frames until the reply (or final error) of ``msg_id`` arrives."""
    streamed = False
    async for raw in ws:
        frame: dict[str, Any] = json.loads(raw)
        kind = frame.get("type")
        if kind == "token" and frame.get("id") == msg_id:
            _print(frame["text"], end="")
            streamed = True
        elif kind == "reply" and frame.get("id") == msg_id:
            if not streamed:
                _print(frame["text"], end="")
            stats = frame.get("stats", {})
            _print(f"\n  [{frame['done_reason']}, {stats.get('total_ms')} ms]")
            return
        elif kind == "error":
            _print(f"\n  [error {frame['code']}: {frame['message']}]")
            if frame.get("id") == msg_id:
                return
        elif kind == "queued":
            _print(f"  [queued, position {frame['position']}]")
        elif kind == "notice":
            _print(f"  [{frame['message']}]")


async def chat(url: str, session: str | None, token: str | None, model: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        async with connect(url, additional_headers=headers, open_timeout=10) as ws:
            hello: dict[str, Any] = {"type": "hello"}
            if session:
                hello["session"] = session
            await ws.send(json.dumps(hello))
            welcome = json.loads(await ws.recv())
            if welcome.get("type") != "welcome":
                _print(f"server refused the session: {welcome.get('message', welcome)}")
                return 1
            _print(f"session {welcome['session']} on worker {welcome['worker']}")
            _print("type a message and press Enter (Ctrl-D to quit)")
            loop = asyncio.get_running_loop()
            for n in itertools.count(1):
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    return 0
                text = line.strip()
                if not text:
                    continue
                msg: dict[str, Any] = {"type": "message", "id": f"cli-{n}", "text": text}
                if model:
                    msg["model"] = model
                await ws.send(json.dumps(msg))
                await _read_until_answer(ws, msg["id"])
    except (OSError, InvalidStatus) as exc:
        _print(f"cannot connect to {url}: {exc}")
        return 1
    except ConnectionClosed as exc:
        _print(f"connection closed: {exc}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatd-chat", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("url", nargs="?", default="ws://127.0.0.1:8000/ws")
    parser.add_argument("--session", help="resume this session")
    parser.add_argument("--token", help="auth token, when the server requires one")
    parser.add_argument("--model", help="one of the server's configured models")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(chat(args.url, args.session, args.token, args.model))
    except KeyboardInterrupt:
        return 0
