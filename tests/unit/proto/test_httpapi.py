"""What the two HTTP APIs share: request bodies, the error kinds and their two renderings."""

from __future__ import annotations

from collections.abc import Callable

import orjson
import pytest

from chatd.proto import httpapi
from chatd.proto.httpapi import ApiError, Delta


def raises_bad_request(fn: Callable[..., object], *args: object, **kwargs: object) -> ApiError:
    """The ApiError(bad_request) that ``fn(*args, **kwargs)`` raises."""
    with pytest.raises(ApiError) as info:
        fn(*args, **kwargs)
    assert info.value.kind == "bad_request"
    assert info.value.status == 400
    return info.value


# --- ApiError --------------------------------------------------------------------------------


def test_ollama_busy_text_is_ollamas_own_with_two_spaces() -> None:
    assert httpapi.OLLAMA_BUSY == (
        "server busy, please try again.  maximum pending requests exceeded"
    )
    assert ".  maximum" in httpapi.OLLAMA_BUSY


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("bad_request", 400),
        ("unauthorized", 401),
        ("forbidden", 403),
        ("not_found", 404),
        ("not_allowed", 405),
        ("too_large", 413),
        ("rate_limited", 429),
        ("internal", 500),
        ("unavailable", 502),
        ("busy", 503),
        ("timeout", 504),
        ("backend", 500),  # a backend error without its status
        ("no_such_kind", 500),
    ],
)
def test_status_follows_the_kind(kind: str, status: int) -> None:
    assert ApiError(kind, "m").status == status


def test_api_error_carries_its_fields() -> None:
    err = ApiError(
        "not_allowed",
        "use POST",
        status=405,
        retry_after=3,
        param="x",
        headers=(("Allow", "POST"),),
    )
    assert str(err) == "use POST"
    assert (err.kind, err.message, err.status) == ("not_allowed", "use POST", 405)
    assert (err.retry_after, err.param, err.headers) == (3, "x", (("Allow", "POST"),))
    plain = ApiError("busy", "full")
    assert (plain.retry_after, plain.param, plain.headers) == (None, None, ())


def test_backend_error_keeps_the_backends_status() -> None:
    assert ApiError("backend", "boom", status=418).status == 418


# --- json_body / model_of / flag ---------------------------------------------------------------


def test_json_body_returns_the_object() -> None:
    assert httpapi.json_body(b' {"model": "m", "n": [1]} \n') == {"model": "m", "n": [1]}


@pytest.mark.parametrize("body", [b"", b"   ", b"\r\n\t"])
def test_json_body_missing(body: bytes) -> None:
    err = raises_bad_request(httpapi.json_body, body)
    assert err.message == "missing request body"


@pytest.mark.parametrize("body", [b"{", b"not json", b'{"a":}', b"\xff\xfe{}"])
def test_json_body_invalid_json(body: bytes) -> None:
    err = raises_bad_request(httpapi.json_body, body)
    assert err.message.startswith("invalid JSON in the request body: ")


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"1", b"null", b"true", b'[{"model":"m"}]'])
def test_json_body_must_be_an_object(body: bytes) -> None:
    err = raises_bad_request(httpapi.json_body, body)
    assert err.message == "the request body must be a JSON object"


def test_model_of() -> None:
    assert httpapi.model_of({"model": "llama3"}) == "llama3"
    # Ollama's legacy ``name`` only where asked, and ``model`` wins over it.
    assert httpapi.model_of({"name": "old"}, legacy_name=True) == "old"
    assert httpapi.model_of({"model": "new", "name": "old"}, legacy_name=True) == "new"
    # Go clients send the zero value of ``model`` beside the legacy ``name``.
    assert httpapi.model_of({"model": "", "name": "old"}, legacy_name=True) == "old"


@pytest.mark.parametrize(
    ("obj", "legacy", "message"),
    [
        ({}, False, "model is required"),
        ({"model": None}, False, "model is required"),
        ({"model": ""}, False, "model is required"),
        ({"name": "old"}, False, "model is required"),
        ({"model": "", "name": "old"}, False, "model is required"),
        ({}, True, "model is required"),
        ({"model": "", "name": ""}, True, "model is required"),
        ({"model": 3}, False, "model must be a string"),
        ({"model": ["m"]}, False, "model must be a string"),
        ({"name": 3}, True, "model must be a string"),
    ],
)
def test_model_of_rejects(obj: dict[str, object], legacy: bool, message: str) -> None:
    err = raises_bad_request(httpapi.model_of, obj, legacy_name=legacy)
    assert (err.message, err.param) == (message, "model")


def test_flag() -> None:
    assert httpapi.flag({}, "stream", True) is True
    assert httpapi.flag({"stream": None}, "stream", False) is False
    assert httpapi.flag({"stream": False}, "stream", True) is False
    assert httpapi.flag({"stream": True}, "stream", False) is True


@pytest.mark.parametrize("value", [0, 1, "true", "false", [], {}])
def test_flag_rejects_non_booleans(value: object) -> None:
    err = raises_bad_request(httpapi.flag, {"raw": value}, "raw", False)
    assert (err.message, err.param) == ("raw must be true or false", "raw")


# --- the two renderings ------------------------------------------------------------------------


def test_ollama_error_is_one_error_string() -> None:
    assert httpapi.ollama_error(ApiError("not_found", "model 'x' not found")) == (
        b'{"error":"model \'x\' not found"}'
    )
    busy = orjson.loads(httpapi.ollama_error(ApiError("busy", httpapi.OLLAMA_BUSY)))
    assert busy == {"error": "server busy, please try again.  maximum pending requests exceeded"}


@pytest.mark.parametrize(
    ("kind", "type_", "code"),
    [
        ("bad_request", "invalid_request_error", None),
        ("too_large", "invalid_request_error", "request_too_large"),
        ("unauthorized", "authentication_error", "invalid_api_key"),
        ("forbidden", "permission_error", None),
        ("not_found", "not_found_error", "model_not_found"),
        ("not_allowed", "invalid_request_error", "method_not_allowed"),
        ("rate_limited", "rate_limit_error", "rate_limit_exceeded"),
        ("busy", "server_error", "server_busy"),
        ("unavailable", "server_error", "backend_unavailable"),
        ("timeout", "server_error", "backend_timeout"),
        ("internal", "server_error", "internal_error"),
    ],
)
def test_openai_error_shape_per_kind(kind: str, type_: str, code: str | None) -> None:
    body = httpapi.openai_error(ApiError(kind, "what happened", param="messages"))
    assert orjson.loads(body) == {
        "error": {"message": "what happened", "type": type_, "param": "messages", "code": code}
    }


@pytest.mark.parametrize(
    ("status", "type_", "code"),
    [
        (404, "not_found_error", "model_not_found"),
        (429, "rate_limit_error", "rate_limit_exceeded"),
        (400, "invalid_request_error", None),
        (422, "invalid_request_error", None),
        (499, "invalid_request_error", None),
        (500, "server_error", None),
        (502, "server_error", None),
        (None, "server_error", None),  # no status: 500
    ],
)
def test_openai_error_of_a_backend_error_follows_its_status(
    status: int | None, type_: str, code: str | None
) -> None:
    err = ApiError("backend", "the backend said no", status=status)
    assert httpapi.openai_error_object(err) == {
        "message": "the backend said no",
        "type": type_,
        "param": None,
        "code": code,
    }
    assert orjson.loads(httpapi.openai_error(err)) == {"error": httpapi.openai_error_object(err)}


def test_openai_error_body_is_exact_bytes() -> None:
    assert httpapi.openai_error(ApiError("bad_request", "messages must be a list")) == (
        b'{"error":{"message":"messages must be a list","type":"invalid_request_error",'
        b'"param":null,"code":null}}'
    )


# --- Delta -------------------------------------------------------------------------------------


def test_delta_defaults_are_an_empty_piece() -> None:
    a, b = Delta(), Delta()
    assert (a.content, a.thinking, a.tool_calls, a.done, a.done_reason) == ("", "", [], False, "")
    assert (a.prompt_tokens, a.completion_tokens, a.raw) == (None, None, None)
    a.tool_calls.append({"function": {"name": "f", "arguments": {}}})
    assert b.tool_calls == []  # each delta its own list
