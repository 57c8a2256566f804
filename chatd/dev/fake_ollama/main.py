"""A faithful stand-in for an Ollama server, for tests, demos and load tests.

Speaks Ollama's wire format (notes: ollama/ollama server/routes.go, v0.33): NDJSON streaming with
headers sent only once the first token is ready, ``{"error": ...}`` bodies with Ollama's status
codes and texts, the preload/unload protocol, ``/api/show`` and the model listings, embeddings
(``/api/embed``, the legacy ``/api/embeddings``, ``/v1/embeddings``), and the OpenAI-compatible
endpoints (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models[/{id}]``). What a model
is (chat or embedding) and can do follows from its name (:mod:`chatd.dev.fake_ollama.catalog`).
The official ``ollama`` Python client works against it unchanged.

Replies and embeddings are deterministic: see :func:`expected_reply` and :func:`embedding`.
Behaviour changes at run time through ``POST /_fake/config`` (or :meth:`FakeOllama.configure` on
the server's own loop), and ``GET /_fake/stats`` reports generation and embedding requests in
flight.

This module is the fake's front: its public names, :class:`FakeOllamaThread` (the server on a
thread of its own, for synchronous tests) and ``main`` (``chatd-fake-ollama``, also run as
``python -m chatd.dev.fake_ollama.main``). The server is :mod:`chatd.dev.fake_ollama.server`,
its response bodies :mod:`chatd.dev.fake_ollama.frames`, its models
:mod:`chatd.dev.fake_ollama.catalog`, the reply and embedding functions, knobs and wire details
:mod:`chatd.dev.fake_ollama.wire`. These modules deliberately import nothing else from chatd: a
stand-in must not share code (and so bugs) with what it stands in for.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from types import TracebackType
from typing import Any

from chatd import __version__
from chatd.dev.fake_ollama.server import FakeOllama
from chatd.dev.fake_ollama.wire import (
    BUSY_TEXT,
    DEFAULT_MODEL,
    EMBED_DIM,
    embedding,
    expected_reply,
    reply_tokens,
)

__all__ = [
    "BUSY_TEXT",
    "EMBED_DIM",
    "FakeOllama",
    "FakeOllamaThread",
    "embedding",
    "expected_reply",
    "main",
    "reply_tokens",
]


class FakeOllamaThread:
    """Runs a :class:`FakeOllama` on its own event loop in a daemon thread, for synchronous
    tests: ``with FakeOllamaThread(FakeOllama(tokens=4)) as fake: ...fake.url...``. Change knobs
    over HTTP (``POST {fake.url}/_fake/config``), not by touching the object from this thread."""

    def __init__(self, fake: FakeOllama | None = None) -> None:
        self.fake = fake or FakeOllama()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="fake-ollama"
        )

    @property
    def url(self) -> str:
        return self.fake.url

    def start(self, host: str = "127.0.0.1", port: int = 0, timeout: float = 10.0) -> int:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self.fake.start(host, port), self._loop)
        return started.result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._loop.close()

    def __enter__(self) -> FakeOllama:
        self.start()
        return self.fake

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _nonneg(kind: type[int] | type[float]) -> Any:
    def parse(s: str) -> int | float:
        v = kind(s)
        if v < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
        return v

    return parse


def main(argv: list[str] | None = None) -> int:
    """``chatd-fake-ollama``: serve until SIGTERM/SIGINT, then exit 0 (1 if it cannot listen).
    Prints ``chatd-fake-ollama listening on http://HOST:PORT`` once listening."""
    p = argparse.ArgumentParser(prog="chatd-fake-ollama", description="A stand-in Ollama server.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_nonneg(int), default=11434, help="0 = pick a free port")
    p.add_argument("--first-token-ms", type=_nonneg(float), default=0.0)
    p.add_argument("--token-ms", type=_nonneg(float), default=0.0)
    p.add_argument("--tokens", type=_nonneg(int), default=8)
    p.add_argument("--model", action="append", help=f"a known model (repeatable; {DEFAULT_MODEL})")
    p.add_argument("--max-parallel", type=_nonneg(int), default=0, help="0 = unbounded")
    p.add_argument("--load-ms", type=_nonneg(float), default=0.0, help="cold load per model")
    args = p.parse_args(argv)
    fake = FakeOllama(
        args.model or [DEFAULT_MODEL],
        max_parallel=args.max_parallel,
        first_token_ms=args.first_token_ms,
        token_ms=args.token_ms,
        tokens=args.tokens,
        load_ms=args.load_ms,
    )

    async def serve() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            port = await fake.start(args.host, args.port)
        except OSError as e:
            print(
                f"chatd-fake-ollama: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr
            )
            return 1
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"chatd-fake-ollama listening on http://{host}:{port}", flush=True)
        try:
            await stop.wait()
        finally:
            await fake.stop()
        return 0

    try:
        import uvloop
    except ImportError:  # optional: plain asyncio is only slower
        return asyncio.run(serve())
    return uvloop.run(serve())


if __name__ == "__main__":
    sys.exit(main())
