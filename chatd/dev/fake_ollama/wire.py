"""The fake Ollama's data: its replies, knobs, counters, and Ollama's wire details.

Pure helpers of :mod:`chatd.dev.fake_ollama.server` (no server here): the deterministic reply
function tests compute expected text with, the knob and counter dataclasses, Ollama's status
texts, and the parsed request with its parser. Like the server, it imports nothing from the rest
of chatd: a stand-in must not share code (and so bugs) with what it stands in for.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import http
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

OLLAMA_VERSION = "0.33.0"
DEFAULT_MODEL = "qwen2.5-coder:7b"
#: Ollama's ErrMaxQueue text, two spaces included (server/sched.go).
BUSY_TEXT = "server busy, please try again.  maximum pending requests exceeded"
MAX_WORD_CHARS = 32
RECENT_REQUESTS = 64  # generation request bodies kept for GET /_fake/requests ...
RECENT_BYTES = 1 << 20  # ... and their bytes in all, beyond the newest one
#: The faults a backend can show (the ``fault`` knob, see :class:`FakeConfig`).
FAULTS = ("reset", "trickle", "huge_token", "not_json", "not_object", "no_message")
# reply_tokens memoizes only short texts and replies: load tests repeat a few short prompts,
# while a cache keyed on whole texts kept thousands of them (up to max_message_bytes each)
# alive for the life of the process.
_CACHED_TEXT_CHARS = 256
_CACHED_TOKENS = 256
_DEFAULT_KEEP_ALIVE_S = 300.0  # OLLAMA_KEEP_ALIVE default, 5m
_MODEL_SIZE = 4_683_087_332
_CONTEXT_LENGTH = 4096
_JSON_CT = {"Content-Type": "application/json; charset=utf-8"}
_NDJSON_CT = {"Content-Type": "application/x-ndjson"}
_SSE_CT = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_SSE_DONE = b"data: [DONE]\n\n"
_MS_KNOBS = ("first_token_ms", "token_ms", "extra_latency_ms", "load_ms", "trickle_ms")


def reply_tokens(text: str, tokens: int) -> tuple[str, ...]:
    """The reply to a last user message ``text``, as ``tokens`` token strings.

    Token ``i`` (0-based) is ``w + "#" + str(i)``, prefixed by one space unless ``i == 0``, where
    ``w`` is word ``i mod len(words)`` of ``text.split()`` cut to its first MAX_WORD_CHARS code
    points, and ``words`` is ``["echo"]`` when ``text`` has none. Example:
    ``reply_tokens("hello world", 3) == ("hello#0", " world#1", " hello#2")``. So the reply for
    ``n`` tokens is a prefix of the reply for ``n + 1`` (truncation by num_predict is exact) and a
    dropped, doubled or reordered token shows. This definition is a stable contract.

    Memory: only replies to texts of at most 256 code points and of at most 256 tokens are
    memoized (256 of them at most), so the cache holds a few hundred KB whatever is asked.
    """
    if len(text) <= _CACHED_TEXT_CHARS and tokens <= _CACHED_TOKENS:
        return _cached_reply_tokens(text, tokens)
    return _reply_tokens(text, tokens)


def _reply_tokens(text: str, tokens: int) -> tuple[str, ...]:
    words = [w[:MAX_WORD_CHARS] for w in text.split()] or ["echo"]
    return tuple(f"{' ' if i else ''}{words[i % len(words)]}#{i}" for i in range(tokens))


_cached_reply_tokens = functools.lru_cache(maxsize=256)(_reply_tokens)


def expected_reply(text: str, tokens: int) -> str:
    """The full reply text: ``"".join(reply_tokens(text, tokens))``."""
    return "".join(reply_tokens(text, tokens))


def rfc3339nano(ns: int | None = None) -> str:
    """UTC time (now, or ``ns`` since the epoch) as Go's RFC3339Nano, trailing zeros trimmed."""
    sec, frac = divmod(time.time_ns() if ns is None else ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{base}.{frac:09d}".rstrip("0") + "Z" if frac else base + "Z"


_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: Any) -> float:
    """Ollama's ``keep_alive``: seconds (number) or a Go duration ("10m", "1h30m"); negative means
    forever (``math.inf``); absent or unparseable gives the 5 minute default."""
    if isinstance(value, bool) or value is None:
        return _DEFAULT_KEEP_ALIVE_S
    if isinstance(value, int | float):
        secs = float(value)
    elif isinstance(value, str):
        s = value.strip()
        body = s.lstrip("+-")
        parts = _GO_DURATION.findall(body)
        if body == "0":  # the one unitless duration Go accepts
            return 0.0
        if not parts or "".join(a + b for a, b in parts) != body:
            return _DEFAULT_KEEP_ALIVE_S
        secs = sum(float(a) * _UNIT_S[u] for a, u in parts) * (-1 if s.startswith("-") else 1)
    else:
        return _DEFAULT_KEEP_ALIVE_S
    return math.inf if secs < 0 else secs


@dataclass
class FakeConfig:
    """Run-time knobs, named as in ``POST /_fake/config``; times in milliseconds.

    A generation request goes: ``status`` (if set, answered at once with that status and
    Ollama's ``{"error"}`` body) -> ``hang`` (held, headers unsent, until the knob is cleared; then
    served normally) -> a ``max_parallel`` slot -> cold load (``load_ms``, first request of a model
    not in /api/ps) -> ``first_token_ms + extra_latency_ms`` -> headers with the first token ->
    ``token_ms`` between tokens. It uses the knobs as they were on arrival, except ``hang``.
    ``error_after_tokens`` = k: when streaming, k token chunks then one error line (an SSE error
    frame on /v1) and the end, no done chunk; k = 0, or stream:false, gives HTTP 500 + error body.

    ``fault`` (one of :data:`FAULTS`) breaks a *streamed* reply the way a faulty backend or
    network does, at line k = ``fault_after_tokens`` (the chunk of token k, or the done line /
    the tail when fewer token chunks come before it), after the lines before it went out on
    their schedule; ``fault_match``, when set, limits it to requests whose last user message
    (or prompt) contains that text, so that other clients of the same backend are served as
    usual. Non-streamed requests ignore it.

    * ``reset``: the connection is reset (TCP RST) instead of line k, and nothing follows.
    * ``trickle``: line k and everything after it are written one byte every ``trickle_ms``.
    * ``huge_token``: token k's text (the last token's, if k is past it) is
      ``"x" * fault_bytes`` (default 5 MiB); the rest as usual, so the reply is
      :func:`reply_tokens` with that one token replaced.
    * ``not_json``, ``not_object``, ``no_message``: line k is replaced by a line that is not
      JSON, by JSON that is not an object (an array), or by an object without the reply's
      member (``message`` on /api/chat, ``response`` on /api/generate, ``choices`` on /v1);
      the stream then goes on as usual (a lenient client drops token k).
    """

    first_token_ms: float = 0.0  # before the first token (headers go out with it)
    token_ms: float = 0.0  # between tokens; 0 = everything in one write
    tokens: int = 8  # tokens per reply
    hang: bool = False  # hold generation requests before headers until cleared
    status: int | None = None  # answer generation requests with this status + {"error"}
    error_after_tokens: int | None = None  # k tokens then an {"error"} line; 0 = 500 before
    extra_latency_ms: float = 0.0  # added before the first token (latency spike)
    load_ms: float = 0.0  # cold load of a model not in /api/ps
    fault: str | None = None  # one of FAULTS: how a streamed reply breaks
    fault_after_tokens: int = 0  # good token chunks before the fault
    fault_match: str | None = None  # only requests whose text contains this; None = all
    fault_bytes: int = 5 * 1024 * 1024  # huge_token: the size of the token
    trickle_ms: float = 1000.0  # trickle: the gap between two bytes


@dataclass
class FakeStats:
    """Generation requests (non-empty messages/prompt, any API, whatever the answer), each in
    flight from arrival until its response ends or its client goes away."""

    in_flight: int = 0
    max_in_flight: int = 0
    requests_total: int = 0


class RecentRequests:
    """The raw bodies of the last generation requests, oldest first (``GET /_fake/requests``).

    Bounded whatever the traffic: at most ``count`` bodies, and the older ones are dropped
    while all of them together exceed ``budget`` bytes, so it holds at most
    ``budget`` + the newest body (itself bounded by the server's ``client_max_size``). Raw
    bytes, not parsed objects: a parsed chat history takes several times its JSON size.
    """

    __slots__ = ("_bodies", "_budget", "_count", "nbytes")

    def __init__(self, count: int = RECENT_REQUESTS, budget: int = RECENT_BYTES) -> None:
        self._bodies: collections.deque[bytes] = collections.deque()
        self._count, self._budget = count, budget
        self.nbytes = 0  # the bytes of the bodies kept

    def append(self, raw: bytes) -> None:
        """Keep ``raw`` (a JSON object's text) as the newest body; drop old ones over the bounds."""
        bodies = self._bodies
        bodies.append(raw)
        self.nbytes += len(raw)
        while len(bodies) > self._count or (self.nbytes > self._budget and len(bodies) > 1):
            self.nbytes -= len(bodies.popleft())

    def clear(self) -> None:
        self._bodies.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._bodies)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._bodies)


def _status_text(status: int, model: str) -> str:
    if status == 503:
        return BUSY_TEXT
    if status == 404:
        return f"model '{model}' not found"
    with contextlib.suppress(ValueError):
        return http.HTTPStatus(status).phrase.lower()
    return f"error {status}"


def _json_error_text(body: bytes) -> str:
    """Go's encoding/json text for the two common decode failures (the rest: unexpected EOF)."""
    head = body.lstrip()[:1].decode("latin-1")
    if head and head not in '{["-0123456789tfn':
        return f"invalid character '{head}' looking for beginning of value"
    return "unexpected EOF"


def _text_of(content: Any) -> str:
    """Message content as text: a string, or OpenAI's list of {"type":"text","text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
    return ""


def _model_info(name: str) -> dict[str, Any]:
    base, _, tag = name.partition(":")
    fam = re.match(r"[a-z]+\d*", base.rsplit("/", 1)[-1].lower())
    family = fam.group(0) if fam else "llama"
    size = re.search(r"(\d+(?:\.\d+)?)b", tag.lower())
    return {
        "name": name,
        "model": name,
        "size": _MODEL_SIZE,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": f"{size.group(1)}B" if size else "7B",
            "quantization_level": "Q4_K_M",
        },
    }


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), headers=_JSON_CT)


_NL = orjson.OPT_APPEND_NEWLINE
_RUN_ERROR = "an error was encountered while running the model: fake error_after_tokens"
_Timing = tuple[int, int, int, int]  # perf_counter ns: arrival, load wait, prefill start, 1st token


@dataclass(slots=True)
class _Job:
    """One parsed generation request."""

    api: str  # "chat" | "generate" | "openai"
    key: str  # the known model it resolved to (residency, /api/ps)
    model: str  # the name as the client sent it (echoed in replies, as Ollama does)
    text: str  # last user message (or prompt): the only input to the reply
    limit: int | None  # options.num_predict / max_tokens
    prompt_count: int
    stream: bool
    include_usage: bool
    keep_alive: float
    cid: str  # OpenAI completion id
    created: int  # OpenAI "created", unix seconds


def parse_job(api: str, body: dict[str, Any], key: str, cid: str) -> _Job | str:
    """The generation request ``body`` (non-empty messages or prompt) sent to ``api``, whose
    model resolved to the known model ``key``; ``cid`` is its OpenAI completion id. Returns the
    text of Ollama's 400 error instead when ``messages`` is not a list."""
    if api == "generate":
        text = _text_of(body.get("prompt"))
        count = len(text.split()) + len(_text_of(body.get("system")).split())
    else:
        msgs = body["messages"]
        if not isinstance(msgs, list):
            return "json: cannot unmarshal messages into []api.Message"
        msgs = [m for m in msgs if isinstance(m, dict)]
        users = [m for m in msgs if m.get("role") == "user"]
        text = _text_of(users[-1].get("content")) if users else ""
        count = sum(len(_text_of(m.get("content")).split()) for m in msgs)
    if api == "openai":
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        opts = body.get("stream_options")
        usage = isinstance(opts, dict) and opts.get("include_usage") is True
        stream = body.get("stream") is True  # OpenAI defaults to a single object
    else:
        opts = body.get("options")
        limit = opts.get("num_predict") if isinstance(opts, dict) else None
        usage, stream = False, body.get("stream") is not False  # Ollama streams by default
    return _Job(
        api=api,
        key=key,
        model=body["model"],
        text=text,
        limit=limit if type(limit) is int and limit >= 0 else None,
        prompt_count=max(1, count),
        stream=stream,
        include_usage=usage,
        keep_alive=keep_alive_seconds(body.get("keep_alive")),
        cid=cid,
        created=int(time.time()),
    )
