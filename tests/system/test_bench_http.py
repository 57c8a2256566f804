"""Short smokes of ``chatd-bench run http`` and ``run fairness`` through a real chatd in
front of the fake Ollama: the HTTP load's processes, the NDJSON/SSE readers, the flooder and
light users, the figures and the tables. Checks structure and sane values, never timings.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from chatd.bench import fairness, httpapi, report
from chatd.bench.fairness import FairParams
from chatd.bench.httpapi import HttpParams, http_base
from chatd.bench.httpload import new_session, post_stream
from chatd.bench.httpwire import PATHS, auth_headers, request_body
from chatd.bench.load import TEXT
from chatd.bench.server import MODEL, OwnChatd

pytestmark = [pytest.mark.system]

# 2.3-3 s per path: small enough for a shared machine, large enough for a few hundred requests
SMALL_HTTP = HttpParams(duration=1.5, connections=20, rate=200.0, procs=1, pause=0.2, drain=3.0)
# about 2.5 s per phase: a 0.3 s reply, 6 flooding requests, 2 light users thinking 0.1-0.3 s
SMALL_FAIR = FairParams(
    duration=2.0, reply_s=0.3, tokens=4, flood_in_flight=6, light=2, think_s=(0.1, 0.3), workers=1
)


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


@pytest.mark.slow
def test_http_through_chatd() -> None:
    target = OwnChatd(workers=1)
    try:
        base = http_base(target.url)
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
        assert _answers(base, "ollama", fairness.client_tokens(p)[0]) is None
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
