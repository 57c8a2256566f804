"""The fake Ollama's streamed answer: its chunks on the right schedule, and its faults.

:func:`stream` writes a generation's lines as Ollama does (NDJSON natively, SSE for the OpenAI
API), each token at its time, and breaks the stream where the ``fault`` knobs say (a reset, a
trickle of one byte at a time, a huge token, malformed lines). Imports nothing of the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Sequence

from aiohttp import web

from chatd.dev.fake_ollama import frames
from chatd.dev.fake_ollama.wire import _NDJSON_CT, _SSE_CT, FakeConfig, _Job, _Timing, rfc3339nano


async def stream(
    request: web.Request,
    job: _Job,
    toks: Sequence[str],
    reason: str,
    timing: _Timing,
    cfg: FakeConfig,
    fail: int | None,
) -> web.StreamResponse:
    """Token i is written at first-token time + i * token_ms. Natively the last token rides
    on the done chunk, and so on /v1/completions (Ollama's /v1 layer turns each native chunk
    into one), then the usage chunk if asked and [DONE]; /v1/chat/completions gets every token
    as a chunk, then the finish chunk, the usage chunk if asked, and [DONE]. With ``fail`` = k:
    k tokens, then an error line, no done. ``cfg.fault`` breaks line ``cfg.fault_after_tokens``
    of it (see :class:`FakeConfig`)."""
    native = job.api in ("chat", "generate")
    rides = job.api != "openai"  # the tail carries the last token
    fault = cfg.fault
    if fault is not None and cfg.fault_match is not None and cfg.fault_match not in job.text:
        fault = None
    at = cfg.fault_after_tokens
    if fault == "huge_token":
        if toks:
            k = min(at, len(toks) - 1)
            toks = [*toks[:k], "x" * cfg.fault_bytes, *toks[k + 1 :]]
        fault = None  # the rest of the stream is as usual
    body = toks[:fail] if fail is not None else toks[:-1] if rides else toks
    at = min(at, len(body))  # line `at` is token `at`'s chunk, or else the tail

    def line(i: int) -> bytes:  # built when due: a chunk's time, the tail's metrics
        if i < len(body):
            return frames.chunk(job, body[i], rfc3339nano())
        if fail is not None:
            return frames.error_frame(job)
        if native:
            return frames.done_line(job, toks, reason, timing)
        if rides:
            return frames.completions_tail(job, toks, reason)
        return frames.openai_tail(job, reason, len(toks))

    resp = web.StreamResponse(headers=_NDJSON_CT if native else _SSE_CT)
    # The client may go at any point (aiohttp then cancels this handler, or a write fails):
    # nothing is left to do, and it is no error of ours to log.
    with contextlib.suppress(ConnectionResetError):
        await resp.prepare(request)
        if cfg.token_ms <= 0 and fault is None:  # zero-delay load tests: one write
            ts = rfc3339nano()
            tail = line(len(body))
            await resp.write(b"".join([frames.chunk(job, t, ts) for t in body] + [tail]))
            await resp.write_eof()
            return resp
        loop = asyncio.get_running_loop()
        start, step = loop.time(), cfg.token_ms / 1000
        for i in range(len(body) + 1):
            # The tail stands for one more token when it carries the last one or an error;
            # an absolute schedule, so that write costs do not add up to drift.
            if i and step > 0 and (i < len(body) or rides or fail is not None):
                await asyncio.sleep(start + i * step - loop.time())
            if i != at or fault is None:
                await resp.write(line(i))
            elif fault == "reset":
                _reset(request)
                return resp
            elif fault == "trickle":
                rest = b"".join(line(j) for j in range(i, len(body) + 1))
                for b in range(len(rest)):
                    await resp.write(rest[b : b + 1])
                    await asyncio.sleep(cfg.trickle_ms / 1000)
                break
            else:
                await resp.write(frames.malformed(job, fault, rfc3339nano()))
        await resp.write_eof()
    return resp


def _reset(request: web.Request) -> None:
    """Reset the request's connection (TCP RST, not FIN), as a crashed backend or a middlebox
    does: SO_LINGER 0, then close."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
