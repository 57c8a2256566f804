"""The Ollama/OpenAI APIs' part of ``/metrics``: requests by API, route and status, queue wait
and time to first chunk by API, requests being answered.

Each worker reports its cumulative figures under ``http`` in its ``stats`` message
(:class:`chatd.worker.api.router.ApiStats`); :class:`HttpFigures` sums the reports of the live
workers and keeps the exited ones' (counters never go down), and :func:`render` writes them
through :mod:`chatd.metrics`'s writer. Pure. Cardinality is bounded: two APIs, the routes
(unknown paths count as ``other``) and the status codes chatd answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from chatd.stats import Histogram

_HISTOGRAMS = ("queue_wait", "ttft")


class Writer(Protocol):
    """What :func:`render` needs of the writer (:class:`chatd.metrics_text.Exposition`)."""

    def family(self, name: str, kind: str, help_text: str) -> None: ...

    def sample(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None: ...

    def histogram(
        self, name: str, help_text: str, wire: Any, labels: Mapping[str, str] | None = None
    ) -> None: ...


def histogram_of(wire: Any) -> Histogram:
    """A Histogram from its wire form ``{"buckets": [[bucket, n], ...], "sum_ms"}`` (empty if
    malformed: a bad report must not break /metrics)."""
    if not isinstance(wire, Mapping):
        return Histogram()
    return Histogram.from_wire(wire.get("buckets"), wire.get("sum_ms"))


@dataclass(slots=True)
class HttpFigures:
    """The APIs' figures summed over reports (see the module)."""

    requests: dict[tuple[str, str, str], float] = field(default_factory=dict)
    histograms: dict[tuple[str, str], Histogram] = field(default_factory=dict)  # (name, api)
    in_flight: float = 0.0

    def add(self, report: Any, live: bool = True) -> None:
        """Add one worker's ``http`` report (``live``: its in-flight gauge counts too)."""
        if not isinstance(report, Mapping):
            return
        for row in report.get("requests") or ():
            if isinstance(row, list | tuple) and len(row) == 4:
                api, path, status, n = row
                if isinstance(n, int | float) and not isinstance(n, bool):
                    k = (str(api), str(path), str(status))
                    self.requests[k] = self.requests.get(k, 0.0) + n
        for name in _HISTOGRAMS:
            by_api = report.get(name)
            if isinstance(by_api, Mapping):
                for api, wire in by_api.items():
                    h = histogram_of(wire)
                    self.histograms.setdefault((name, str(api)), Histogram()).merge(
                        h.counts, h.total_ms
                    )
        n = report.get("in_flight")
        if live and isinstance(n, int | float) and not isinstance(n, bool):
            self.in_flight += n

    def merged(self, other: HttpFigures) -> HttpFigures:
        """These figures plus ``other``'s counters and histograms (not its gauge)."""
        out = HttpFigures(dict(self.requests), {}, self.in_flight)
        for k, n in other.requests.items():
            out.requests[k] = out.requests.get(k, 0.0) + n
        for src in (self.histograms, other.histograms):
            for hk, h in src.items():
                out.histograms.setdefault(hk, Histogram()).merge(h.counts, h.total_ms)
        return out

    def wire(self) -> dict[str, Any]:
        """The msgpack-friendly form, for :func:`render`."""
        return {
            "requests": [[a, p, s, n] for (a, p, s), n in sorted(self.requests.items())],
            "histograms": [
                [name, api, {"buckets": sorted(h.counts.items()), "sum_ms": h.total_ms}]
                for (name, api), h in sorted(self.histograms.items())
            ],
            "in_flight": self.in_flight,
        }


def render(out: Writer, data: Any) -> None:
    """The ``chatd_http_*`` families from :meth:`HttpFigures.wire`."""
    data = data if isinstance(data, Mapping) else {}
    out.family(
        "chatd_http_requests_total",
        "counter",
        "Requests of the Ollama and OpenAI APIs answered, by API, route and HTTP status "
        "(499: the client left first).",
    )
    for row in data.get("requests") or ():
        api, path, status, n = row
        out.sample(
            "chatd_http_requests_total", n, {"api": api, "endpoint": path, "code": str(status)}
        )
    out.family(
        "chatd_http_requests_in_flight", "gauge", "API requests being answered, all workers."
    )
    out.sample("chatd_http_requests_in_flight", float(data.get("in_flight") or 0))
    hists: dict[str, list[tuple[str, Any]]] = {name: [] for name in _HISTOGRAMS}
    for name, api, wire in data.get("histograms") or ():
        if name in hists:
            hists[name].append((api, wire))
    for name, metric, help_text in (
        (
            "queue_wait",
            "chatd_http_queue_wait_seconds",
            "Time an API request waited for an LLM slot (all its attempts), by API.",
        ),
        (
            "ttft",
            "chatd_http_time_to_first_token_seconds",
            "From an API request's relay (its body read and checked) to the first chunk of "
            "its reply, queue wait included, by API.",
        ),
    ):
        entries = hists[name] or [("ollama", None), ("openai", None)]
        for api, wire in entries:
            out.histogram(metric, help_text, wire, {"api": api})
