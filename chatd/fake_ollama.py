"""A faithful stand-in for an Ollama server, for tests, demos and load tests.

Speaks Ollama's wire format (notes: ollama/ollama server/routes.go, v0.33): NDJSON streaming with
headers sent only once the first token is ready, ``{"error": ...}`` bodies with Ollama's status
codes, the preload/unload protocol, and the OpenAI-compatible SSE endpoint. The official
``ollama`` Python client works against it unchanged.

Replies are deterministic: see :func:`expected_reply`. Behaviour changes at run time through
``POST /_fake/config`` (or :meth:`FakeOllama.configure` on the server's own loop), and
``GET /_fake/stats`` reports generation requests in flight.

This module deliberately imports nothing from the rest of chatd: a stand-in must not share code
(and so bugs) with what it stands in for.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import math
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web

from chatd.fake_ollama_wire import (  # noqa: F401 - re-exported for callers
    _CONTEXT_LENGTH,
    _DEFAULT_KEEP_ALIVE_S,
    _MODEL_SIZE,
    _MS_KNOBS,
    _NDJSON_CT,
    _NL,
    _RUN_ERROR,
    _SSE_CT,
    _SSE_DONE,
    BUSY_TEXT,
    DEFAULT_MODEL,
    MAX_WORD_CHARS,
    OLLAMA_VERSION,
    RECENT_REQUESTS,
    FakeConfig,
    FakeStats,
    _Job,
    _json,
    _json_error_text,
    _model_info,
    _status_text,
    _text_of,
    _Timing,
    expected_reply,
    keep_alive_seconds,
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
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_REQUESTS)
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
        """The bodies of the last generation requests, oldest first (what a gateway sent)."""
        return _json({"requests": list(self.recent)})

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

    @staticmethod
    def _error_body(api: str, status: int, message: str) -> dict[str, Any]:
        if api != "openai":
            return {"error": message}
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}

    def _error(self, api: str, status: int, message: str) -> web.Response:
        return _json(self._error_body(api, status, message), status)

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
        self.recent.append(body)
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
        if api == "generate":
            text = _text_of(body.get("prompt"))
            count = len(text.split()) + len(_text_of(body.get("system")).split())
        else:
            msgs = body["messages"]
            if not isinstance(msgs, list):
                return self._error(api, 400, "json: cannot unmarshal messages into []api.Message")
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
        self._ids += 1
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
            cid=f"chatcmpl-{self._ids}",
            created=int(time.time()),
        )

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
                resp = await self._stream(request, job, toks, reason, timing, cfg.token_ms, fail)
            else:
                await asyncio.sleep(max(0, n - 1) * cfg.token_ms / 1000)
                resp = _json(self._whole(job, toks, reason, timing))
        self._keep(job.key, job.keep_alive)
        return resp

    async def _stream(
        self,
        request: web.Request,
        job: _Job,
        toks: Sequence[str],
        reason: str,
        timing: _Timing,
        token_ms: float,
        fail: int | None,
    ) -> web.StreamResponse:
        """Token i is written at first-token time + i * token_ms. Natively the last token rides
        on the done chunk; OpenAI gets every token as a chunk, then the finish chunk, the usage
        chunk if asked, and [DONE]. With ``fail`` = k: k tokens, then an error line, no done."""
        native = job.api != "openai"
        body = toks[:fail] if fail is not None else toks[:-1] if native else toks

        def tail() -> bytes:  # built when due: the metrics need the end time
            if fail is not None:
                return self._error_frame(job)
            if native:
                m = self._metrics(job, len(toks), timing)
                return orjson.dumps(
                    self._final(job, toks[-1] if toks else "", reason, m), option=_NL
                )
            return self._openai_tail(job, reason, len(toks))

        resp = web.StreamResponse(headers=_NDJSON_CT if native else _SSE_CT)
        await resp.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # client gone: nothing left to do
            if token_ms <= 0:  # zero-delay load tests: one write for the whole reply
                ts = rfc3339nano()
                await resp.write(b"".join([self._chunk(job, t, ts) for t in body] + [tail()]))
            else:
                loop = asyncio.get_running_loop()
                start, step = loop.time(), token_ms / 1000
                for i, tok in enumerate(body):
                    if i:  # absolute schedule, so write costs do not add up to drift
                        await asyncio.sleep(start + i * step - loop.time())
                    await resp.write(self._chunk(job, tok, rfc3339nano()))
                if body and (native or fail is not None):  # tail stands for one more token
                    await asyncio.sleep(start + len(body) * step - loop.time())
                await resp.write(tail())
            await resp.write_eof()
        return resp

    def _chunk(self, job: _Job, tok: str, ts: str) -> bytes:
        if job.api == "chat":
            msg = {"role": "assistant", "content": tok}
            c = {"model": job.model, "created_at": ts, "message": msg, "done": False}
            return orjson.dumps(c, option=_NL)
        if job.api == "generate":
            c = {"model": job.model, "created_at": ts, "response": tok, "done": False}
            return orjson.dumps(c, option=_NL)
        return self._sse(self._openai(job, {"role": "assistant", "content": tok}, None))

    def _final(self, job: _Job, content: str, reason: str, m: dict[str, int]) -> dict[str, Any]:
        head: dict[str, Any] = {"model": job.model, "created_at": rfc3339nano()}
        if job.api == "chat":  # field order as Ollama's Go structs
            msg = {"role": "assistant", "content": content}
            return head | {"message": msg, "done_reason": reason, "done": True} | m
        return head | {"response": content, "done": True, "done_reason": reason} | m

    def _whole(
        self, job: _Job, toks: Sequence[str], reason: str, timing: _Timing
    ) -> dict[str, Any]:
        text = "".join(toks)
        if job.api != "openai":
            return self._final(job, text, reason, self._metrics(job, len(toks), timing))
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        out = self._openai(job, None, reason) | {"object": "chat.completion"}
        return out | {"choices": [choice | {"finish_reason": reason}]} | self._usage(job, len(toks))

    @staticmethod
    def _metrics(job: _Job, n: int, timing: _Timing) -> dict[str, int]:
        t0, load_ns, t_prefill, t_first = timing
        now = time.perf_counter_ns()
        # Go's omitempty drops zeros; a real run never takes 0 ns, so never report 0.
        return {
            "total_duration": max(1, now - t0),
            "load_duration": max(1, load_ns),
            "prompt_eval_count": job.prompt_count,
            "prompt_eval_duration": max(1, t_first - t_prefill),
            "eval_count": n,
            "eval_duration": max(1, now - t_first),
        }

    @staticmethod
    def _openai(job: _Job, delta: dict[str, str] | None, finish: str | None) -> dict[str, Any]:
        out = {"id": job.cid, "object": "chat.completion.chunk", "created": job.created}
        out |= {"model": job.model, "system_fingerprint": "fp_ollama"}
        if delta is None:
            return out
        return out | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    @staticmethod
    def _usage(job: _Job, n: int) -> dict[str, Any]:
        p = job.prompt_count
        return {"usage": {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}}

    @staticmethod
    def _sse(payload: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    def _openai_tail(self, job: _Job, reason: str, n: int) -> bytes:
        out = self._sse(self._openai(job, {}, reason))
        if job.include_usage:
            out += self._sse(self._openai(job, None, None) | {"choices": []} | self._usage(job, n))
        return out + _SSE_DONE

    def _error_frame(self, job: _Job) -> bytes:
        err = self._error_body(job.api, 500, _RUN_ERROR)
        # OpenAI: no [DONE] after it, the stream is cut short as on any upstream error.
        return self._sse(err) if job.api == "openai" else orjson.dumps(err, option=_NL)


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
