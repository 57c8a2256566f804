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
import struct
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
#: The length of every embedding vector (``dimensions`` may only shorten it, as in Ollama).
EMBED_DIM = 8
#: llama-server's refusal, which Ollama passes on, when a model without pooling (a chat model)
#: is asked for embeddings: 501 on /api/embed and /v1/embeddings, 500 on /api/embeddings.
NO_EMBEDDINGS_TEXT = "This server does not support embeddings. Start it with `--embeddings`"
RECENT_REQUESTS = 64  # generation and embedding request bodies kept for GET /_fake/requests ...
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
#: The APIs answered in OpenAI's shapes: /v1/chat/completions, /v1/completions, /v1/embeddings.
OPENAI_APIS = frozenset({"openai", "completions", "v1_embeddings"})
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


def embedding(text: str, dimensions: int = 0) -> tuple[float, ...]:
    """The embedding of ``text``: :data:`EMBED_DIM` unit-length float32 values.

    Byte ``i`` of ``sha256(text.encode()).digest()`` gives ``(b - 127.5) / 127.5``; the
    vector is then L2-normalized (as Ollama normalizes a model's output) and, when
    ``0 < dimensions < EMBED_DIM``, cut to its first ``dimensions`` values and normalized again
    (Ollama's ``dimensions``; a larger value changes nothing). Each value is rounded to float32
    and given as the shortest decimal that reads back as that float32, which is how Go's JSON
    encoder writes Ollama's ``[]float32``. So equal texts embed equally, different texts
    differently, and no component is near 0. This definition is a stable contract.
    """
    digest = hashlib.sha256(text.encode()).digest()
    vec = _unit([(b - 127.5) / 127.5 for b in digest[:EMBED_DIM]])
    if 0 < dimensions < EMBED_DIM:
        vec = _unit(vec[:dimensions])
    return tuple(_f32_shortest(v) for v in vec)


def _unit(vec: list[float]) -> list[float]:
    norm = 1.0 / max(math.sqrt(sum(_f32(v) ** 2 for v in vec)), 1e-12)
    return [_f32(_f32(v) * norm) for v in vec]


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (as a Python float, exactly that float32)."""
    f: float = struct.unpack("<f", struct.pack("<f", x))[0]
    return f


def _f32_shortest(x: float) -> float:
    """The float32 ``x`` as the shortest decimal that reads back as it (Go's 32-bit 'g')."""
    for digits in range(1, 10):
        short = float(f"{x:.{digits}g}")
        if _f32(short) == x:
            return short
    return x


def embed_tokens(text: str) -> int:
    """The prompt tokens the fake counts for one embedded text: its words, at least 1."""
    return max(1, len(text.split()))


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
    An embedding request goes the same way up to its answer: ``status``, ``hang``, a slot (the
    same ``max_parallel`` slots), cold load, then ``extra_latency_ms``; it has no tokens, so
    ``first_token_ms``, ``token_ms``, ``tokens``, ``error_after_tokens`` and the faults do not
    apply to it.

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
    """Generation requests (non-empty messages/prompt, any API, whatever the answer) and
    embedding requests (at least one text to embed, any of the three APIs), each in flight from
    arrival until its response ends or its client goes away. Loads and unloads do not count."""

    in_flight: int = 0
    max_in_flight: int = 0
    requests_total: int = 0


class RecentRequests:
    """The last generation and embedding requests, oldest first (``GET /_fake/requests``): each
    its path (``/api/chat``, ``/api/embed``, ...) and its raw body.

    Bounded whatever the traffic: at most ``count`` bodies, and the older ones are dropped
    while all of them together exceed ``budget`` bytes, so it holds at most
    ``budget`` + the newest body (itself bounded by the server's ``client_max_size``). Raw
    bytes, not parsed objects: a parsed chat history takes several times its JSON size. The
    paths are the server's own route strings, shared, not copies.
    """

    __slots__ = ("_budget", "_count", "_entries", "nbytes")

    def __init__(self, count: int = RECENT_REQUESTS, budget: int = RECENT_BYTES) -> None:
        self._entries: collections.deque[tuple[str, bytes]] = collections.deque()
        self._count, self._budget = count, budget
        self.nbytes = 0  # the bytes of the bodies kept

    def append(self, path: str, raw: bytes) -> None:
        """Keep ``raw`` (a JSON object's text), sent to ``path``, as the newest request; drop
        old ones over the bounds."""
        entries = self._entries
        entries.append((path, raw))
        self.nbytes += len(raw)
        while len(entries) > self._count or (self.nbytes > self._budget and len(entries) > 1):
            self.nbytes -= len(entries.popleft()[1])

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        return iter(self._entries)


def _status_text(status: int, model: str) -> str:
    if status == 503:
        return BUSY_TEXT
    if status == 404:
        return f"model '{model}' not found"
    with contextlib.suppress(ValueError):
        return http.HTTPStatus(status).phrase.lower()
    return f"error {status}"


#: The Go struct each API decodes its request into (``api.`` or ``openai.``), and the Go types of
#: the fields the fake checks. A field of another JSON type is Go's 400; null is no value, as in
#: Go. (Unlisted fields are taken as they come.)
_GO_REQUESTS: dict[str, tuple[str, dict[str, str]]] = {
    "chat": (
        "api.ChatRequest",
        {"model": "string", "messages": "[]api.Message", "stream": "bool", "truncate": "bool"}
        | {"options": "map[string]interface {}", "logprobs": "bool", "top_logprobs": "int"},
    ),
    "generate": (
        "api.GenerateRequest",
        {"model": "string", "prompt": "string", "suffix": "string", "system": "string"}
        | {"template": "string", "context": "[]int", "stream": "bool", "raw": "bool"}
        | {"images": "[]api.ImageData", "options": "map[string]interface {}"}
        | {"truncate": "bool", "logprobs": "bool", "top_logprobs": "int"},
    ),
    "openai": (
        "openai.ChatCompletionRequest",
        {"model": "string", "messages": "[]openai.Message", "stream": "bool", "max_tokens": "int"}
        | {"seed": "int", "temperature": "float64", "top_p": "float64", "logprobs": "bool"},
    ),
    "completions": (
        "openai.CompletionRequest",
        {"model": "string", "prompt": "string", "suffix": "string", "stream": "bool"}
        | {"max_tokens": "int", "seed": "int", "temperature": "float32", "top_p": "float32"}
        | {"frequency_penalty": "float32", "presence_penalty": "float32", "logprobs": "int"},
    ),
    "show": (
        "api.ShowRequest",
        {"model": "string", "name": "string", "system": "string", "template": "string"}
        | {"verbose": "bool", "options": "map[string]interface {}"},
    ),
    "embed": (
        "api.EmbedRequest",
        {"model": "string", "truncate": "bool", "dimensions": "int"}
        | {"options": "map[string]interface {}"},
    ),
    "embeddings": (
        "api.EmbeddingRequest",
        {"model": "string", "prompt": "string", "options": "map[string]interface {}"},
    ),
    "v1_embeddings": (
        "openai.EmbedRequest",
        {"model": "string", "dimensions": "int", "encoding_format": "string"},
    ),
}
_THINK_LEVELS = ("high", "medium", "low", "max")
_THINK_CHOICES = '("high", "medium", "low", "max", true, or false)'


def go_decode_error(api: str, body: Any) -> str | None:
    """Go's encoding/json error for decoding the JSON value ``body`` into ``api``'s request
    struct, or None: a body that is not an object; a ``think`` Ollama's ThinkValue refuses
    (its error ends the decoding at once, so it wins); else the first field, in the body's
    order, of a JSON type its Go field cannot hold."""
    struct_name, fields = _GO_REQUESTS[api]
    if not isinstance(body, dict):
        return f"json: cannot unmarshal {_go_kind(body)} into Go value of type {struct_name}"
    think = body.get("think")
    if api in ("chat", "generate") and think is not None and not isinstance(think, bool):
        if not isinstance(think, str):
            return f"think must be a boolean or string {_THINK_CHOICES}"
        if think not in _THINK_LEVELS:
            return f'invalid think value: "{think}" (must be {_THINK_CHOICES[1:-1]})'
    short = struct_name.partition(".")[2]
    for key, val in body.items():
        want = fields.get(key)
        if want is not None and val is not None and not _go_fits(val, want):
            into = f"Go struct field {short}.{key} of type {want}"
            return f"json: cannot unmarshal {_go_kind(val, want)} into {into}"
    return None


def _go_kind(val: Any, want: str = "") -> str:
    """How Go's UnmarshalTypeError names a JSON value (a number an int cannot hold: with it)."""
    if isinstance(val, bool):
        return "bool"
    if isinstance(val, int | float):
        return f"number {val!r}" if want == "int" else "number"
    if isinstance(val, str):
        return "string"
    return "array" if isinstance(val, list) else "object" if isinstance(val, dict) else "null"


def _go_fits(val: Any, want: str) -> bool:
    if want == "string":
        return isinstance(val, str)
    if want == "bool":
        return isinstance(val, bool)
    if want == "int":
        return isinstance(val, int) and not isinstance(val, bool)
    if want.startswith("float"):
        return isinstance(val, int | float) and not isinstance(val, bool)
    if want.startswith("map"):
        return isinstance(val, dict)
    return isinstance(val, list)  # a []T


def go_quote(s: str) -> str:
    """Go's ``%q`` of a model name (its characters need no escape beyond JSON's)."""
    return orjson.dumps(s).decode()


def go_type_name(val: Any) -> str:
    """Go's ``%T`` of a decoded JSON value held in an ``any``."""
    if isinstance(val, bool):
        return "bool"
    if isinstance(val, int | float):
        return "float64"
    if isinstance(val, str):
        return "string"
    if isinstance(val, list):
        return "[]interface {}"
    return "map[string]interface {}" if isinstance(val, dict) else "<nil>"


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


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), headers=_JSON_CT)


_NL = orjson.OPT_APPEND_NEWLINE
_RUN_ERROR = "an error was encountered while running the model: fake error_after_tokens"
_Timing = tuple[int, int, int, int]  # perf_counter ns: arrival, load wait, prefill start, 1st token


@dataclass(slots=True)
class _Job:
    """One parsed generation request."""

    api: str  # "chat" | "generate" | "openai" (/v1/chat/completions) | "completions" (/v1)
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


def parse_job(api: str, body: dict[str, Any], key: str, cid: str) -> _Job:
    """The generation request ``body`` sent to ``api`` (its types checked by
    :func:`go_decode_error`), whose model resolved to the known model ``key``; ``cid`` is its
    OpenAI completion id. An empty prompt or message list is a load, answered as such."""
    if api in ("generate", "completions"):
        text = _text_of(body.get("prompt"))
        count = len(text.split()) + len(_text_of(body.get("system")).split())
    else:
        msgs = body.get("messages")
        msgs = [m for m in msgs if isinstance(m, dict)] if isinstance(msgs, list) else []
        users = [m for m in msgs if m.get("role") == "user"]
        text = _text_of(users[-1].get("content")) if users else ""
        count = sum(len(_text_of(m.get("content")).split()) for m in msgs)
    if api in OPENAI_APIS:
        limit = body.get("max_tokens")
        if api == "openai":
            limit = body.get("max_completion_tokens", limit)
        opts = body.get("stream_options")
        usage = isinstance(opts, dict) and opts.get("include_usage") is True
        stream = body.get("stream") is True  # OpenAI defaults to a single object
        keep_alive = _DEFAULT_KEEP_ALIVE_S  # Ollama's /v1 layer does not pass keep_alive on
    else:
        opts = body.get("options")
        limit = opts.get("num_predict") if isinstance(opts, dict) else None
        usage, stream = False, body.get("stream") is not False  # Ollama streams by default
        keep_alive = keep_alive_seconds(body.get("keep_alive"))
    return _Job(
        api=api,
        key=key,
        model=body["model"],
        text=text,
        limit=limit if type(limit) is int and limit >= 0 else None,
        prompt_count=max(1, count),
        stream=stream,
        include_usage=usage,
        keep_alive=keep_alive,
        cid=cid,
        created=int(time.time()),
    )
