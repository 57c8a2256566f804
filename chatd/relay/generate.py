"""The relay: one streamed generation on one LLM backend (Ollama or OpenAI-compatible).

A worker owns one :class:`Relay`, built from ``[llm]`` and started inside its running loop
(after the fork: aiohttp sessions must not cross a fork). :meth:`Relay.generate` makes
exactly one attempt on one backend; choosing the backend, taking an LLM slot from the
master and retrying are the caller's job.

Deadlines, all counted from the moment the request is sent:

* first chunk: ``first_token_timeout`` when the model is known to be loaded on that backend;
  else Ollama's ``GET /api/ps`` is asked once, and a model that is not loaded gets
  ``load_timeout`` plus ``on_notice("model_loading", ...)``. An OpenAI-compatible backend
  cannot be asked, so an unknown model there gets ``load_timeout`` silently. Any chunk ends
  this phase, a thinking-only one too: the backend is then visibly generating.
* idle: ``idle_timeout`` between two chunks; total: ``total_timeout`` for the whole reply.
* connect: ``connect_timeout`` (each connect of the generation pool, and aiohttp's).

The generation's ``POST`` (and the ``GET /api/ps`` before it, so that both share one
connection) goes through :mod:`chatd.relay.pool`, a lean keep-alive client: aiohttp's request
machinery was the largest CPU cost per relayed message. The rare requests (health checks,
prewarm) keep using aiohttp.

A backend's ``api_key`` goes as ``Authorization: Bearer`` on every request to it (the pool's
and aiohttp's); it is never logged, and is cut out of the backend's error texts quoted in
errors, in case the backend echoes it.

"Known loaded" means that a prewarm, an ``/api/ps`` answer or a finished reply showed the
model loaded less than ``keep_alive`` (minus a margin) ago; a first-token timeout forgets it.

Every failure leaves :meth:`Relay.generate` as an :class:`~chatd.errors.UpstreamError`
whose ``message`` is one sentence for the client (see :mod:`chatd.relay.wire`) and which
carries ``first_token_sent`` (see :class:`chatd.errors.UpstreamError`). Cancelling the awaiting task
closes the HTTP connection at once, which makes Ollama stop generating.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence

import aiohttp
import orjson

from chatd.config import BackendConfig, LLMConfig
from chatd.errors import UpstreamError
from chatd.relay.backend import Backend, BackendStats, RelayStats, Reply
from chatd.relay.backends import Backends
from chatd.relay.conn import drain, read_capped
from chatd.relay.deadlines import Guard
from chatd.relay.failures import broken, http_error
from chatd.relay.wire import (
    LineSplitter,
    OllamaDecoder,
    OpenAIDecoder,
    error_detail,
    keep_alive_value,
    parse_keep_alive,
)

log = logging.getLogger("chatd.relay")

# Ollama starts its keep_alive timer when a request ends, a little before we see the end.
_KEEP_ALIVE_MARGIN = 5.0
_ERROR_BODY_MAX = 64 * 1024
_DRAIN_AFTER_DONE = 0.1
_PS_MAX = 1 << 20  # /api/ps lists the loaded models: a few KB
_JSON = {"Content-Type": "application/json"}


class Relay(Backends):
    """Streams chat generations from the configured LLM backends.

    ``backend`` arguments are indexes into ``backends`` (default: ``llm.backends``), a list
    that may grow (:class:`~chatd.relay.backends.Backends`: discovered addresses come and go;
    indexes never change meaning). Use from one event loop, between :meth:`start` and
    :meth:`close`.
    """

    def __init__(self, llm: LLMConfig, backends: Sequence[BackendConfig] | None = None) -> None:
        super().__init__(llm, llm.backends if backends is None else backends)
        hold = parse_keep_alive(llm.keep_alive)
        self._ollama_hold = math.inf if hold is None else max(0.0, hold - _KEEP_ALIVE_MARGIN)
        self._keep_alive = keep_alive_value(llm.keep_alive)

    @property
    def llm(self) -> LLMConfig:
        """The ``[llm]`` settings this relay was built from."""
        return self._llm

    async def first_limit(
        self, backend: int, model: str, on_notice: Callable[[str, str], None] | None = None
    ) -> float:
        """The first-chunk deadline for ``model`` on ``backend`` (see the module)."""
        return await self._first_limit(self._backends[backend], model, on_notice)

    def mark_loaded(self, backend: int, model: str) -> None:
        """Record that ``model`` answered on ``backend`` (so it counts as loaded)."""
        self._mark_loaded(self._backends[backend], model)

    def statistics(self) -> RelayStats:
        """Counters per backend, for this worker."""
        now = time.monotonic()
        return RelayStats(
            tuple(
                BackendStats(
                    *(b.url, b.api, b.requests, b.tokens, b.cancelled, dict(b.errors)),
                    *(b.in_flight, tuple(m for m, t in b.loaded.items() if t > now)),
                )
                for b in self._backends
            )
        )

    async def check_health(self, backend: int) -> bool:
        """Whether the backend answers its cheapest endpoint within ``connect_timeout``.

        Ollama: ``GET /api/version``; OpenAI-compatible: ``GET /v1/models``, else
        ``GET /health`` (llama.cpp). Never raises, except CancelledError.
        """
        b = self._backends[backend]
        paths = ("/api/version",) if b.api == "ollama" else ("/v1/models", "/health")
        for path in paths:
            if await self._get(b, path, self._llm.connect_timeout) is not None:
                return True
        return False

    async def prewarm(self, backend: int, model: str) -> None:
        """Load ``model`` on the backend and mark it loaded; logs failures, never raises.

        Ollama: ``POST /api/chat {"model", "messages": [], "keep_alive"}``, which answers
        ``done_reason: "load"`` once the model is in memory (bounded by ``load_timeout``).
        OpenAI-compatible: ``GET /v1/models`` (such servers load their model at start).
        """
        b = self._backends[backend]
        session = self._session(b)
        try:
            async with asyncio.timeout(self._llm.load_timeout):
                if b.api == "ollama":
                    body = orjson.dumps(
                        {"model": model, "messages": [], "keep_alive": self._keep_alive}
                    )
                    async with session.post(b.chat_url, data=body, headers=_JSON) as resp:
                        data = await resp.read()
                    if resp.status != 200:
                        detail = error_detail(b.redact(data))
                        raise ValueError(f"HTTP {resp.status}: {detail}")
                elif await self._get(b, "/v1/models", self._llm.load_timeout) is None:
                    raise ValueError("GET /v1/models failed")
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            why = str(exc) or type(exc).__name__
            log.warning("prewarm of %s on %s failed: %s", model, b.url, why)
            return
        self._mark_loaded(b, model)
        log.info("prewarm: %s is loaded on %s", model, b.url)

    async def generate(
        self,
        backend: int,
        model: str,
        messages: list[dict[str, str]],
        on_token: Callable[[str], None],
        on_notice: Callable[[str, str], None] | None = None,
    ) -> Reply:
        """Stream one reply from one backend: one attempt, no retry.

        ``on_token(text)`` is called synchronously for each non-empty piece as it arrives,
        but for the pieces of the read that ends the reply (its done chunk, and what came
        with it in one read): those are only in the returned :class:`Reply`, whose final frame
        carries them a commit later (the protocol's tokens are a prefix of the reply). So a
        backend that outpaces the loop costs the client no token frame that the reply would
        repeat. An exception ``on_token`` raises propagates unchanged and aborts the request.
        ``on_notice(code, message)`` gets ``"model_loading"`` when the first-token deadline
        is stretched for a model that is being loaded.

        Raises:
            UpstreamTimeout: the first-token, idle or total deadline passed.
            UpstreamUnavailable: no connection, HTTP 5xx or 429, or a truncated stream.
            UpstreamRejected: HTTP 4xx, an error inside the stream, a protocol violation.
            asyncio.CancelledError: the caller cancelled; the connection is closed already.

        Every UpstreamError raised carries ``first_token_sent``: reply text had reached
        the caller.
        """
        b = self._backends[backend]
        pool = self._pool(b)
        llm = self._llm
        first_limit = await self._first_limit(b, model, on_notice)
        if b.api == "ollama":
            decoder: OllamaDecoder | OpenAIDecoder = OllamaDecoder()
            extra: tuple[str, object] = ("keep_alive", self._keep_alive)
        else:
            decoder = OpenAIDecoder()
            extra = ("stream_options", {"include_usage": True})
        body = orjson.dumps(
            {"model": model, "messages": messages, "stream": True, extra[0]: extra[1]}
        )
        clock = pool.loop.time
        parts: list[str] = []
        pieces = tokens = 0
        given = 0  # parts[:given] went to on_token (those after: the reply's last read)
        outcome = failure = ""
        b.requests += 1
        b.in_flight += 1
        guard = Guard(b, model, first_limit, llm.idle_timeout, llm.total_timeout, pool.loop)
        t0 = first_at = guard.last
        try:
            with guard:
                async with await pool.request(b.chat_head, body) as resp:
                    if resp.status >= 300:
                        body = b.redact(await read_capped(resp, _ERROR_BODY_MAX))
                        raise http_error(b.url, model, resp.status, body)
                    split = LineSplitter()
                    read, feed, decode = resp.readany, split.feed, decoder.feed
                    # The hot loop: per read one split() and one clock call, per line one
                    # orjson.loads(); nothing else is allocated per token. As wire's
                    # decode_body: the line left at EOF goes through feed_last.
                    eof = False
                    while not (eof or decoder.done):
                        data = await read()
                        if data:
                            lines = feed(data)
                        else:
                            eof, lines, decode = True, split.end(), decoder.feed_last
                        chunk = False
                        try:
                            for line in lines:
                                piece = decode(line)
                                if piece is None:
                                    continue
                                chunk = True
                                if piece:
                                    if not pieces:
                                        first_at = clock()
                                    pieces += 1
                                    parts.append(piece)
                                if decoder.done:
                                    break
                        finally:  # also before an error line's exception leaves
                            if given < len(parts) and not decoder.done:
                                guard.sent = True
                                for piece in parts[given:]:
                                    on_token(piece)
                                given = len(parts)
                        if chunk:
                            guard.last, guard.started = clock(), True
                    if not decoder.complete:
                        raise broken(b.url, "ended the stream")
                    guard.disarm()
                    await drain(resp, _DRAIN_AFTER_DONE)
            tokens = pieces if decoder.eval_count is None else decoder.eval_count
            b.tokens += tokens
            self._mark_loaded(b, model)
            outcome = decoder.done_reason
            end = clock()
            return Reply(
                text="".join(parts),
                done_reason=outcome,
                tokens=tokens,
                ttft_ms=((first_at if pieces else end) - t0) * 1000.0,
                total_ms=(end - t0) * 1000.0,
            )
        except asyncio.CancelledError:
            outcome = "cancelled"
            b.cancelled += 1
            # Cancelled after the reply's last read (while the rest of the body drained): the
            # caller stores what it was given as a cancelled reply, so it gets those pieces.
            for piece in parts[given:]:
                on_token(piece)
            raise
        except UpstreamError as exc:
            outcome, failure = exc.code, exc.message
            b.errors[exc.code] = b.errors.get(exc.code, 0) + 1
            raise
        finally:
            b.in_flight -= 1
            end = clock()
            # A failure is a WARNING; a success only DEBUG: at INFO, one line per message
            # cost ~6% of a worker's CPU at 1,000 msg/s (py-spy), and at that rate journald's
            # default rate limit (10,000 lines per 30 s) would drop the daemon's other lines.
            log.log(
                logging.WARNING if failure else logging.DEBUG,
                "relay backend=%s model=%s outcome=%s tokens=%d ttft_ms=%.1f total_ms=%.1f%s",
                b.url,
                model,
                outcome or "error",  # "error": an exception that is not an UpstreamError
                tokens if outcome in ("stop", "length") else pieces,
                ((first_at if pieces else end) - t0) * 1000.0,
                (end - t0) * 1000.0,
                f" error={failure!r}" if failure else "",
            )

    # -- helpers ----------------------------------------------------------------------

    def _mark_loaded(self, b: Backend, model: str) -> None:
        hold = self._ollama_hold if b.api == "ollama" else math.inf
        if hold > 0:
            b.loaded[model] = time.monotonic() + hold

    async def _first_limit(
        self, b: Backend, model: str, on_notice: Callable[[str, str], None] | None
    ) -> float:
        """The first-token deadline for ``model`` on ``b`` (asks /api/ps when in doubt)."""
        if b.loaded.get(model, 0.0) > time.monotonic():
            return self._llm.first_token_timeout
        if b.api != "ollama":
            return self._llm.load_timeout
        loaded = await self._ps(b, model)
        if loaded:
            self._mark_loaded(b, model)
        if loaded is not False:  # loaded, or /api/ps failed: the request will tell
            return self._llm.first_token_timeout
        if on_notice is not None:
            on_notice(
                "model_loading",
                f"The model {model} is being loaded on {b.url}; the first reply can take "
                f"up to {self._llm.load_timeout:g} s.",
            )
        return self._llm.load_timeout

    async def _get(self, b: Backend, path: str, limit: float) -> bytes | None:
        """GET ``path`` within ``limit`` seconds: the body on HTTP 200, else None."""
        try:
            async with asyncio.timeout(limit), self._session(b).get(b.url + path) as resp:
                data = await resp.read()
                return data if resp.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    async def _ps_body(self, b: Backend) -> bytes | None:
        """``GET /api/ps`` within ``connect_timeout``: the body on HTTP 200, else None.

        Sent on the generation pool, not aiohttp: the generation that follows then reuses
        the connection, one connect fewer and one connection per backend rather than two.
        """
        pool = self._pool(b)
        try:
            async with asyncio.timeout(self._llm.connect_timeout):
                head = pool.head("GET", "/api/ps", "application/json")
                async with await pool.request(head) as resp:
                    data = await read_capped(resp, _PS_MAX)
                    return data if resp.status == 200 and resp.at_eof() else None
        except (OSError, TimeoutError):
            return None

    async def _ps(self, b: Backend, model: str) -> bool | None:
        """Ask Ollama's ``GET /api/ps`` whether ``model`` is loaded; None if it cannot say."""
        data = await self._ps_body(b)
        if data is None:
            return None
        try:
            entries = orjson.loads(data)["models"] or []
            names = {e.get(k) for e in entries for k in ("name", "model")}
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return None
        return model in names or f"{model}:latest" in names  # "llama3" is listed as ":latest"
