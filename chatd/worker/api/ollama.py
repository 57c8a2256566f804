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
from typing import Any

import orjson

from chatd.errors import UpstreamError
from chatd.proto import ollama, translate
from chatd.proto.httpapi import ApiError, Delta, json_body, model_of
from chatd.relay.wire import error_detail, keep_alive_value
from chatd.worker.api.common import Context, Exchange, now_rfc3339, relay_reply, send

_LOAD_MAX = 1024 * 1024  # a load's answer is one small object
EMBED_MAX = 256 * 1024 * 1024
"""Bytes of an embeddings answer accepted from a backend (a 1 MiB request of short texts can
ask for tens of thousands of vectors)."""


class OllamaApi:
    """The handlers of Ollama's API (see the module)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._keep_alive = keep_alive_value(ctx.cfg.llm.keep_alive)

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
        """A load (or unload) of the model on every healthy Ollama backend, without a slot:
        the first success is the answer (else the first backend's error). An OpenAI backend
        has nothing to load: its answer is made here."""
        path = "/api/chat" if call.kind == "chat" else "/api/generate"
        body = {**call.body, "stream": False}
        backends = [i for i in self.ctx.catalog.backends() if self.ctx.apis[i] == "ollama"]
        limit = self.ctx.cfg.llm.load_timeout
        answers = await asyncio.gather(
            *(
                self.ctx.passthrough.call(i, "POST", path, body, limit=limit, max_bytes=_LOAD_MAX)
                for i in backends
            ),
            return_exceptions=True,
        )
        failure: ApiError | None = None
        for answer in answers:
            if isinstance(answer, UpstreamError):
                failure = failure or ApiError("unavailable", answer.message)
            elif isinstance(answer, BaseException):
                raise answer
            elif answer[0] == 200:
                await self._answer_load(x, call, answer[1])
                return
            else:
                failure = failure or ApiError("backend", error_detail(answer[1]), status=answer[0])
        if failure is not None:
            raise failure
        done: dict[str, Any] = {"model": call.model, "created_at": now_rfc3339()}
        if call.kind == "chat":
            done["message"] = {"role": "assistant", "content": ""}
        else:
            done["response"] = ""
        done |= {"done_reason": "unload" if call.unload else "load", "done": True}
        await self._answer_load(x, call, orjson.dumps(done))

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


def embed_limit(ctx: Context) -> float:
    """Seconds an embeddings request may take: a load, then the work."""
    return ctx.cfg.llm.load_timeout + ctx.cfg.llm.total_timeout


def parse_vectors(api: str, answer: bytes) -> tuple[list[Any], int | None]:
    """The vectors of a backend's embeddings answer (502 when it has none)."""
    try:
        obj = orjson.loads(answer)
        if type(obj) is not dict:
            raise ValueError("not an object")
        return translate.vectors_of(api, obj)
    except (orjson.JSONDecodeError, ValueError) as exc:
        raise ApiError(
            "unavailable", f"the backend's embeddings answer is unusable: {exc}"
        ) from exc
