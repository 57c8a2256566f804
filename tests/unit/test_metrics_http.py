"""The APIs' part of /metrics (chatd.metrics_http): summed across workers, kept across exits,
rendered as Prometheus accepts it (tests.promtext, a parser of its own)."""

from __future__ import annotations

from typing import Any

from chatd.master.slotgrant import Granter
from chatd.metrics import Retired, aggregate, render
from chatd.stats import Histogram
from tests.promtext import parse


def http_report(requests: list[list[Any]], waits_ms: list[float], in_flight: int) -> dict[str, Any]:
    h = Histogram()
    for ms in waits_ms:
        h.observe(ms)
    wire = {"buckets": sorted(h.counts.items()), "sum_ms": h.total_ms}
    return {
        "requests": requests,
        "queue_wait": {"ollama": wire},
        "ttft": {"openai": wire},
        "in_flight": in_flight,
    }


def test_api_figures_are_summed_kept_and_rendered() -> None:
    retired = Retired()
    retired.fold({"http": http_report([["ollama", "/api/chat", 200, 4]], [10.0], 7)})
    live = [
        (
            "ready",
            {
                "http": http_report(
                    [["ollama", "/api/chat", 200, 1], ["openai", "/v1/chat/completions", 429, 2]],
                    [3000.0],
                    2,
                )
            },
        ),
        ("ready", {"http": "garbage"}),
        ("ready", {}),
    ]
    data = aggregate(live, retired, Granter([("http://a:1", 1)], max_queue=1).statistics(), 0)
    fams = parse(render(data))
    total = fams["chatd_http_requests_total"]
    assert total.type == "counter"
    assert total.value(api="ollama", endpoint="/api/chat", code="200") == 5
    assert total.value(api="openai", endpoint="/v1/chat/completions", code="429") == 2
    # A gauge: the exited worker's requests in flight ended with it.
    assert fams["chatd_http_requests_in_flight"].value() == 2
    wait = fams["chatd_http_queue_wait_seconds"]
    count = [v for n, lab, v in wait.samples if n.endswith("_count") and lab == {"api": "ollama"}]
    assert count == [2]
    buckets = {lab["le"]: v for n, lab, v in wait.samples if n.endswith("_bucket")}
    assert buckets["0.01"] == 1 and buckets["+Inf"] == 2
    ttft = fams["chatd_http_time_to_first_token_seconds"]
    assert any(lab == {"api": "openai"} for _, lab, _ in ttft.samples)


def test_no_api_traffic_still_declares_the_families() -> None:
    data = aggregate([], Retired(), Granter([("http://a:1", 1)], max_queue=1).statistics(), 0)
    fams = parse(render(data))
    assert fams["chatd_http_requests_total"].samples == []
    assert fams["chatd_http_requests_in_flight"].value() == 0
    apis = {lab["api"] for _, lab, _ in fams["chatd_http_queue_wait_seconds"].samples}
    assert apis == {"ollama", "openai"}
