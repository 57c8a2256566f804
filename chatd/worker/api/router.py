"""The entry of the APIs: a request's route, its authentication, its key, its figures and its
log line.

:meth:`ApiRouter.handle` takes every plain HTTP request of the worker's port that belongs to
an API (``GET``/``HEAD /`` and ``/api/...`` for Ollama's, ``/v1/...`` for OpenAI's; whichever
``[api]`` enables) and:

1. finds the route (an unknown path is a 404, a wrong method a 405 with ``Allow``, both in
   the API's error shape; Ollama's model management endpoints a 403: this is a gateway);
2. with ``[auth] tokens``, refuses a request without a valid token (401, ``WWW-Authenticate``;
   ``/`` stays open: it is Ollama's health check, which the ``ollama`` CLI sends bare);
3. names the client's key (:mod:`~chatd.worker.api.identity`) and calls the handler;
4. writes an :class:`~chatd.proto.httpapi.ApiError` the handler raised in the API's shape,
   with ``Retry-After`` where it has one (and ``x-should-retry``, which the openai SDK
   obeys); any other exception is left to the connection (500 with a log reference);
5. counts the request (:class:`ApiStats`) and logs one line: method, path, key, model,
   status, queue wait, time to the first chunk, duration. Never the token, never the body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from chatd.proto.httpapi import ApiError, ollama_error, openai_error
from chatd.stats import Histogram
from chatd.worker.api.common import Context, Exchange, send
from chatd.worker.api.identity import Identity
from chatd.worker.api.ollama import OllamaApi
from chatd.worker.api.openai import OpenAIApi
from chatd.worker.httpconn import Request, Responder, single

log = logging.getLogger("chatd.access")

Handler = Callable[[Exchange], Awaitable[None]]

_MANAGEMENT = frozenset(
    ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs")
)


@dataclass(slots=True)
class ApiStats:
    """This worker's API figures, reported to the master every second (cumulative)."""

    requests: dict[tuple[str, str, int], int] = field(default_factory=dict)  # (api, path, status)
    queue_wait: dict[str, Histogram] = field(default_factory=dict)  # by api
    ttft: dict[str, Histogram] = field(default_factory=dict)  # by api
    in_flight: int = 0

    def record(self, x: Exchange) -> None:
        k = (x.api, x.endpoint, x.status)
        self.requests[k] = self.requests.get(k, 0) + 1
        if x.timing.backend >= 0:
            self.queue_wait.setdefault(x.api, Histogram()).observe(x.timing.queued * 1000.0)
        if x.timing.first_chunk is not None:
            self.ttft.setdefault(x.api, Histogram()).observe(x.timing.first_chunk * 1000.0)

    def report(self) -> dict[str, object]:
        """The ``http`` part of the worker's ``stats`` message."""
        return {
            "requests": [[a, p, s, n] for (a, p, s), n in self.requests.items()],
            "queue_wait": {a: _buckets(h) for a, h in self.queue_wait.items()},
            "ttft": {a: _buckets(h) for a, h in self.ttft.items()},
            "in_flight": self.in_flight,
        }


def _buckets(h: Histogram) -> dict[str, object]:
    return {"buckets": sorted(h.counts.items()), "sum_ms": h.total_ms}


class ApiRouter:
    """Routes, authenticates, counts and logs the API requests (see the module)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.identity = Identity(ctx.cfg)
        self.stats = ApiStats()
        self._idle = asyncio.Event()
        self._idle.set()
        o, v = OllamaApi(ctx), OpenAIApi(ctx)
        self._routes: dict[str, tuple[str, dict[str, Handler]]] = {}
        if ctx.cfg.api.ollama:
            routes: dict[str, dict[str, Handler]] = {
                "/": {"GET": o.root, "HEAD": o.root},
                "/api/version": {"GET": o.version, "HEAD": o.version},
                "/api/tags": {"GET": o.tags, "HEAD": o.tags},
                "/api/ps": {"GET": o.ps},
                "/api/show": {"POST": o.show},
                "/api/chat": {"POST": o.chat},
                "/api/generate": {"POST": o.generate},
                "/api/embed": {"POST": o.embed},
                "/api/embeddings": {"POST": o.embeddings},
            }
            for path, methods in routes.items():
                self._routes[path] = ("ollama", methods)
        self._openai = v if ctx.cfg.api.openai else None
        if self._openai is not None:
            routes = {
                "/v1/chat/completions": {"POST": v.chat},
                "/v1/completions": {"POST": v.completions},
                "/v1/embeddings": {"POST": v.embeddings},
                "/v1/models": {"GET": v.models},
            }
            for path, methods in routes.items():
                self._routes[path] = ("openai", methods)

    def claims(self, path: str) -> bool:
        """Whether ``path`` belongs to an enabled API."""
        if path in self._routes:
            return True
        if path.startswith("/api/"):
            return self.ctx.cfg.api.ollama
        return path.startswith("/v1/") and self._openai is not None

    async def wait_idle(self) -> None:
        """Until no API request is being answered (a drain bounds it)."""
        await self._idle.wait()

    async def handle(self, request: Request, responder: Responder, path: str) -> None:
        """Answer one API request (see the module)."""
        api = "openai" if path.startswith("/v1/") else "ollama"
        route = self._routes.get(path)
        endpoint = path if route is not None else "other"
        if route is None and path.startswith("/v1/models/"):
            endpoint = "/v1/models/{id}"
        x = Exchange(request, responder, api, "", endpoint)
        self.stats.in_flight += 1
        self._idle.clear()
        try:
            await self._serve(x, path, route)
        except ApiError as err:
            if not responder.started:
                await self._error(x, err)
        except asyncio.CancelledError:
            # The client left before the answer was whole (nginx's 499, in the log and the
            # figures, even when the head had gone out with a 200).
            x.status = 499
            raise
        except Exception:
            x.status = x.status or 500  # the connection answers it, with a log reference
            raise
        finally:
            self.stats.in_flight -= 1
            if not self.stats.in_flight:
                self._idle.set()
            self.stats.record(x)
            if self.ctx.cfg.api.access_log:
                self._log(x)

    async def refuse(
        self, request: Request, responder: Responder, path: str, status: int, text: str
    ) -> None:
        """A request of the APIs refused before it was read whole (413 body too large, 431,
        400 malformed): answered in its API's shape, counted and logged like the others."""
        api = "openai" if path.startswith("/v1/") else "ollama"
        endpoint = path if path in self._routes else "other"
        x = Exchange(request, responder, api, "-", endpoint)
        kind = {413: "too_large", 431: "bad_request", 400: "bad_request"}.get(status, "internal")
        try:
            await self._error(x, ApiError(kind, text, status=status))
        finally:
            self.stats.record(x)
            if self.ctx.cfg.api.access_log:
                self._log(x)

    async def _serve(
        self, x: Exchange, path: str, route: tuple[str, dict[str, Handler]] | None
    ) -> None:
        request = x.request
        refused = self._foreign_origin(request)
        if refused:
            raise ApiError(
                "forbidden",
                f"requests from the web origin {refused[:100]} are not allowed: "
                "list it in [auth] allowed_origins",
            )
        if path != "/" and not self.identity.allowed(request.headers):
            raise ApiError(
                "unauthorized", "missing or invalid API key: send Authorization: Bearer TOKEN"
            )
        x.key = self.identity.key(request.headers, request.peer)
        if route is None:
            if path.startswith("/v1/models/") and self._openai is not None:
                if request.method not in ("GET", "HEAD"):
                    raise _not_allowed(request.method, path, "GET")
                await self._openai.model(x, path[len("/v1/models/") :])
                return
            if path in _MANAGEMENT:
                raise ApiError(
                    "forbidden",
                    "model management is disabled on this gateway: pull, create and delete "
                    "models on the backend itself",
                    status=403,
                )
            raise ApiError("not_found", f"no such endpoint: {path[:100]}")
        _, methods = route
        handler = methods.get(request.method)
        if handler is None:
            raise _not_allowed(request.method, path, ", ".join(methods))
        await handler(x)

    def _foreign_origin(self, request: Request) -> str:
        """The ``Origin`` of a browser's request from another site ("" when allowed).

        Without this any web page a user opens could make their browser use the APIs
        (a ``text/plain`` POST needs no preflight): generate, or unload models. Clients that
        are no browser send no ``Origin``. Allowed: an origin in ``[auth] allowed_origins``;
        with none listed, the page's own origin (``Origin`` naming the request's ``Host``).
        """
        origins = request.headers.get_all("Origin")
        if not origins:
            return ""
        origin = origins[0] if len(origins) == 1 else ",".join(origins)
        allowed = self.ctx.cfg.auth.allowed_origins
        if allowed:
            return "" if origin in allowed else origin
        host = single(request.headers, "Host")
        return "" if host and origin.partition("://")[2] == host else origin

    async def _error(self, x: Exchange, err: ApiError) -> None:
        extra: list[tuple[str, str]] = [("Cache-Control", "no-store")]
        if err.retry_after is not None:
            extra += [("Retry-After", str(err.retry_after)), ("x-should-retry", "true")]
        if err.kind == "unauthorized":
            extra.append(("WWW-Authenticate", 'Bearer realm="chatd"'))
        extra += err.headers
        if x.api == "openai":
            await send(x, err.status, openai_error(err), "application/json", extra)
        else:
            body = ollama_error(err)
            await send(x, err.status, body, "application/json; charset=utf-8", extra)

    def _log(self, x: Exchange) -> None:
        now = time.monotonic()
        first = x.timing.first_chunk
        log.info(
            "%s %s key=%s model=%s status=%d wait_ms=%.0f ttft_ms=%s ms=%.0f",
            _printable(x.request.method[:16]),
            x.endpoint if x.endpoint != "other" else _printable(x.request.target[:100]),
            x.key or "-",
            _printable(x.model[:80]) or "-",
            x.status,
            x.timing.queued * 1000.0,
            f"{first * 1000.0:.0f}" if first is not None else "-",
            (now - x.started) * 1000.0,
        )


def _printable(text: str) -> str:
    """A client's string fit for one log line: no control character can forge another
    line or field (each is written as its escape)."""
    if text.isprintable() and " " not in text:
        return text
    return "".join(
        c if c.isprintable() and c != " " else "\\x20" if c == " " else repr(c)[1:-1] for c in text
    )


def _not_allowed(method: str, path: str, allow: str) -> ApiError:
    return ApiError(
        "not_allowed", f"{method} is not allowed on {path[:100]}", headers=(("Allow", allow),)
    )
