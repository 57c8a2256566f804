"""The checks before a WebSocket upgrade, in order: header size (431), worker connection
limit (503), connections per address (429), origin (403), token (401)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from chatd.config import AuthConfig, Config, LimitsConfig
from chatd.worker.http import HttpEndpoints


def endpoints(per_ip: int = 0, **sections: Any) -> HttpEndpoints:
    cfg = dataclasses.replace(Config(), **sections)
    return HttpEndpoints(
        cfg,
        ready=lambda: (True, ""),
        serving=lambda: True,
        connections=lambda: 0,
        per_ip=lambda ip: per_ip if ip == "203.0.113.9" else 0,
    )


def ws(e: HttpEndpoints, peer: str = "203.0.113.9", **headers: str) -> Response | None:
    conn: Any = SimpleNamespace(remote_address=(peer, 40000))
    answer = e.process_request(conn, Request("/ws", Headers(headers)))
    assert answer is None or isinstance(answer, Response)
    return answer


def test_origins_are_checked_for_browsers_only() -> None:
    e = endpoints(auth=AuthConfig(allowed_origins=("https://chat.example",)))
    refused = ws(e, Origin="https://evil.example")
    assert refused is not None and refused.status_code == 403
    assert ws(e, Origin="https://chat.example") is None
    assert ws(e) is None  # no Origin: not a browser


def test_connections_per_address() -> None:
    e = endpoints(per_ip=3, limits=LimitsConfig(max_connections_per_ip=3))
    refused = ws(e)
    assert refused is not None and refused.status_code == 429
    assert refused.headers["Retry-After"] == "10"
    assert ws(e, peer="198.51.100.1") is None  # another address
    assert ws(endpoints(per_ip=1000)) is None  # 0: no limit


def test_header_bytes_on_every_path() -> None:
    e = endpoints(limits=LimitsConfig(max_header_bytes=1024))
    big = {f"X-{i}": "v" * 100 for i in range(12)}
    refused = ws(e, **big)
    assert refused is not None and refused.status_code == 431
    answer = e.process_request(None, Request("/healthz", Headers(big)))  # type: ignore[arg-type]
    assert isinstance(answer, Response) and answer.status_code == 431
    assert ws(e, **{f"X-{i}": "v" * 10 for i in range(12)}) is None
