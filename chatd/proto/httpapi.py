"""What the Ollama and OpenAI HTTP APIs share: request bodies, errors, and the stream's deltas.

Pure (no I/O, no clock: time comes in as an argument). The worker's API layer
(:mod:`chatd.worker.api`) parses a request body with :func:`json_body`, raises and renders
:class:`ApiError` in the shape of the API the client called (:func:`ollama_error`,
:func:`openai_error`), and moves a reply between the backend's wire format and the client's
as :class:`Delta` values (:mod:`chatd.proto.translate` decodes them, :mod:`chatd.proto.ollama`
and :mod:`chatd.proto.openai` encode them).

Error kinds (one outcome, two renderings; the table is docs/compat.md's):

==============  ======  ==========================  ====================================
kind            status  Ollama ``{"error": msg}``    OpenAI ``error.type`` / ``code``
==============  ======  ==========================  ====================================
bad_request     400     the message                 invalid_request_error / None
unauthorized    401     the message                 authentication_error / invalid_api_key
forbidden       403     the message                 permission_error / None
not_found       404     ``model 'X' not found``     not_found_error / model_not_found
not_allowed     405     the message                 invalid_request_error / method_not_allowed
rate_limited    429     the message                 rate_limit_error / rate_limit_exceeded
busy            503     Ollama's exact queue text   server_error / server_busy
unavailable     502     the message                 server_error / backend_unavailable
timeout         504     the message                 server_error / backend_timeout
backend         (its)   the backend's own text      per status
internal        500     the message                 server_error / internal_error
==============  ======  ==========================  ====================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

OLLAMA_BUSY = "server busy, please try again.  maximum pending requests exceeded"
"""Ollama's own text for a full queue (two spaces: scripts match on it)."""

_STATUS = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "not_allowed": 405,
    "too_large": 413,
    "rate_limited": 429,
    "internal": 500,
    "unavailable": 502,
    "busy": 503,
    "timeout": 504,
}

_OPENAI_TYPE = {
    "bad_request": ("invalid_request_error", None),
    "too_large": ("invalid_request_error", "request_too_large"),
    "unauthorized": ("authentication_error", "invalid_api_key"),
    "forbidden": ("permission_error", None),
    "not_found": ("not_found_error", "model_not_found"),
    "not_allowed": ("invalid_request_error", "method_not_allowed"),
    "rate_limited": ("rate_limit_error", "rate_limit_exceeded"),
    "busy": ("server_error", "server_busy"),
    "unavailable": ("server_error", "backend_unavailable"),
    "timeout": ("server_error", "backend_timeout"),
    "internal": ("server_error", "internal_error"),
}


class ApiError(Exception):
    """A request the API answers with an error (see the module's table).

    Attributes:
        kind: one of the table's kinds.
        message: one sentence for the client (never a secret).
        status: the HTTP status; for ``backend``, the backend's own.
        retry_after: seconds for a ``Retry-After`` header (429, 503), or None.
        param: the request field at fault (OpenAI's ``error.param``), or None.
        headers: more response headers (``Allow`` of a 405).
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: int | None = None,
        param: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.kind = kind
        self.message = message
        self.status = status if status is not None else _STATUS.get(kind, 500)
        self.retry_after = retry_after
        self.param = param


def json_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body; ApiError(bad_request) naming what is wrong."""
    if not body.strip():
        raise ApiError("bad_request", "missing request body")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError("bad_request", f"invalid JSON in the request body: {exc}") from None
    if type(obj) is not dict:
        raise ApiError("bad_request", "the request body must be a JSON object")
    return obj


def model_of(obj: dict[str, Any], *, legacy_name: bool = False) -> str:
    """The request's ``model`` (``name`` too where Ollama accepts it: when ``model`` is
    absent or empty, as Go clients send ``"model": ""`` beside a legacy ``name``); 400 when
    missing."""
    model = obj.get("model")
    if (model is None or model == "") and legacy_name:
        model = obj.get("name")
    if model is None or model == "":
        raise ApiError("bad_request", "model is required", param="model")
    if type(model) is not str:
        raise ApiError("bad_request", "model must be a string", param="model")
    return model


def flag(obj: dict[str, Any], name: str, default: bool) -> bool:
    """A boolean field (absent or null: ``default``); 400 for any other type."""
    value = obj.get(name)
    if value is None:
        return default
    if type(value) is not bool:
        raise ApiError("bad_request", f"{name} must be true or false", param=name)
    return value


def ollama_error(err: ApiError) -> bytes:
    """The body of an error response of the Ollama API: ``{"error": "..."}``."""
    return orjson.dumps({"error": err.message})


def openai_error(err: ApiError) -> bytes:
    """The body of an error response of the OpenAI API:
    ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps({"error": openai_error_object(err)})


def openai_error_object(err: ApiError) -> dict[str, Any]:
    """OpenAI's ``error`` object for ``err`` (also the payload of a mid-stream error event)."""
    kind, code = _OPENAI_TYPE.get(err.kind, (None, None))
    if kind is None:  # "backend": the type follows the status, as OpenAI's own
        if err.status == 404:
            kind, code = "not_found_error", "model_not_found"
        elif err.status == 429:
            kind, code = "rate_limit_error", "rate_limit_exceeded"
        elif err.status < 500:
            kind, code = "invalid_request_error", None
        else:
            kind, code = "server_error", None
    return {"message": err.message, "type": kind, "param": err.param, "code": code}


@dataclass(slots=True)
class Delta:
    """One piece of a reply, whatever wire it came from or goes to.

    ``content`` and ``thinking`` are text pieces ("" for none); ``tool_calls`` are whole
    calls in Ollama's shape (``{"function": {"name", "arguments": {...}}}``). The last delta
    of a reply has ``done`` set, with ``done_reason`` (``stop``, ``length``, ``tool_calls``,
    ``load``, ``unload``) and the token counts when the backend gave them. ``raw`` is the
    backend's own chunk when the client speaks the backend's API (passed through as is).
    """

    content: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    done_reason: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    raw: dict[str, Any] | None = None
