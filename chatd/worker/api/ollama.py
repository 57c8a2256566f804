"""Ollama's API on a worker: ``/``, ``/api/version``, ``/api/tags``, ``/api/ps``,
``/api/show``, ``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings``.

Each handler answers one request of :class:`~chatd.worker.api.common.Exchange` (the router
has authenticated it and named its key) or raises :class:`~chatd.proto.httpapi.ApiError`,
which the router writes as ``{"error": "..."}``. Generations take a slot
(:mod:`~chatd.worker.api.relaying`); a load or unload (no messages, an empty prompt) and the
model list, ps, show and version take none. Against an OpenAI-compatible backend the request
and the chunks are translated (:mod:`chatd.proto.translate`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from chatd.errors import UpstreamError
from chatd.proto import ollama, translate
from chatd.proto.httpapi import ApiError, Delta, json_body, model_of
from chatd.relay.wire import error_detail, keep_alive_value
from chatd.worker.api.common import (
    EMBED_MAX,
    Context,
    Exchange,
    embed_limit,
    now_rfc3339,
    parse_vectors,
    relay_reply,
    send,
)

log = logging.getLogger("chatd.api")

_LOAD_MAX = 1024 * 1024  # a load's answer is one small object


class OllamaApi:
    """The handlers of Ollama's API (see the module)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._keep_alive = keep_alive_value(ctx.cfg.llm.keep_alive)
        self._background: set[asyncio.Future[tuple[int, bytes]]] = set()  # loads elsewhere

    async def root(self, x: Exchange) -> None:
        """``GET /`` and ``HEAD /``: Ollama's exact answer (scripts compare the body)."""
        await send(x, 200, ollama.RUNNING, "text/plain; charset=utf-8")

    async def version(self, x: Exchange) -> None:
        version = await self.ctx.catalog.version()
        await send(x, 200, orjson.dumps({"version": version}), ollama.CONTENT_TYPE_JSON)

    async def tags(self, x: Exchange) -> None:
        models = await self.ctx.catalog.models()
        await send(x, 200, orjson.dumps({"models": models}), ollama.CONTENT_TYPE_JSON)

    async def ps(self, x: Exchange) -> None:
        models = await self.ctx.catalog.running()
        await send(x, 200, orjson.dumps({"models": models}), ollama.CONTENT_TYPE_JSON)

    async def show(self, x: Exchange) -> None:
        obj = json_body(x.request.body)
        x.model = model_of(obj, legacy_name=True)
        body = await self.ctx.catalog.show(x.model, {**obj, "model": x.model})
        await send(x, 200, body, ollama.CONTENT_TYPE_JSON)

    # -- generations ------------------------------------------------------------------------

    async def chat(self, x: Exchange) -> None:
        await self._generation(x, ollama.chat_request(json_body(x.request.body)))

    async def generate(self, x: Exchange) -> None:
        await self._generation(x, ollama.generate_request(json_body(x.request.body)))

    async def _generation(self, x: Exchange, call: ollama.Call) -> None:
        x.model = call.model
        if call.load:
            await self._load(x, call)
            return
        encoder = ollama.Encoder(call.kind, call.model)
        path = "/api/chat" if call.kind == "chat" else "/api/generate"

        def plan(backend: int) -> tuple[str, dict[str, Any]]:
            if self.ctx.apis[backend] == "ollama":
                body = {**call.body, "stream": True}
                body.setdefault("keep_alive", self._keep_alive)
                return path, body
            if call.kind == "chat":
                return "/v1/chat/completions", translate.ollama_chat_to_openai(
                    call.body, call.model
                )
            return translate.ollama_generate_to_openai(call.body, call.model)

        def whole(deltas: list[Delta]) -> bytes:
            agg = ollama.Aggregate(encoder)
            for d in deltas:
                agg.feed(d)
            return orjson.dumps(agg.result(deltas[-1], now_rfc3339()))

        await relay_reply(
            self.ctx,
            x,
            model=call.model,
            stream=call.stream,
            content_type=ollama.CONTENT_TYPE_NDJSON if call.stream else ollama.CONTENT_TYPE_JSON,
            plan=plan,
            raw_api="ollama",
            encode=lambda d: ollama.line(encoder.chunk(d, now_rfc3339())),
            whole=whole,
            late_error=lambda err: ollama.error_line(err.message),
        )

    async def _load(self, x: Exchange, call: ollama.Call) -> None:
        """A load (or unload) without a generation slot, sent to every healthy Ollama backend
        that may have the model (one whose fresh model list lacks it is left out), with
        ``[llm] keep_alive`` unless the client set one. The first success is the answer (the
        other backends go on loading in the background: a cut load is a wasted one); else
        the first failure. An OpenAI backend has nothing to load: its answer is made here."""
        path = "/api/chat" if call.kind == "chat" else "/api/generate"
        body = {**call.body, "stream": False}
        body.setdefault("keep_alive", self._keep_alive)
        catalog = self.ctx.catalog
        backends = [
            i
            for i in catalog.backends()
            if self.ctx.apis[i] == "ollama" and not catalog.lacks(i, call.model)
        ]
        limit = self.ctx.cfg.llm.load_timeout
        pending = {
            asyncio.ensure_future(
                self.ctx.passthrough.call(i, "POST", path, body, limit=limit, max_bytes=_LOAD_MAX)
            )
            for i in backends
        }
        failure: ApiError | None = None
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if isinstance(exc, UpstreamError):
                        failure = failure or ApiError("unavailable", exc.message)
                    elif exc is not None:
                        raise exc
                    elif task.result()[0] == 200:
                        await self._answer_load(x, call, task.result()[1])
                        return
                    else:
                        status, answer = task.result()
                        failure = failure or ApiError(
                            "backend", error_detail(answer), status=status
                        )
        finally:
            for task in pending:  # loading elsewhere goes on; its outcome is only logged
                self._background.add(task)
                task.add_done_callback(self._loaded)
        if failure is not None:
            raise failure
        done_chunk: dict[str, Any] = {"model": call.model, "created_at": now_rfc3339()}
        if call.kind == "chat":
            done_chunk["message"] = {"role": "assistant", "content": ""}
        else:
            done_chunk["response"] = ""
        done_chunk |= {"done_reason": "unload" if call.unload else "load", "done": True}
        await self._answer_load(x, call, orjson.dumps(done_chunk))

    def _loaded(self, task: asyncio.Future[tuple[int, bytes]]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("a load on another backend failed: %s", task.exception())

    async def _answer_load(self, x: Exchange, call: ollama.Call, body: bytes) -> None:
        if call.stream:  # one NDJSON line, as Ollama streams it
            await send(x, 200, body.rstrip(b"\n") + b"\n", ollama.CONTENT_TYPE_NDJSON)
        else:
            await send(x, 200, body, ollama.CONTENT_TYPE_JSON)

    # -- embeddings -------------------------------------------------------------------------

    async def embed(self, x: Exchange) -> None:
        await self._embed(x, legacy=False)

    async def embeddings(self, x: Exchange) -> None:
        await self._embed(x, legacy=True)

    async def _embed(self, x: Exchange, legacy: bool) -> None:
        obj = json_body(x.request.body)
        x.model, texts = ollama.embed_request(obj, legacy)
        path = "/api/embeddings" if legacy else "/api/embed"

        def prepare(backend: int) -> tuple[str, dict[str, Any]]:
            if self.ctx.apis[backend] == "ollama":
                return path, {**obj, "model": x.model}
            body: dict[str, Any] = {"model": x.model, "input": texts}
            if obj.get("dimensions") is not None:
                body["dimensions"] = obj["dimensions"]
            return "/v1/embeddings", body

        status, answer, backend = await self.ctx.relaying.call(
            x.key, x.model, prepare, x.timing, limit=embed_limit(self.ctx), max_bytes=EMBED_MAX
        )
        api = self.ctx.apis[backend]
        if status != 200:
            raise ApiError("backend", error_detail(answer), status=status)
        if api == "ollama":
            await send(x, 200, answer, ollama.CONTENT_TYPE_JSON)
            return
        vectors, tokens = parse_vectors(api, answer)
        if legacy:
            out: dict[str, Any] = {"embedding": vectors[0] if vectors else []}
        else:
            out = translate.ollama_embed_answer(x.model, vectors, tokens)
        await send(x, 200, orjson.dumps(out), ollama.CONTENT_TYPE_JSON)
