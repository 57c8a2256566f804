"""The fake Ollama's HTTP server: :class:`FakeOllama`, its routes, knobs and model residency.

One job: take a request the way Ollama does (parse and check it, wait for ``hang``, a
``max_parallel`` slot, a cold load and the first token, all before any header) and stream the
answer on the right schedule. The answer's bytes come from :mod:`chatd.dev.fake_ollama.frames`, the
reply text and the knobs from :mod:`chatd.dev.fake_ollama.wire`. Callers use it through
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

from chatd.dev.fake_ollama import frames
from chatd.dev.fake_ollama.stream import stream
from chatd.dev.fake_ollama.wire import (
    _CONTEXT_LENGTH,
    _DEFAULT_KEEP_ALIVE_S,
    _MODEL_SIZE,
    _MS_KNOBS,
    _RUN_ERROR,
    DEFAULT_MODEL,
    FAULTS,
    OLLAMA_VERSION,
    FakeConfig,
    FakeStats,
    RecentRequests,
    _Job,
    _json,
    _json_error_text,
    _model_info,
    _status_text,
    keep_alive_seconds,
    parse_job,
    reply_tokens,
    rfc3339nano,
)


class FakeOllama:
    """An Ollama server double. ``await start(host, port)`` serves on the running event loop
    until ``await stop()``. ``config`` (:class:`FakeConfig`) and ``stats`` (:class:`FakeStats`)
    may be read at any time; change knobs with :meth:`configure` from the server's loop only (or
    over HTTP, ``POST /_fake/config``).

    ``models``: the names it knows (others get Ollama's 404; ``name`` without a tag also matches
    ``name:latest``); none is loaded at start. ``max_parallel`` emulates OLLAMA_NUM_PARALLEL
    (0 = unbounded): beyond it, requests wait before headers, counted in flight. ``knobs``: initial
    :class:`FakeConfig` values.
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
        self._started_at = rfc3339nano()
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
        r.add_get("/", self._root)
        r.add_get("/api/version", self._version)
        r.add_get("/api/tags", self._tags)
        r.add_get("/api/ps", self._ps)
        r.add_post("/api/chat", functools.partial(self._generation, api="chat"))
        r.add_post("/api/generate", functools.partial(self._generation, api="generate"))
        r.add_post("/v1/chat/completions", functools.partial(self._generation, api="openai"))
        r.add_get("/v1/models", self._v1_models)
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
        """The bodies of the last generation requests, oldest first (what a gateway sent); see
        :class:`RecentRequests` for how many."""
        return _json({"requests": [orjson.Fragment(raw) for raw in self.recent]})

    async def _tags(self, _: web.Request) -> web.Response:
        models = [_model_info(m) | {"modified_at": self._started_at} for m in self.models]
        return _json({"models": models})

    async def _ps(self, _: web.Request) -> web.Response:
        now, out = time.time(), []
        for name in [m for m in list(self._loaded) if self._is_loaded(m)]:
            exp = self._loaded[name]
            # Ollama shows a far-future time for "forever".
            exp_ns = int((now + 290 * 365 * 86400 if math.isinf(exp) else exp) * 1e9)
            extra = {"expires_at": rfc3339nano(exp_ns), "size_vram": _MODEL_SIZE}
            out.append(_model_info(name) | extra | {"context_length": _CONTEXT_LENGTH})
        return _json({"models": out})

    async def _v1_models(self, _: web.Request) -> web.Response:
        now = int(time.time())
        data = [
            {"id": m, "object": "model", "created": now, "owned_by": "library"} for m in self.models
        ]
        return _json({"object": "list", "data": data})

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

    # -- generation -------------------------------------------------------------------------

    def _error(self, api: str, status: int, message: str) -> web.Response:
        return _json(frames.error_body(api, status, message), status)

    async def _generation(self, request: web.Request, api: str) -> web.StreamResponse:
        """POST /api/chat, /api/generate, /v1/chat/completions."""
        raw = await request.read()
        if not raw:
            return self._error(api, 400, "missing request body")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._error(api, 400, _json_error_text(raw))
        if not isinstance(body, dict):
            kind = {list: "array", str: "string", bool: "bool"}.get(type(body), "number")
            return self._error(api, 400, f"json: cannot unmarshal {kind} into Go value")
        if not body.get("prompt" if api == "generate" else "messages"):
            return await self._load_request(api, body)
        self.recent.append(raw)
        stats = self.stats
        stats.in_flight += 1
        stats.requests_total += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            job = self._parse_job(api, body)
            return job if isinstance(job, web.Response) else await self._serve(request, job)
        finally:  # also on cancellation: client gone, or stop()
            stats.in_flight -= 1
            if task is not None:
                self._tasks.discard(task)

    def _check_model(self, api: str, body: dict[str, Any]) -> str | web.Response:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            return self._error(api, 400, "model is required")
        if name in self.models:
            return name
        if ":" not in name and f"{name}:latest" in self.models:
            return f"{name}:latest"
        return self._error(api, 404, f"model '{name}' not found")

    async def _load_request(self, api: str, body: dict[str, Any]) -> web.Response:
        """Empty messages/prompt: load (or, with keep_alive 0, unload) the model, as Ollama."""
        key = self._check_model(api, body)
        if isinstance(key, web.Response):
            return key
        if api == "openai":
            return self._error(api, 400, "messages is required")
        keep_alive = keep_alive_seconds(body.get("keep_alive"))
        if keep_alive != 0:
            await self._ensure_loaded(key)
        self._keep(key, keep_alive)
        reason = "unload" if keep_alive == 0 else "load"
        out: dict[str, Any] = {"model": body["model"], "created_at": rfc3339nano()}
        if api == "chat":
            msg = {"role": "assistant", "content": ""}
            return _json(out | {"message": msg, "done_reason": reason, "done": True})
        return _json(out | {"response": "", "done": True, "done_reason": reason})

    def _parse_job(self, api: str, body: dict[str, Any]) -> _Job | web.Response:
        key = self._check_model(api, body)
        if isinstance(key, web.Response):
            return key
        job = parse_job(api, body, key, f"chatcmpl-{self._ids + 1}")
        if isinstance(job, str):
            return self._error(api, 400, job)
        self._ids += 1
        return job

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
