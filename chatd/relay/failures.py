"""Each kind of backend failure as the UpstreamError the client will see: one sentence naming
the backend, what happened and what to do (an HTTP error status, a broken stream, a deadline,
a connection that failed). Pure: no I/O.
"""

from __future__ import annotations

from typing import Protocol

import aiohttp

from chatd.errors import UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnavailable
from chatd.relay.conn import BrokenResponse, ConnectError
from chatd.relay.wire import WireError, error_detail


def http_error(url: str, model: str, status: int, body: bytes) -> UpstreamError:
    """The error for a non-2xx answer, quoting the backend's own error text.

    5xx (Ollama's 503 "server busy" included) and 429 are worth a retry: UpstreamUnavailable.
    Any other status is a refusal of this request (404 unknown model, 400): UpstreamRejected.
    """
    detail = error_detail(body)
    if status >= 500 or status == 429:
        return UpstreamUnavailable(
            f"The model backend {url} answered HTTP {status} ({detail}); it is overloaded "
            "or failing, so try again in a moment.",
            backend=url,
            status=status,
            detail=detail,
        )
    if status == 404:
        return UpstreamRejected(
            f"The model backend {url} does not have the model {model} (HTTP 404: {detail}); "
            "pick another model or install it on that backend.",
            backend=url,
            status=status,
            detail=detail,
        )
    return UpstreamRejected(
        f"The model backend {url} rejected the request with HTTP {status} ({detail}); "
        "check the model name and the [llm] settings.",
        backend=url,
        status=status,
        detail=detail,
    )


def stream_error(url: str, api: str, exc: WireError) -> UpstreamRejected:
    """The error for an error object inside the stream, or a protocol violation."""
    if exc.kind == "error":
        msg = (
            f"The model backend {url} reported an error during the reply ({exc.detail}); "
            "try again, or pick another model."
        )
    else:
        msg = (
            f"The model backend {url} broke the {api} streaming protocol ({exc.kind}: "
            f"{exc.detail}); check that the backend's api setting matches the server."
        )
    return UpstreamRejected(msg, backend=url, detail=exc.detail if exc.kind == "error" else "")


def timeout_error(url: str, model: str, kind: str, seconds: float) -> UpstreamTimeout:
    """The error for an expired deadline; ``kind`` is "first", "idle" or "total"."""
    if kind == "first":
        msg = (
            f"The model backend {url} sent no first token for {model} within {seconds:g} s; "
            "it may be overloaded, so try again in a moment."
        )
    elif kind == "idle":
        msg = (
            f"The model backend {url} stopped sending tokens for {seconds:g} s in the "
            "middle of the reply; try again."
        )
    else:
        msg = (
            f"The model backend {url} did not finish the reply within {seconds:g} s; "
            "try again, or ask for a shorter answer."
        )
    return UpstreamTimeout(msg, backend=url)


def unreachable(url: str, what: str) -> UpstreamUnavailable:
    """The error for a connection that could not be made (``what`` says why)."""
    return UpstreamUnavailable(
        f"The model backend {url} is unreachable ({what}); check that it is running.",
        backend=url,
    )


def broken(url: str, what: str) -> UpstreamUnavailable:
    """The error for a connection lost, or a stream ended, before the reply was whole."""
    return UpstreamUnavailable(
        f"The model backend {url} {what} before the reply was complete; try again.",
        backend=url,
    )


class _Where(Protocol):
    url: str
    api: str


def connection_error(b: _Where, exc: BaseException) -> UpstreamError | None:
    """The UpstreamError for a transport or stream failure; None for anything else.

    Maps WireError (stream error object, protocol violation), the pool's ConnectError and
    BrokenResponse (a reset, a truncated body, a malformed head: UpstreamUnavailable, like
    a stream that ends early) and every aiohttp and socket error, so that none of them
    leaves the relay.
    """
    if isinstance(exc, WireError):
        if exc.kind == "truncated":  # the connection, not the protocol, broke
            return broken(b.url, f"ended the stream ({exc.detail})")
        return stream_error(b.url, b.api, exc)
    if isinstance(exc, ConnectError):  # the generation pool's (chatd.relay.pool)
        return unreachable(b.url, exc.reason)
    if isinstance(exc, BrokenResponse):  # the pool's message is already a phrase
        return broken(b.url, f"broke the response ({exc})")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return unreachable(b.url, "its host name does not resolve")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return unreachable(b.url, f"connecting failed: {exc.os_error.strerror or exc.os_error}")
    if isinstance(exc, aiohttp.ServerTimeoutError):  # sock_connect / connect timeouts
        return unreachable(b.url, "it did not accept the connection in time")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return broken(b.url, f"broke the connection ({type(exc).__name__}: {exc})")
    return None
