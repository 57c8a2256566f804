"""Short smokes of ``chatd-bench run http`` and ``run fairness``. Checks structure and sane
values, never timings.

Against the fake Ollama directly (no chatd; it serves ``/api/chat`` and
``/v1/chat/completions`` as Ollama does), the client side runs whole: the HTTP load's
processes, the NDJSON/SSE readers, the flooder and light users, the figures and the tables.
Through chatd, each test first asks chatd's ``POST /api/chat`` (or
``/v1/chat/completions``) once and is skipped while chatd does not answer it with 200: those
parts wait for chatd's HTTP APIs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import aiohttp
import pytest

from chatd.bench import fairness, httpapi, report
from chatd.bench.fairness import FairParams
from chatd.bench.httpapi import HttpParams, http_base
from chatd.bench.httpload import new_session, post_stream
from chatd.bench.httpwire import PATHS, auth_headers, request_body
from chatd.bench.load import TEXT
from chatd.bench.server import MODEL, FakeBackend, OwnChatd

pytestmark = [pytest.mark.system]

# 2.3-3 s per path: small enough for a shared machine, large enough for a few hundred requests
SMALL_HTTP = HttpParams(duration=1.5, connections=20, rate=200.0, procs=1, pause=0.2, drain=3.0)
# about 2.5 s per phase: a 0.3 s reply, 6 flooding requests, 2 light users thinking 0.1-0.3 s
SMALL_FAIR = FairParams(
    duration=2.0, reply_s=0.3, tokens=4, flood_in_flight=6, light=2, think_s=(0.1, 0.3), workers=1
)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeBackend]:
    f = FakeBackend()
    try:
        yield f
    finally:
        f.stop()


def _answers(url: str, api: str, token: str | None = None) -> str | None:
    """None when ``url`` answers one streamed request of ``api`` whole, else what it did."""

    async def go() -> str | None:
        async with new_session(10.0) as s:
            out = await post_stream(
                s, url + PATHS[api], api, request_body(api, MODEL, TEXT), auth_headers(token)
            )
        return out.error

    try:
        return asyncio.run(go())
    except aiohttp.ClientError as exc:
        return repr(exc)


def _check_http(r: dict[str, object], paths: tuple[str, ...]) -> None:
    json.dumps(r)  # JSON-ready
    assert isinstance(r["paths"], dict) and set(r["paths"]) == set(paths)
    for path, f in r["paths"].items():
        assert f["scheduled"] >= 250, path  # 200/s for 1.5 s after 0.5 s warm-up: 300
        assert f["sent"] == f["scheduled"] == f["completed"], (path, f["errors"])
        assert f["errors"]["total"] == 0 and f["bad_reply"] == 0, path
        lat, ttft = f["latency_ms"], f["ttft_ms"]
        assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"] <= lat["max"], path
        assert 0 < ttft["p50"] <= lat["p50"] and ttft["p999"] <= lat["p999"], path
        assert f["replies_per_s"] > 100, path
        assert f["connections"]["opened"] == 20 and f["connections"]["failed"] == 0, path
        assert f["cpu"]["clients_pct_of_core"] > 0, path
    md = report.scenario_markdown(r)  # type: ignore[arg-type]
    assert md.startswith(f"### {httpapi.TITLE}")
    for path in paths:
        assert f"| {httpapi.LABELS[path]} |" in md


def test_http_loads_against_the_fake(fake: FakeBackend) -> None:
    r = httpapi.run_http(None, SMALL_HTTP, fake.url)
    _check_http(r, ("ollama", "openai"))
    assert r["skipped"] == {"ws": "no chatd (--target): no WebSocket load"}
    assert "server_after" not in r


def test_fairness_against_the_fake(fake: FakeBackend) -> None:
    """No queue in the fake (every request is served at once): both phases complete every
    client's requests; the figures are all there."""
    r = fairness.run(SMALL_FAIR, fake.url, fake.url)
    json.dumps(r)
    assert set(r["phases"]) == {"round_robin", "fifo"}
    for name, ph in r["phases"].items():
        assert ph["keys"] == (3 if name == "round_robin" else 1)
        assert ph["bad_reply"] == 0
        fl, li = ph["classes"]["flooder"], ph["classes"]["light"]
        assert fl["clients"] == 1 and li["clients"] == 2
        assert fl["errors"] == {} and li["errors"] == {}
        assert fl["completed"] >= 6 and li["completed"] >= 2, (fl, li)
        # each reply takes 0.3 s from its first byte: total - TTFB is about that, never less
        assert fl["total_ms"]["p50"] >= 290 and li["total_ms"]["p50"] >= 290
        assert 0 <= fl["ttfb_ms"]["p50"] <= fl["total_ms"]["p50"]
        assert fl["pending_at_end"] <= 6 and li["pending_at_end"] <= 2
        assert ph["jain"] is not None and 0 < ph["jain"] <= 1
        assert [c["class"] for c in ph["clients"]] == ["flooder", "light", "light"]
        assert ph["backend"]["max_in_flight"] >= 6  # the fake has no slots: all at once
    assert r["throughput_ratio_rr_fifo"] is not None and r["throughput_ratio_rr_fifo"] > 0
    md = report.scenario_markdown(r)
    assert "| round robin (a key per client) | light (2) |" in md
    assert "| FIFO (one key) | flooder (1) |" in md


@pytest.mark.slow
def test_http_through_chatd() -> None:
    target = OwnChatd(workers=1)
    try:
        base = http_base(target.url)
        for api in ("ollama", "openai"):
            why = _answers(base, api)
            if why is not None:
                pytest.skip(f"chatd does not serve {PATHS[api]} yet: {why}")
        r = httpapi.run_http(target, SMALL_HTTP)
    finally:
        target.stop()
    _check_http(r, httpapi.PATHS)
    assert r["target"] == {"ws": target.url, "http": base}
    assert r["paths"]["ollama"]["cpu"]["chatd_pct_of_core"] > 0
    assert r["server_after"]["available"] is True


@pytest.mark.slow
def test_fairness_through_chatd() -> None:
    """Both phases against one chatd configured as the scenario's own (2 slots, a token per
    client): chatd never has more than 2 requests at the backend, and nothing is refused."""
    p = SMALL_FAIR
    target = OwnChatd(
        p.workers,
        30.0,
        max_parallel=p.slots,
        max_queue=p.max_queue,
        extra=fairness.chatd_sections(p),
    )
    try:
        base = http_base(target.url)
        why = _answers(base, "ollama", fairness.client_tokens(p)[0])
        if why is not None:
            pytest.skip(f"chatd does not serve /api/chat yet: {why}")
        assert _answers(base, "ollama", "not-a-token") == "http_401"
        r = fairness.run(p, base, target.fake_url)
    finally:
        target.stop()
    for ph in r["phases"].values():
        assert ph["backend"]["max_in_flight"] <= p.slots
        fl, li = ph["classes"]["flooder"], ph["classes"]["light"]
        assert fl["errors"] == {} and li["errors"] == {} and ph["bad_reply"] == 0
        assert fl["completed"] + li["completed"] > 0
    assert r["throughput_ratio_rr_fifo"] is not None
