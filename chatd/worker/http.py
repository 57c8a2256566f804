"""The plain HTTP side of a worker's port, and the checks made before a WebSocket handshake.

websockets calls :meth:`HttpEndpoints.process_request` before each opening handshake, and the
front's plain HTTP connections call :meth:`HttpEndpoints.serve_http` for every other request
(:mod:`chatd.worker.front`), which gives the same answers. It answers ``/healthz`` (this
worker serves: 503 while it drains or pre-drains), ``/readyz`` (it can answer chat: a backend
and the store work; 503 while it pre-drains, too), ``/livez`` (its loop and the master's both
answer: the liveness probe), ``/metrics`` (the whole daemon's, from the master: see
:mod:`chatd.metrics`; 503 when the master does not answer in time) and the chat page
(``/chat/``, and ``/`` for a browser) itself, hands the Ollama/OpenAI APIs (``/``,
``/api/...``, ``/v1/...``) to :mod:`chatd.worker.api`, and for ``/ws`` checks, in this order:
the worker is not over ``max_connections`` (HTTP 503 with ``Retry-After``), the origin is
allowed (403), the auth token is valid (401). With ``[server]
metrics_token``, ``/metrics`` answers 401 (and ``WWW-Authenticate: Bearer``) to a request
without that bearer token. Anything else is a 404.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import orjson
import websockets.http11
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from chatd.config import Config
from chatd.metrics import CONTENT_TYPE
from chatd.worker.api.router import ApiRouter
from chatd.worker.httpconn import Request as HttpRequest
from chatd.worker.httpconn import Responder, single


def token_of(request: Request) -> str:
    """The bearer token of a handshake: ``Authorization: Bearer T`` or ``?token=T`` ("" if none)."""
    auth = single(request.headers, "Authorization")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    query = urlsplit(request.path).query
    return parse_qs(query).get("token", [""])[0] if query else ""


def _response(status: int, reason: str, body: bytes, content_type: str, **extra: str) -> Response:
    headers = Headers({"Content-Type": content_type, "Content-Length": str(len(body))})
    headers["Cache-Control"] = "no-store"
    for name, value in extra.items():
        headers[name.replace("_", "-")] = value
    return Response(status, reason, headers, body)


def _text(status: int, reason: str, text: str, **extra: str) -> Response:
    return _response(status, reason, text.encode(), "text/plain; charset=utf-8", **extra)


@dataclass(slots=True)
class HttpEndpoints:
    """The HTTP answers of one worker; ``ready``/``serving``/``connections`` are live views."""

    cfg: Config
    ready: Callable[[], tuple[bool, str]]  # (some backend healthy, reason when not)
    serving: Callable[[], bool]  # False while draining
    connections: Callable[[], int]
    metrics: Callable[[], Awaitable[str | None]] | None = None  # the /metrics text, or None
    alive: Callable[[], Awaitable[tuple[bool, str]]] | None = None  # the master answers
    per_ip: Callable[[str], int] = lambda _ip: 0  # this worker's open connections from an IP
    worker_name: str = ""  # "slot/pid", in the X-Chatd-Worker header of /metrics
    api: ApiRouter | None = None  # the Ollama/OpenAI APIs (chatd.worker.api)
    page: bytes = b""

    def __post_init__(self) -> None:
        try:
            self.page = (resources.files("chatd") / "web" / "index.html").read_bytes()
        except (FileNotFoundError, OSError):
            self.page = b"<!doctype html><title>chatd</title><p>chatd: connect to /ws</p>"

    def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | Awaitable[Response] | None:
        """websockets' hook: a Response ends the request; None continues the handshake.

        Only ``/metrics`` and ``/livez`` answer asynchronously (websockets awaits what it
        gets): they wait for the master, and the other paths stay free of a coroutine per
        request.

        Every request first: headers over ``max_header_bytes`` in all get 431 (more than
        ``max_header_count`` lines never get this far: websockets' parser answers 431 itself,
        with the count the worker sets), so no connection keeps a large request in memory.
        """
        size = sum(len(k) + len(v) + 4 for k, v in request.headers.raw_items())
        if size > self.cfg.limits.max_header_bytes:
            return _text(
                431,
                "Request Header Fields Too Large",
                f"request headers of {size} bytes: at most {self.cfg.limits.max_header_bytes}\n",
            )
        path = urlsplit(request.path).path
        if path == "/ws":
            return self._check_handshake(connection, request)
        if path == "/metrics":
            return self._metrics_denied(request) or self._metrics()
        if path == "/healthz":
            if self.serving():
                return _text(200, "OK", "ok\n")
            return _text(503, "Service Unavailable", "draining\n")
        if path == "/livez":
            return self._livez()
        if path == "/readyz":
            ok, reason = self.ready()
            if ok:
                return _text(200, "OK", "ready\n")
            body = orjson.dumps({"ready": False, "reason": reason})
            return _response(503, "Service Unavailable", body, "application/json")
        if path in ("/", "/index.html"):
            return _response(200, "OK", self.page, "text/html; charset=utf-8")
        return _text(404, "Not Found", f"no such endpoint: {path[:100]}\n")

    def _metrics_denied(self, request: Request) -> Response | None:
        """401 unless ``[server] metrics_token`` is unset or sent as ``Authorization: Bearer``.

        The header only, not ``?token=``: Prometheus sends the header (``authorization:`` in a
        scrape config), and a token in a URL ends up in proxies' access logs.
        """
        want = self.cfg.server.metrics_token
        if not want:
            return None
        auth = single(request.headers, "Authorization")
        got = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if hmac.compare_digest(got.encode(), want.encode()):
            return None
        return _text(
            401,
            "Unauthorized",
            "missing or invalid token: send Authorization: Bearer TOKEN\n",
            WWW_Authenticate='Bearer realm="chatd metrics"',
        )

    async def serve_http(self, request: HttpRequest, responder: Responder) -> None:
        """The plain HTTP side (:mod:`chatd.worker.front`): the same answers as
        :meth:`process_request` gives before a handshake, for requests that are no upgrade."""
        path = _path(request.target)
        if path in ("/chat", "/chat/") or (path == "/" and _wants_html(request.headers)):
            response = _response(200, "OK", self.page, "text/html; charset=utf-8")
        elif self.api is not None and self.api.claims(path):
            await self.api.handle(request, responder, path)
            return
        elif path == "/ws":
            response = _text(426, "Upgrade Required", "/ws speaks WebSocket: send an upgrade\n")
            response.headers["Upgrade"] = "websocket"
        else:
            peer = SimpleNamespace(remote_address=(request.peer, 0))
            ws_request = Request(request.target, request.headers)
            answer = self.process_request(peer, ws_request)  # type: ignore[arg-type]
            if answer is None:
                answer = _text(404, "Not Found", f"no such endpoint: {path[:100]}\n")
            response = answer if isinstance(answer, Response) else await answer
        # The responder frames the body itself (Content-Length): not twice, which clients such
        # as aiohttp refuse.
        headers = [(k, v) for k, v in response.headers.raw_items() if k.lower() != "content-length"]
        await responder.send(response.status_code, headers, bytes(response.body))

    async def serve_error(
        self, request: HttpRequest, responder: Responder, status: int, text: str
    ) -> None:
        """A request refused before its handler (413, 431, 400): in its API's shape for an API
        path, else plain text."""
        path = _path(request.target)
        if self.api is not None and self.api.claims(path):
            await self.api.refuse(request, responder, path, status, text)
            return
        body = (text + "\n").encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
        await responder.send(status, headers, body)

    async def _livez(self) -> Response:
        ok, reason = await self.alive() if self.alive is not None else (True, "")
        if ok:
            return _text(200, "OK", "alive\n")
        return _text(503, "Service Unavailable", f"{reason}\n")

    async def _metrics(self) -> Response:
        text = await self.metrics() if self.metrics is not None else None
        if text is None:
            return _text(
                503,
                "Service Unavailable",
                "the master did not send the daemon's figures in time: retry\n",
                Retry_After="1",
            )
        return _response(200, "OK", text.encode(), CONTENT_TYPE, X_Chatd_Worker=self.worker_name)

    def _check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        limits = self.cfg.limits
        if self.connections() >= limits.max_connections:
            return _text(
                503,
                "Service Unavailable",
                "this worker is at its connection limit: retry shortly\n",
                Retry_After="5",
            )
        peer = connection.remote_address[0] if connection.remote_address else "?"
        if limits.max_connections_per_ip and self.per_ip(peer) >= limits.max_connections_per_ip:
            return _text(
                429,
                "Too Many Requests",
                f"too many connections from {peer} "
                f"(max_connections_per_ip {limits.max_connections_per_ip}): retry later\n",
                Retry_After="10",
            )
        origins = self.cfg.auth.allowed_origins
        origin = ",".join(request.headers.get_all("Origin")) or None
        if origins and origin is not None and origin not in origins:
            return _text(403, "Forbidden", "origin not allowed\n")
        tokens = self.cfg.auth.tokens
        if tokens:
            token = token_of(request)
            if not any(hmac.compare_digest(token.encode(), t.encode()) for t in tokens):
                return _text(
                    401,
                    "Unauthorized",
                    "missing or invalid token: send Authorization: Bearer TOKEN\n",
                    WWW_Authenticate='Bearer realm="chatd"',
                )
        return None


def _path(target: str) -> str:
    """The path of a request target, repeated slashes as one (a base URL ending in ``/``
    makes clients send ``//api/chat``; ``urlsplit`` would take ``api`` for a host)."""
    path = target.partition("?")[0].partition("#")[0]
    while "//" in path:
        path = path.replace("//", "/")
    return path or "/"


def _wants_html(headers: Headers) -> bool:
    """A browser's request (``Accept`` naming text/html): ``/`` is then the chat page, not
    Ollama's ``Ollama is running``."""
    return any("text/html" in value for value in headers.get_all("Accept"))


def frame_limit(cfg: Config) -> int:
    """The WebSocket ``max_size``: a frame carrying the longest text, JSON-escaped, fits.

    JSON escaping can grow text up to 6x (``\\u0000``); a frame over this closes with 1009,
    a text over ``max_message_bytes`` in a smaller frame gets ``too_large`` and stays open.
    """
    return 6 * cfg.limits.max_message_bytes + 4096


def limit_headers(count: int) -> None:
    """At most ``count`` header lines per upgrade request: more get 431 from websockets' own
    parser (its documented constant, read at each parse; pinned by a test)."""
    websockets.http11.MAX_NUM_HEADERS = count
