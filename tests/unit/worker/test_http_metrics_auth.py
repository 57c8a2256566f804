"""``/metrics`` behind ``[server] metrics_token``: 401 with ``WWW-Authenticate: Bearer`` unless
the request carries ``Authorization: Bearer TOKEN``; without the key it stays public."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from chatd.config import Config, ServerConfig
from chatd.worker.http import HttpEndpoints

TOKEN = "scrape-T0ken"


def endpoints(token: str) -> HttpEndpoints:
    cfg = dataclasses.replace(Config(), server=ServerConfig(metrics_token=token))

    async def metrics() -> str:
        return "chatd_up 1\n"

    return HttpEndpoints(
        cfg,
        ready=lambda: (True, ""),
        serving=lambda: True,
        connections=lambda: 0,
        metrics=metrics,
    )


def get(e: HttpEndpoints, path: str, **headers: str) -> Response:
    answer: Any = e.process_request(None, Request(path, Headers(headers)))  # type: ignore[arg-type]
    if not isinstance(answer, Response):
        answer = asyncio.run(answer)
    assert isinstance(answer, Response)
    return answer


def test_metrics_token_required_when_set() -> None:
    e = endpoints(TOKEN)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = get(e, "/metrics", **headers)
        assert r.status_code == 401, headers
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert TOKEN.encode() not in r.body
    assert get(e, f"/metrics?token={TOKEN}").status_code == 401  # the header only
    r = get(e, "/metrics", Authorization=f"Bearer {TOKEN}")
    assert (r.status_code, r.body) == (200, b"chatd_up 1\n")
    assert get(e, "/metrics", Authorization=f"bearer  {TOKEN} ").status_code == 200
    assert get(e, "/healthz").status_code == 200  # the other endpoints stay open


def test_metrics_public_without_token() -> None:
    assert get(endpoints(""), "/metrics").status_code == 200
