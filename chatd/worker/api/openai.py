"""OpenAI's API on a worker: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
``/v1/models/{id}``, ``/v1/embeddings``.

As :mod:`chatd.worker.api.ollama`, with errors written as ``{"error": {"message", "type",
"param", "code"}}``. The reply is always built by :class:`chatd.proto.openai.Encoder`, from an
Ollama backend's chunks as from an OpenAI one's, so every client gets the role first, the
finish chunk, the usage chunk when it asked, and ``[DONE]``.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson

from chatd.proto import openai, translate
from chatd.proto.httpapi import ApiError, json_body
from chatd.relay.wire import error_detail, keep_alive_value
from chatd.worker.api.common import (
    EMBED_MAX,
    Context,
    Exchange,
    embed_limit,
    parse_vectors,
    relay_reply,
    send,
)


class OpenAIApi:
    """The handlers of OpenAI's API (see the module)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._keep_alive = keep_alive_value(ctx.cfg.llm.keep_alive)

    async def models(self, x: Exchange) -> None:
        entries = await self.ctx.catalog.models()
        created = int(time.time())
        data = [openai.model_object(e["model"], created) for e in entries]
        body = orjson.dumps({"object": "list", "data": data})
        await send(x, 200, body, openai.CONTENT_TYPE_JSON)

    async def model(self, x: Exchange, name: str) -> None:
        x.model = name
        entries = await self.ctx.catalog.models()
        if not any(e["model"] in (name, f"{name}:latest") for e in entries):
            raise ApiError("not_found", f"The model '{name}' does not exist", param="model")
        body = orjson.dumps(openai.model_object(name, int(time.time())))
        await send(x, 200, body, openai.CONTENT_TYPE_JSON)

    async def chat(self, x: Exchange) -> None:
        await self._generation(x, openai.chat_request(json_body(x.request.body)))

    async def completions(self, x: Exchange) -> None:
        await self._generation(x, openai.completion_request(json_body(x.request.body)))

    async def _generation(self, x: Exchange, call: openai.Call) -> None:
        x.model = call.model
        prefix = "chatcmpl" if call.kind == "chat" else "cmpl"
        encoder = openai.Encoder(
            call.kind,
            f"{prefix}-{secrets.token_hex(12)}",
            int(time.time()),
            call.model,
            call.include_usage,
        )
        own_path = "/v1/chat/completions" if call.kind == "chat" else "/v1/completions"

        def plan(backend: int) -> tuple[str, dict[str, Any]]:
            if self.ctx.apis[backend] == "openai":
                body = {**call.body, "stream": True, "stream_options": {"include_usage": True}}
                return own_path, body
            if call.kind == "chat":
                body = translate.openai_chat_to_ollama(call.body, call.model)
                path = "/api/chat"
            else:
                body = translate.openai_completion_to_ollama(call.body, call.model)
                path = "/api/generate"
            body["keep_alive"] = self._keep_alive
            return path, body

        await relay_reply(
            self.ctx,
            x,
            model=call.model,
            stream=call.stream,
            content_type=openai.CONTENT_TYPE_SSE if call.stream else openai.CONTENT_TYPE_JSON,
            plan=plan,
            raw_api="",  # always re-encoded: the guarantees above hold for every backend
            encode=encoder.events,
            whole=lambda deltas: orjson.dumps(encoder.whole(deltas)),
            late_error=openai.error_event,
        )

    async def embeddings(self, x: Exchange) -> None:
        obj = json_body(x.request.body)
        x.model, texts, encoding = openai.embeddings_request(obj)

        def prepare(backend: int) -> tuple[str, dict[str, Any]]:
            if self.ctx.apis[backend] == "openai":
                return "/v1/embeddings", {**obj, "model": x.model, "encoding_format": "float"}
            body: dict[str, Any] = {"model": x.model, "input": texts}
            if obj.get("dimensions") is not None:
                body["dimensions"] = obj["dimensions"]
            return "/api/embed", body

        status, answer, backend = await self.ctx.relaying.call(
            x.key, x.model, prepare, x.timing, limit=embed_limit(self.ctx), max_bytes=EMBED_MAX
        )
        if status != 200:
            raise ApiError("backend", error_detail(answer), status=status)
        vectors, tokens = parse_vectors(self.ctx.apis[backend], answer)
        out = translate.openai_embed_answer(x.model, vectors, tokens, encoding)
        await send(x, 200, orjson.dumps(out), openai.CONTENT_TYPE_JSON)
