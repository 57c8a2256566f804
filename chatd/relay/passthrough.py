"""The relay's side of the Ollama/OpenAI HTTP APIs: one request to one backend, as the API says.

:class:`Passthrough` works over a started :class:`~chatd.relay.generate.Relay` (its backends,
their generation pools, their deadlines):

* :meth:`Passthrough.stream` sends a streamed request (``/api/chat``, ``/api/generate``,
  ``/v1/chat/completions``, ``/v1/completions``) and hands each chunk of the answer to
  ``on_chunk`` as a JSON object, until the stream says it is done. The deadlines are those of
  a chat message (``[llm]``: first chunk, with cold loads known from ``/api/ps``; idle; total).
  One attempt: choosing the backend, the slot and retrying are the caller's.
* :meth:`Passthrough.call` sends a request whose answer comes whole (``/api/show``,
  ``/api/tags``, ``/api/ps``, ``/api/embed``, ``/v1/embeddings``, a load or unload) and
  returns its status and body, within a deadline and a size bound.

Failures leave both as :class:`~chatd.errors.UpstreamError` (the generation's mapping, in
:mod:`chatd.relay.failures`), with the backend's status and own error text in ``status`` and
``detail``: the API passes them on. Cancelling the awaiting task closes the connection at once,
which makes Ollama stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson

from chatd.errors import UpstreamError
from chatd.relay.conn import drain, read_capped
from chatd.relay.deadlines import Guard
from chatd.relay.failures import broken, connection_error, http_error, timeout_error
from chatd.relay.generate import Relay
from chatd.relay.wire import LineSplitter, ObjectDecoder

log = logging.getLogger("chatd.relay")

_ERROR_BODY_MAX = 64 * 1024
_DRAIN_AFTER_DONE = 0.1
_ACCEPT = {"ollama": "application/x-ndjson", "openai": "text/event-stream"}


class Passthrough:
    """Streams and calls of the HTTP APIs on the relay's backends (see the module)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._heads: dict[tuple[int, str, str], bytes] = {}

    def _head(self, backend: int, method: str, path: str) -> bytes:
        key = (backend, method, path)
        head = self._heads.get(key)
        if head is None:
            api = self.relay.backend(backend).api
            accept = _ACCEPT.get(api, "*/*") if method == "POST" else "application/json"
            head = self._heads[key] = self.relay.pool(backend).head(method, path, accept)
        return head

    async def stream(
        self,
        backend: int,
        path: str,
        body: dict[str, Any],
        model: str,
        on_chunk: Callable[[dict[str, Any]], None],
        on_notice: Callable[[str, str], None] | None = None,
    ) -> None:
        """POST ``body`` to ``path`` and pass each chunk of the streamed answer to
        ``on_chunk`` (an exception it raises propagates and aborts the request).

        Raises UpstreamTimeout, UpstreamUnavailable (no connection, 5xx, 429, a stream cut
        short) or UpstreamRejected (4xx, an error in the stream, a broken protocol); each
        carries ``first_token_sent`` (a chunk had reached ``on_chunk``).
        """
        relay = self.relay
        b = relay.backend(backend)
        llm = relay.llm
        first = await relay.first_limit(backend, model, on_notice)
        decoder = ObjectDecoder(sse=b.api != "ollama")
        data = orjson.dumps(body)
        pool = relay.pool(backend)
        guard = Guard(b, model, first, llm.idle_timeout, llm.total_timeout, pool.loop)
        b.requests += 1
        b.in_flight += 1
        clock = pool.loop.time
        try:
            with guard:
                async with await pool.request(self._head(backend, "POST", path), data) as resp:
                    if resp.status >= 300:
                        raw = b.redact(await read_capped(resp, _ERROR_BODY_MAX))
                        raise http_error(b.url, model, resp.status, raw)
                    split = LineSplitter()
                    eof = False
                    while not (eof or decoder.done):
                        chunk = await resp.readany()
                        if chunk:
                            lines, feed = split.feed(chunk), decoder.feed
                        else:
                            eof, lines, feed = True, split.end(), decoder.feed_last
                        got = False
                        for line in lines:
                            obj = feed(line)
                            if obj is None:
                                if decoder.done:
                                    break
                                continue
                            got = True
                            guard.sent = True
                            on_chunk(obj)
                            if decoder.done:
                                break
                        if got:
                            guard.last, guard.started = clock(), True
                    if not decoder.complete:
                        raise broken(b.url, "ended the stream")
                    guard.disarm()
                    await drain(resp, _DRAIN_AFTER_DONE)
            relay.mark_loaded(backend, model)
        except asyncio.CancelledError:
            b.cancelled += 1
            raise
        except UpstreamError as exc:
            b.errors[exc.code] = b.errors.get(exc.code, 0) + 1
            log.warning("relay %s%s model=%s failed: %s", b.url, path, model, exc.message)
            raise
        finally:
            b.in_flight -= 1

    async def call(
        self,
        backend: int,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        limit: float,
        max_bytes: int,
    ) -> tuple[int, bytes]:
        """``method path`` with a JSON ``body`` (or none): the status and the whole body.

        Any status comes back as is (the caller decides what a 404 means); a body over
        ``max_bytes``, no answer within ``limit`` seconds, or a broken connection raise
        UpstreamError.
        """
        relay = self.relay
        b = relay.backend(backend)
        data = orjson.dumps(body) if body is not None else None
        try:
            async with asyncio.timeout(limit):
                head = self._head(backend, method, path)
                async with await relay.pool(backend).request(head, data) as resp:
                    raw = await read_capped(resp, max_bytes + 1)
                    if len(raw) > max_bytes:
                        raise broken(b.url, f"sent an answer over {max_bytes} bytes to {path}")
                    if not resp.at_eof():
                        raise broken(b.url, f"cut its answer to {path}")
                    return resp.status, b.redact(raw)
        except TimeoutError:
            raise timeout_error(b.url, path, "total", limit) from None
        except UpstreamError:
            raise
        except (OSError, ValueError) as exc:
            err = connection_error(b, exc)
            if err is None:
                raise
            raise err from exc
