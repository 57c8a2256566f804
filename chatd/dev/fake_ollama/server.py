"""The fake Ollama's HTTP server: :class:`FakeOllama`, its routes, knobs and model residency.

One job: take a request the way Ollama does (parse and check it, wait for ``hang``, a
``max_parallel`` slot, a cold load and the first token, all before any header) and stream the
answer on the right schedule. The answer's bytes come from :mod:`chatd.dev.fake_ollama.frames`, the
reply text, embeddings and knobs from :mod:`chatd.dev.fake_ollama.wire`, what a model is and can
do from :mod:`chatd.dev.fake_ollama.catalog`. Callers use it through
:mod:`chatd.dev.fake_ollama.main`. Like them it imports nothing else from chatd: a stand-in must
not share code (and so bugs) with what it stands in for.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import orjson
from aiohttp import web

from chatd.dev.fake_ollama import catalog, frames
from chatd.dev.fake_ollama.stream import stream
from chatd.dev.fake_ollama.wire import (
    _CONTEXT_LENGTH,
    _DEFAULT_KEEP_ALIVE_S,
    _JSON_CT,
    _MS_KNOBS,
    _RUN_ERROR,
    _SSE_CT,
    DEFAULT_MODEL,
    FAULTS,
    NO_EMBEDDINGS_TEXT,
    OLLAMA_VERSION,
    OPENAI_APIS,
    FakeConfig,
    FakeStats,
    RecentRequests,
    _Job,
    _json,
    _json_error_text,
    _status_text,
    embed_tokens,
    embedding,
    go_decode_error,
    go_quote,
    go_type_name,
    keep_alive_seconds,
    parse_job,
    reply_tokens,
    rfc3339nano,
)

#: Each API's path, as kept with its requests in the recent list (shared strings, not copies).
_PATHS = {
    "chat": "/api/chat",
    "generate": "/api/generate",
    "embed": "/api/embed",
    "embeddings": "/api/embeddings",
    "openai": "/v1/chat/completions",
    "completions": "/v1/completions",
    "v1_embeddings": "/v1/embeddings",
}


class FakeOllama:
    """An Ollama server double. ``await start(host, port)`` serves on the running event loop
    until ``await stop()``. ``config`` (:class:`FakeConfig`) and ``stats`` (:class:`FakeStats`)
    may be read at any time; change knobs with :meth:`configure` from the server's loop only (or
    over HTTP, ``POST /_fake/config``).

    ``models``: the names it knows (others get Ollama's 404; ``name`` without a tag also matches
    ``name:latest``); none is loaded at start. What each is (a chat or an embedding model) and
    can do follows from its name: see :mod:`chatd.dev.fake_ollama.catalog`. ``max_parallel``
    emulates OLLAMA_NUM_PARALLEL (0 = unbounded): beyond it, requests wait before headers,
    counted in flight. ``knobs``: initial :class:`FakeConfig` values.
    """

    def __init__(
        self, models: Iterable[str] = (DEFAULT_MODEL,), *, max_parallel: int = 0, **knobs: Any
    ) -> None:
        self.models: list[str] = list(models) or [DEFAULT_MODEL]
        self.max_parallel = max_parallel
        self.config = FakeConfig()
        self.stats = FakeStats()
        # Everything kept across requests is bounded (a stand-in that grows distorts every
        # long benchmark): counters in `stats`, bounded `recent` bodies, a bounded reply
        # cache (wire.reply_tokens); `_tasks` holds only the handlers still running.
        self.recent = RecentRequests()
        self.host, self.port = "127.0.0.1", 0
        self._slots = asyncio.Semaphore(max_parallel) if max_parallel > 0 else None
        self._unhung = asyncio.Event()  # set unless `hang`
        self._unhung.set()
        self._loaded: dict[str, float] = {}  # model -> wall-clock expiry (inf = forever)
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()  # generation handlers, cancelled by stop()
        self._runner: web.AppRunner | None = None
        self._ids = 0
        self._started_ns = time.time_ns()  # every model's modified_at (/api/tags, /api/show)
        self._started_at = rfc3339nano(self._started_ns)
        self.configure(knobs)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def configure(self, knobs: dict[str, Any]) -> dict[str, Any]:
        """Validate every knob, then apply all or none. ``reset_stats: true`` zeroes the counters
        (max_in_flight restarts at the current in_flight, which is a gauge). Clearing ``hang``
        lets held requests go on as normal ones. Returns the resulting config as a dict; raises
        ValueError naming the bad knob."""
        new = asdict(self.config)
        for key, val in knobs.items():
            if key in _MS_KNOBS or key == "tokens":
                ok = isinstance(val, int | float) and not isinstance(val, bool) and val >= 0
                ok = ok and (key != "tokens" or isinstance(val, int))
            elif key in ("hang", "reset_stats"):
                ok = isinstance(val, bool)
            elif key == "status":
                ok = val is None or (type(val) is int and (val == 0 or 400 <= val <= 599))
                val = val or None
            elif key == "error_after_tokens":
                ok = val is None or (type(val) is int and val >= 0)
            elif key == "fault":
                ok = val is None or val in FAULTS
            elif key == "fault_after_tokens":
                ok = type(val) is int and val >= 0
            elif key == "fault_match":
                ok = val is None or (isinstance(val, str) and val != "")
            elif key == "fault_bytes":
                ok = type(val) is int and val >= 1
            else:
                raise ValueError(f"unknown knob '{key}'")
            if not ok:
                raise ValueError(f"bad value for '{key}': {val!r}")
            if key != "reset_stats":
                new[key] = val
        self.config = FakeConfig(**new)  # replaced, never mutated: requests keep a snapshot
        if self.config.hang:
            self._unhung.clear()
        else:
            self._unhung.set()
        if knobs.get("reset_stats"):
            self.stats.requests_total, self.stats.max_in_flight = 0, self.stats.in_flight
            self.recent.clear()
        return asdict(self.config)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on host:port (0 = a free port); return the bound port (also ``self.port``)."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        r = app.router
        # add_get answers HEAD too (same headers, no body), as Ollama does on these three ...
        r.add_get("/", self._root)
        r.add_get("/api/version", self._version)
        r.add_get("/api/tags", self._tags)
        # ... and only on them: elsewhere HEAD is 405, as gin's HandleMethodNotAllowed answers.
        r.add_get("/api/ps", self._ps, allow_head=False)
        r.add_post("/api/show", self._show)
        r.add_post("/api/chat", functools.partial(self._generation, api="chat"))
        r.add_post("/api/generate", functools.partial(self._generation, api="generate"))
        r.add_post("/api/embed", functools.partial(self._embedding, api="embed"))
        r.add_post("/api/embeddings", functools.partial(self._embedding, api="embeddings"))
        r.add_post("/v1/chat/completions", functools.partial(self._generation, api="openai"))
        r.add_post("/v1/completions", functools.partial(self._generation, api="completions"))
        r.add_post("/v1/embeddings", functools.partial(self._embedding, api="v1_embeddings"))
        r.add_get("/v1/models", self._v1_models, allow_head=False)
        r.add_get("/v1/models/{model}", self._v1_model, allow_head=False)
        r.add_route("*", "/_fake/config", self._fake_config)
        r.add_get("/_fake/stats", self._fake_stats)
        r.add_get("/_fake/requests", self._fake_requests)
        # handler_cancellation: a client that goes away cancels its handler, so the in-flight
        # count drops even for a request held by `hang`. No access log: it would slow load tests.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0
        )
        await runner.setup()
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        # Our own socket, so the bound port is known without aiohttp internals.
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            await web.SockSite(runner, sock, backlog=1024).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner
        self.host, self.port = host, sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop listening; cancel held and streaming requests and pending loads. Idempotent."""
        for task in [*self._tasks, *self._loading.values()]:
            task.cancel()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- informational routes -------------------------------------------------------------

    async def _root(self, _: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, _: web.Request) -> web.Response:
        return _json({"version": OLLAMA_VERSION})

    async def _fake_stats(self, _: web.Request) -> web.Response:
        return _json(asdict(self.stats))

    async def _fake_requests(self, _: web.Request) -> web.Response:
        """The last generation and embedding requests, oldest first (what a gateway sent):
        ``requests``, their bodies, and ``paths``, the path each was sent to, index by index;
        see :class:`RecentRequests` for how many."""
        kept = list(self.recent)
        bodies = [orjson.Fragment(raw) for _, raw in kept]
        return _json({"requests": bodies, "paths": [path for path, _ in kept]})

    async def _tags(self, _: web.Request) -> web.Response:
        return _json({"models": [catalog.tags_entry(m, self._started_at) for m in self.models]})

    async def _ps(self, _: web.Request) -> web.Response:
        now, out = time.time(), []
        for name in [m for m in list(self._loaded) if self._is_loaded(m)]:
            exp = self._loaded[name]
            # Ollama shows a far-future time for "forever".
            exp_ns = int((now + 290 * 365 * 86400 if math.isinf(exp) else exp) * 1e9)
            extra = {"expires_at": rfc3339nano(exp_ns), "size_vram": catalog.size(name)}
            out.append(catalog.model_entry(name) | extra | {"context_length": _CONTEXT_LENGTH})
        return _json({"models": out})

    async def _show(self, request: web.Request) -> web.Response:
        """POST /api/show: ``model`` (or the older ``name``) -> Ollama's ShowResponse."""
        body = self._body("show", await request.read())
        if isinstance(body, web.Response):
            return body
        name = body.get("model") or body.get("name")
        if not name:
            return self._error("show", 400, "model is required")
        key = self._resolve(name)
        if key is None:  # Ollama names it as resolved: "x" -> "x:latest"
            return self._error("show", 404, f"model '{catalog.shortest(name)}' not found")
        return _json(catalog.show(key, self._started_at))

    async def _v1_models(self, _: web.Request) -> web.Response:
        created = self._started_ns // 1_000_000_000  # the models' modified_at, as Ollama
        data = [catalog.v1_model(m, created) for m in self.models]
        return _json({"object": "list", "data": data})

    async def _v1_model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{model}: Ollama answers it with /api/show, in OpenAI's shapes."""
        model_id = request.match_info["model"]
        if self._resolve(model_id) is None:
            msg = f"model '{catalog.shortest(model_id)}' not found"
            return self._error("openai", 404, msg)
        return _json(catalog.v1_model(model_id, self._started_ns // 1_000_000_000))

    async def _fake_config(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            return _json(asdict(self.config))
        try:
            knobs = orjson.loads(await request.read() or b"{}")
            if not isinstance(knobs, dict):
                raise ValueError("expected a JSON object")
            return _json(self.configure(knobs))
        except ValueError as e:  # orjson.JSONDecodeError is a ValueError
            return _json({"error": str(e)}, 400)

    # -- model residency --------------------------------------------------------------------

    def _is_loaded(self, model: str) -> bool:
        exp = self._loaded.get(model)
        if exp is not None and exp < time.time():  # keep_alive ran out: cold again
            del self._loaded[model]
            return False
        return exp is not None

    async def _ensure_loaded(self, model: str) -> int:
        """Wait for a cold model to load (one shared load per model); return the ns waited."""
        if self._is_loaded(model):
            return 0
        t0 = time.perf_counter_ns()
        task = self._loading.get(model)
        if task is None:
            task = self._loading[model] = asyncio.create_task(self._load(model))
        await asyncio.shield(task)  # one impatient client must not abort the others' load
        return time.perf_counter_ns() - t0

    async def _load(self, model: str) -> None:
        try:
            await asyncio.sleep(self.config.load_ms / 1000)
            self._loaded[model] = time.time() + _DEFAULT_KEEP_ALIVE_S
        finally:
            self._loading.pop(model, None)

    def _keep(self, model: str, keep_alive: float) -> None:
        if keep_alive == 0:
            self._loaded.pop(model, None)
        else:
            self._loaded[model] = time.time() + keep_alive

    # -- requests: bodies, models, counters -------------------------------------------------

    def _error(self, api: str, status: int, message: str) -> web.Response:
        return _json(frames.error_body(api, status, message), status)

    def _body(self, api: str, raw: bytes) -> dict[str, Any] | web.Response:
        """The request body as Ollama's Go decoding takes it, or its 400: empty (gin's io.EOF:
        "missing request body" natively, the bare "EOF" from the /v1 layer), not JSON, not an
        object, or a field of the wrong type (see :func:`~.wire.go_decode_error`)."""
        if not raw:
            return self._error(api, 400, "EOF" if api in OPENAI_APIS else "missing request body")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._error(api, 400, _json_error_text(raw))
        bad = go_decode_error(api, body)
        if bad is not None or not isinstance(body, dict):
            return self._error(api, 400, bad or "")
        return body

    def _resolve(self, name: str) -> str | None:
        """The known model ``name`` stands for (``name:latest`` for a bare name), or None."""
        if name in self.models:
            return name
        if ":" not in name.rsplit("/", 1)[-1] and f"{name}:latest" in self.models:
            return f"{name}:latest"
        return None

    def _check_model(self, api: str, body: dict[str, Any]) -> str | web.Response:
        """The known model the request names, or Ollama's answer when there is none. A missing
        model is a 400 "model is required" on /api/chat, /v1/chat/completions and
        /api/embeddings, but a 404 naming the empty model where Ollama's handler checks it
        with a fallback text (generate, embed and their /v1 forms); an unknown one is 404."""
        name = body.get("model")
        name = name if isinstance(name, str) else ""
        if not name.strip():
            if api in ("chat", "openai", "embeddings"):
                return self._error(api, 400, "model is required")
            return self._error(api, 404, f"model '{name}' not found")
        key = self._resolve(name)
        if key is not None:
            return key
        if api == "embeddings":  # its handler's own text: Go's %q, and a hint
            return self._error(api, 404, f"model {go_quote(name)} not found, try pulling it first")
        return self._error(api, 404, f"model '{name}' not found")

    def _count(self, api: str, raw: bytes) -> asyncio.Task[Any] | None:
        """A generation or embedding request starts: keep its body, count it in flight."""
        self.recent.append(_PATHS[api], raw)
        stats = self.stats
        stats.in_flight += 1
        stats.requests_total += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        return task

    def _uncount(self, task: asyncio.Task[Any] | None) -> None:
        """The request ends (also on cancellation: client gone, or stop())."""
        self.stats.in_flight -= 1
        if task is not None:
            self._tasks.discard(task)

    # -- generation -------------------------------------------------------------------------

    async def _generation(self, request: web.Request, api: str) -> web.StreamResponse:
        """POST /api/chat, /api/generate, /v1/chat/completions, /v1/completions."""
        raw = await request.read()
        body = self._body(api, raw)
        if isinstance(body, web.Response):
            return body
        if api == "openai" and not body.get("messages"):  # the /v1 layer, before any model
            return self._error(api, 400, "[] is too short - 'messages'")
        if api == "completions" and (bad := _stop_error(body.get("stop"))):
            return self._error(api, 400, bad)
        if not body.get("messages" if api in ("chat", "openai") else "prompt"):
            return await self._load_request(api, body)
        task = self._count(api, raw)
        try:
            job = self._parse_job(api, body)
            return job if isinstance(job, web.Response) else await self._serve(request, job)
        finally:
            self._uncount(task)

    async def _load_request(self, api: str, body: dict[str, Any]) -> web.StreamResponse:
        """Empty messages/prompt: load (or, with keep_alive 0, unload) the model, as Ollama. The
        /v1 layer passes no keep_alive, so /v1/completions only loads, in its own shape."""
        key = self._check_model(api, body)
        if isinstance(key, web.Response):
            return key
        native = api not in OPENAI_APIS
        keep_alive = keep_alive_seconds(body.get("keep_alive")) if native else _DEFAULT_KEEP_ALIVE_S
        out: dict[str, Any] = {"model": body["model"], "created_at": rfc3339nano()}
        msg = {"role": "assistant", "content": ""}
        if keep_alive == 0:  # unload: before any capability check, so any model unloads
            self._loaded.pop(key, None)
            if api == "chat":
                return _json(out | {"message": msg, "done_reason": "unload", "done": True})
            return _json(out | {"response": "", "done": True, "done_reason": "unload"})
        why = catalog.refusal(api, body, key)
        if why is not None:
            return self._error(api, 400, why)
        await self._ensure_loaded(key)
        self._keep(key, keep_alive)
        if api == "completions":
            self._ids += 1
            job = parse_job(api, body, key, f"cmpl-{self._ids}")
            answer = frames.completion_load(job)
            return web.Response(body=answer, headers=_SSE_CT) if job.stream else _json_raw(answer)
        if api == "chat":
            return _json(out | {"message": msg, "done_reason": "load", "done": True})
        return _json(out | {"response": "", "done": True, "done_reason": "load"})

    def _parse_job(self, api: str, body: dict[str, Any]) -> _Job | web.Response:
        key = self._check_model(api, body)
        if isinstance(key, web.Response):
            return key
        why = catalog.refusal(api, body, key)
        if why is not None:
            return self._error(api, 400, why)
        self._ids += 1
        prefix = "cmpl" if api == "completions" else "chatcmpl"
        return parse_job(api, body, key, f"{prefix}-{self._ids}")

    async def _serve(self, request: web.Request, job: _Job) -> web.StreamResponse:
        """All waiting (hang, slot, load, first token) happens before any header is sent."""
        t0 = time.perf_counter_ns()
        cfg = self.config  # the knobs as of arrival
        if cfg.status:
            return self._error(job.api, cfg.status, _status_text(cfg.status, job.model))
        await self._unhung.wait()
        async with self._slots or contextlib.nullcontext():
            load_ns = await self._ensure_loaded(job.key)
            t_prefill = time.perf_counter_ns()
            await asyncio.sleep((cfg.first_token_ms + cfg.extra_latency_ms) / 1000)
            n, reason = cfg.tokens, "stop"
            if job.limit is not None and job.limit < n:
                n, reason = job.limit, "length"
            toks = reply_tokens(job.text, n)
            fail = cfg.error_after_tokens
            if fail is not None and (fail == 0 or not job.stream):
                # Before the first chunk is out Ollama can still send a status (notes 1.4).
                return self._error(job.api, 500, _RUN_ERROR)
            timing = (t0, load_ns, t_prefill, time.perf_counter_ns())
            if job.stream:
                resp = await stream(request, job, toks, reason, timing, cfg, fail)
            else:
                await asyncio.sleep(max(0, n - 1) * cfg.token_ms / 1000)
                resp = _json(frames.whole(job, toks, reason, timing))
        self._keep(job.key, job.keep_alive)
        return resp

    # -- embeddings -------------------------------------------------------------------------

    async def _embedding(self, request: web.Request, api: str) -> web.Response:
        """POST /api/embed, /api/embeddings (legacy) and /v1/embeddings, checked in Ollama's
        order. A request with no text to embed is a load (``{"embeddings": []}``, legacy
        ``{"embedding": []}``); one with texts counts in the stats and the recent requests like
        a generation, whatever its answer, and honours ``status``, ``hang``, ``max_parallel``,
        ``load_ms`` and ``extra_latency_ms`` (the other knobs shape token streams)."""
        raw = await request.read()
        body = self._body(api, raw)
        if isinstance(body, web.Response):
            return body
        if api == "v1_embeddings":  # the /v1 layer's own checks come first
            fmt = body.get("encoding_format")
            if fmt and fmt.lower() not in ("float", "base64"):
                msg = f"Invalid value for 'encoding_format' = {fmt}. Supported values: "
                return self._error(api, 400, msg + "['float', 'base64'].")
            if body.get("input") == "":
                body["input"] = [""]  # OpenAI's empty string is one text to embed
            elif body.get("input") is None or body.get("input") == []:
                return self._error(api, 400, "invalid input")
        texts = _embed_texts(api, body)
        if isinstance(texts, str) or not texts:  # an error to give, or nothing to embed
            key = self._check_embed(api, body, texts)
            if isinstance(key, web.Response):
                return key
            keep_alive = keep_alive_seconds(body.get("keep_alive"))
            await self._ensure_loaded(key)
            self._keep(key, keep_alive)
            if api == "embeddings":
                return _json({"embedding": []})
            return _json({"model": body["model"], "embeddings": []})
        task = self._count(api, raw)
        try:
            key = self._check_embed(api, body, texts)
            if isinstance(key, web.Response):
                return key
            return await self._serve_embedding(api, body, key, texts)
        finally:
            self._uncount(task)

    def _check_embed(
        self, api: str, body: dict[str, Any], texts: list[str] | str
    ) -> str | web.Response:
        """Ollama's order: the model's name, then the input's type, then the model itself."""
        name = body.get("model")
        if api != "embeddings" and not (isinstance(name, str) and name.strip()):
            return self._check_model(api, body)  # the 404 naming the empty model
        if isinstance(texts, str):
            return self._error(api, 400, texts)
        return self._check_model(api, body)

    async def _serve_embedding(
        self, api: str, body: dict[str, Any], key: str, texts: list[str]
    ) -> web.Response:
        t0 = time.perf_counter_ns()
        cfg = self.config  # the knobs as of arrival
        if cfg.status:
            return self._error(api, cfg.status, _status_text(cfg.status, body["model"]))
        await self._unhung.wait()
        # The /v1 layer passes no keep_alive (nor truncate) on.
        keep = None if api == "v1_embeddings" else body.get("keep_alive")
        async with self._slots or contextlib.nullcontext():
            load_ns = await self._ensure_loaded(key)
            await asyncio.sleep(cfg.extra_latency_ms / 1000)
            self._keep(key, keep_alive_seconds(keep))  # loaded, whatever comes next
            if not catalog.is_embedding(key):  # llama-server's refusal, passed on
                return self._error(api, 500 if api == "embeddings" else 501, NO_EMBEDDINGS_TEXT)
            dims = (api != "embeddings" and body.get("dimensions")) or 0  # not in the legacy API
            truncate = api != "embed" or body.get("truncate") is not False
            vectors, count = [], 0
            for text in texts:
                words = text.split()
                if len(words) > catalog.EMBED_CONTEXT:
                    if not truncate:
                        msg = "the input length exceeds the context length"
                        return self._error(api, 400, msg)
                    text = " ".join(words[: catalog.EMBED_CONTEXT])
                vectors.append(embedding(text, dims))
                count += embed_tokens(text)
        if api == "embeddings":
            return _json(frames.embeddings_legacy(vectors[0]))
        if api == "v1_embeddings":
            fmt = body.get("encoding_format")
            return _json(frames.v1_embeddings(body["model"], vectors, count, fmt))
        return _json(frames.embed(body["model"], vectors, count, (t0, load_ns)))


def _embed_texts(api: str, body: dict[str, Any]) -> list[str] | str:
    """The texts to embed, in order, or the 400 text for an input of the wrong type: legacy
    ``prompt`` (empty: none); ``input`` a string (empty: none) or a list of strings."""
    if api == "embeddings":
        prompt = body.get("prompt")
        return [prompt] if prompt else []
    value = body.get("input")
    if isinstance(value, str):
        return [value] if value else []
    if value is None:
        return []
    if isinstance(value, list) and all(isinstance(t, str) for t in value):
        return value
    return "invalid input type"


def _stop_error(stop: Any) -> str | None:
    """/v1/completions' ``stop``: a string or a list of strings (another type is ignored)."""
    if isinstance(stop, list):
        for s in stop:
            if not isinstance(s, str):
                return f"invalid type for 'stop' field: {go_type_name(s)}"
    return None


def _json_raw(body: bytes) -> web.Response:
    return web.Response(body=body, headers=_JSON_CT)
