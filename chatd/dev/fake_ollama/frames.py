"""The fake Ollama's response bodies: what one parsed request (a ``_Job``) is answered with.

Pure builders, no I/O, for :mod:`chatd.dev.fake_ollama.server`: Ollama's NDJSON chunks and its done
chunk with timing metrics, the OpenAI-compatible SSE chunks (chat and text completions), finish
and usage tails and whole completions, the embedding answers of the three embedding APIs, and
the error bodies of both APIs. Field order follows Ollama's Go structs. The
timing metrics read the clock when built, so a done chunk must be built when it is due. Like the
server, it imports nothing from the rest of chatd but :mod:`chatd.dev.fake_ollama.wire`: a stand-in
must not share code (and so bugs) with what it stands in for.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Sequence
from typing import Any

import orjson

from chatd.dev.fake_ollama.wire import (
    _NL,
    _RUN_ERROR,
    _SSE_DONE,
    OPENAI_APIS,
    _Job,
    _Timing,
    rfc3339nano,
)


def error_body(api: str, status: int, message: str) -> dict[str, Any]:
    """The JSON error body: Ollama's ``{"error": message}``, or OpenAI's error object (Ollama's
    openai.NewError: the type from the status, ``param`` and ``code`` null)."""
    if api not in OPENAI_APIS:
        return {"error": message}
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def chunk(job: _Job, tok: str, ts: str) -> bytes:
    """One streamed token: an NDJSON line (``chat``, ``generate``) or an SSE event (openai)."""
    if job.api == "chat":
        msg = {"role": "assistant", "content": tok}
        c = {"model": job.model, "created_at": ts, "message": msg, "done": False}
        return orjson.dumps(c, option=_NL)
    if job.api == "generate":
        c = {"model": job.model, "created_at": ts, "response": tok, "done": False}
        return orjson.dumps(c, option=_NL)
    if job.api == "completions":
        return sse(text_chunk(job, tok, None))
    return sse(openai(job, {"role": "assistant", "content": tok}, None))


def final(job: _Job, content: str, reason: str, m: dict[str, int]) -> dict[str, Any]:
    """Ollama's done object (``chat`` or ``generate``) with ``content`` and the metrics ``m``."""
    head: dict[str, Any] = {"model": job.model, "created_at": rfc3339nano()}
    if job.api == "chat":  # field order as Ollama's Go structs
        msg = {"role": "assistant", "content": content}
        return head | {"message": msg, "done_reason": reason, "done": True} | m
    return head | {"response": content, "done": True, "done_reason": reason} | m


def done_line(job: _Job, toks: Sequence[str], reason: str, timing: _Timing) -> bytes:
    """Ollama's streamed done chunk: it carries the last token (if any) and the metrics."""
    m = metrics(job, len(toks), timing)
    return orjson.dumps(final(job, toks[-1] if toks else "", reason, m), option=_NL)


def whole(job: _Job, toks: Sequence[str], reason: str, timing: _Timing) -> dict[str, Any]:
    """The non-streamed answer: Ollama's done object, an OpenAI ``chat.completion`` or
    ``text_completion``."""
    text = "".join(toks)
    if job.api == "completions":
        return text_completion(job, text, reason, len(toks))
    if job.api != "openai":
        return final(job, text, reason, metrics(job, len(toks), timing))
    choice = {"index": 0, "message": {"role": "assistant", "content": text}}
    out = openai(job, None, reason) | {"object": "chat.completion"}
    return out | {"choices": [choice | {"finish_reason": reason}]} | usage(job, len(toks))


def metrics(job: _Job, n: int, timing: _Timing) -> dict[str, int]:
    """Ollama's timing fields for ``n`` tokens, measured up to now (never 0, as Go omits 0)."""
    t0, load_ns, t_prefill, t_first = timing
    now = time.perf_counter_ns()
    # Go's omitempty drops zeros; a real run never takes 0 ns, so never report 0.
    return {
        "total_duration": max(1, now - t0),
        "load_duration": max(1, load_ns),
        "prompt_eval_count": job.prompt_count,
        "prompt_eval_duration": max(1, t_first - t_prefill),
        "eval_count": n,
        "eval_duration": max(1, now - t_first),
    }


def openai(job: _Job, delta: dict[str, str] | None, finish: str | None) -> dict[str, Any]:
    """An OpenAI ``chat.completion.chunk``; with ``delta`` None, the head only (no choices)."""
    out = {"id": job.cid, "object": "chat.completion.chunk", "created": job.created}
    out |= {"model": job.model, "system_fingerprint": "fp_ollama"}
    if delta is None:
        return out
    return out | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def usage(job: _Job, n: int) -> dict[str, Any]:
    """OpenAI's ``usage`` member for a reply of ``n`` tokens."""
    p = job.prompt_count
    return {"usage": {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}}


_NO_USAGE = {"usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


def text_completion(job: _Job, text: str, reason: str, n: int | None) -> dict[str, Any]:
    """A whole OpenAI ``text_completion`` (``/v1/completions``, stream false) of ``n`` tokens
    (None: a load, whose usage is all zeros). Ollama's openai.Completion: no ``logprobs``
    member unless asked for (it is omitted when empty)."""
    out = {"id": job.cid, "object": "text_completion", "created": job.created}
    out |= {"model": job.model, "system_fingerprint": "fp_ollama"}
    out["choices"] = [{"text": text, "index": 0, "finish_reason": reason}]
    return out | (_NO_USAGE if n is None else usage(job, n))


def text_chunk(job: _Job, text: str, finish: str | None) -> dict[str, Any]:
    """An OpenAI ``text_completion`` stream chunk (Ollama's openai.CompletionChunk: ``choices``
    before ``model``). With ``include_usage`` every chunk carries an all-zero ``usage`` (Ollama
    sets an empty Usage on each), and the real one comes in a chunk of its own at the end."""
    out: dict[str, Any] = {"id": job.cid, "object": "text_completion", "created": job.created}
    out["choices"] = [{"text": text, "index": 0, "finish_reason": finish}]
    out |= {"model": job.model, "system_fingerprint": "fp_ollama"}
    return (out | _NO_USAGE) if job.include_usage else out


def _usage_chunk(job: _Job, n: int | None) -> bytes:
    """The last chunk but [DONE] with ``include_usage``: Ollama's done chunk again, its choices
    emptied, its usage filled in (all zeros for a load, ``n`` None)."""
    real = _NO_USAGE if n is None else usage(job, n)
    return sse(text_chunk(job, "", None) | {"choices": []} | real)


def completions_tail(job: _Job, toks: Sequence[str], reason: str) -> bytes:
    """The end of a ``/v1/completions`` stream, from Ollama's done chunk: the last token with
    ``finish_reason``, the usage chunk if asked, ``[DONE]``."""
    out = sse(text_chunk(job, toks[-1] if toks else "", reason))
    if job.include_usage:
        out += _usage_chunk(job, len(toks))
    return out + _SSE_DONE


def completion_load(job: _Job) -> bytes:
    """``/v1/completions`` with an empty prompt: Ollama loads the model and its load answer
    (``done_reason: "load"``, no metrics) goes through the /v1 layer like any answer."""
    if not job.stream:
        return orjson.dumps(text_completion(job, "", "load", None))
    out = sse(text_chunk(job, "", "load"))
    if job.include_usage:
        out += _usage_chunk(job, None)
    return out + _SSE_DONE


def sse(payload: dict[str, Any]) -> bytes:
    """One SSE ``data:`` event."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def openai_tail(job: _Job, reason: str, n: int) -> bytes:
    """The end of an OpenAI stream: the finish chunk, the usage chunk if asked, ``[DONE]``."""
    out = sse(openai(job, {}, reason))
    if job.include_usage:
        out += sse(openai(job, None, None) | {"choices": []} | usage(job, n))
    return out + _SSE_DONE


def error_frame(job: _Job) -> bytes:
    """The error that cuts a stream short (``error_after_tokens``): a line, or an SSE event."""
    err = error_body(job.api, 500, _RUN_ERROR)
    # OpenAI: no [DONE] after it, the stream is cut short as on any upstream error.
    return sse(err) if job.api in OPENAI_APIS else orjson.dumps(err, option=_NL)


def malformed(job: _Job, kind: str, ts: str) -> bytes:
    """A broken line of the fault ``kind`` (``not_json``, ``not_object``, ``no_message``) in the
    job's framing: an NDJSON line, or an SSE ``data:`` event on /v1."""
    if kind == "not_json":
        payload = b"this is not json"
    elif kind == "not_object":
        payload = b'["not", "an", "object"]'
    elif job.api == "openai":  # a chunk without its "choices"
        payload = orjson.dumps(openai(job, None, None))
    elif job.api == "completions":
        payload = orjson.dumps(
            {k: v for k, v in text_chunk(job, "", None).items() if k != "choices"}
        )
    else:  # a chunk without its "message" (chat) or "response" (generate)
        payload = orjson.dumps({"model": job.model, "created_at": ts, "done": False})
    return b"data: " + payload + b"\n\n" if job.api in OPENAI_APIS else payload + b"\n"


# -- embeddings -------------------------------------------------------------------------------


def embed(
    model: str, vectors: Sequence[Sequence[float]], count: int, timing: tuple[int, int]
) -> dict[str, Any]:
    """``POST /api/embed``'s EmbedResponse: ``vectors`` for the inputs in order, ``count``
    prompt tokens in all; ``timing`` = (arrival, load wait) in perf_counter ns. Go omits the
    zero durations and count, which the fake never reports as 0."""
    t0, load_ns = timing
    out: dict[str, Any] = {"model": model, "embeddings": vectors}
    out["total_duration"] = max(1, time.perf_counter_ns() - t0)
    out["load_duration"] = max(1, load_ns)
    return out | {"prompt_eval_count": count}


def embeddings_legacy(vector: Sequence[float]) -> dict[str, Any]:
    """``POST /api/embeddings``'s EmbeddingResponse. Ollama widens the model's float32 values to
    float64 and Go writes those with all their digits (0.12345679104328156, not 0.12345679)."""
    return {"embedding": [struct.unpack("<f", struct.pack("<f", v))[0] for v in vector]}


def v1_embeddings(
    model: str, vectors: Sequence[Sequence[float]], count: int, encoding: str | None
) -> dict[str, Any]:
    """``POST /v1/embeddings``'s list (Ollama's openai.EmbeddingList). ``encoding`` "base64"
    (any case): each vector as the base64 of its little-endian float32 bytes, as OpenAI does."""
    data = []
    for i, vec in enumerate(vectors):
        emb: Any = vec
        if encoding is not None and encoding.lower() == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "embedding": emb, "index": i})
    usage = {"prompt_tokens": count, "total_tokens": count}
    return {"object": "list", "data": data, "model": model, "usage": usage}
