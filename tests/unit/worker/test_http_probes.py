"""The probe endpoints of a worker's port: ``/livez`` (the worker and its master answer),
``/healthz`` (the worker serves), ``/readyz`` (it can answer chat), as Kubernetes probes them
(deploy/k8s: startup and liveness on /livez, readiness on /healthz)."""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from chatd.config import Config
from chatd.worker.http import HttpEndpoints


def get(e: HttpEndpoints, path: str) -> Response:
    answer: Any = e.process_request(None, Request(path, Headers()))  # type: ignore[arg-type]
    if not isinstance(answer, Response):
        answer = asyncio.run(answer)
    assert isinstance(answer, Response)
    return answer


def endpoints(
    *, master: tuple[bool, str] = (True, ""), serving: bool = True, ready: bool = True
) -> HttpEndpoints:
    async def alive() -> tuple[bool, str]:
        return master

    return HttpEndpoints(
        Config(),
        ready=lambda: (ready, "" if ready else "no LLM backend is healthy"),
        serving=lambda: serving,
        connections=lambda: 0,
        alive=alive,
    )


def test_livez_follows_the_master_not_the_backends_nor_the_drain() -> None:
    r = get(endpoints(), "/livez")
    assert (r.status_code, r.body) == (200, b"alive\n")
    # Neither a backend outage nor a drain is a reason to restart the pod.
    assert get(endpoints(ready=False, serving=False), "/livez").status_code == 200
    r = get(endpoints(master=(False, "the master did not answer within 2s (timeout)")), "/livez")
    assert r.status_code == 503 and b"the master did not answer" in r.body
    assert r.headers["Cache-Control"] == "no-store"


def test_healthz_and_readyz_are_not_tied_together() -> None:
    # A backend outage: /readyz says so, /healthz (the Kubernetes readiness probe) does not.
    down = endpoints(ready=False)
    assert get(down, "/healthz").status_code == 200
    r = get(down, "/readyz")
    assert r.status_code == 503 and b"no LLM backend is healthy" in r.body
    # Draining (or pre-draining): /healthz answers 503 so the pod leaves the endpoints.
    assert get(endpoints(serving=False), "/healthz").status_code == 503


def test_every_probe_path_of_the_manifests_is_served_here() -> None:
    # The paths deploy/k8s probes (tests/system/test_k8s_manifests.py reads them from the
    # rendered YAML and asks the same of chatd); an unknown path is a 404.
    e = endpoints()
    assert {p: get(e, p).status_code for p in ("/livez", "/healthz", "/readyz")} == {
        "/livez": 200,
        "/healthz": 200,
        "/readyz": 200,
    }
    assert get(e, "/livenessz").status_code == 404
