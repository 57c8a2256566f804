"""The Prometheus text exposition format (0.0.4), written: :class:`Exposition` collects the
lines of ``GET /metrics`` (each family's HELP and TYPE once, before its first sample; label
values escaped; values spelled as the format wants). Pure; the figures come from
:mod:`chatd.metrics` and its siblings (``metrics_http``, ``metrics_stages``, ``metrics_fleet``),
which write through it (:class:`chatd.metrics_http.Writer`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from chatd.stats import EXACT_EDGES_MS, Histogram

LATENCY_BOUNDS_MS = EXACT_EDGES_MS
"""``le`` bounds of the latency histograms, in ms (exported in seconds): Prometheus' defaults,
extended to the minutes a model load or a long reply can take. They are bucket edges of
:class:`chatd.stats.Histogram`, so each ``le`` bucket counts exactly the observations <= it."""


def escape_label(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote, newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, ``+Inf``/``-Inf``/``NaN`` spelled out."""
    if isinstance(value, int) or (math.isfinite(value) and value == int(value)):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Exposition:
    """The exposition being written (:class:`chatd.metrics_http.Writer`): a family's HELP and
    TYPE lines come once, before its first sample."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._families: set[str] = set()

    def family(self, name: str, kind: str, help_text: str) -> None:
        if name in self._families:
            return
        self._families.add(name)
        escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines.append(f"# HELP {name} {escaped}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        if labels:
            inner = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            name = f"{name}{{{inner}}}"
        self.lines.append(f"{name} {format_value(value)}")

    def single(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text)
        self.sample(name, value)

    def histogram(
        self, name: str, help_text: str, wire: Any, labels: Mapping[str, str] | None = None
    ) -> None:
        """A histogram in seconds from the wire form ``{"counts"|"buckets": [[bucket, n]...],
        "sum_ms"}``; ``labels`` for one of several series of the family."""
        wire = wire if isinstance(wire, Mapping) else {}
        h = Histogram.from_wire(wire.get("counts", wire.get("buckets")), wire.get("sum_ms"))
        self.family(name, "histogram", help_text)
        base = dict(labels or {})
        for bound_ms, n in h.cumulative(LATENCY_BOUNDS_MS):
            self.sample(f"{name}_bucket", n, {**base, "le": format_value(bound_ms / 1000.0)})
        self.sample(f"{name}_bucket", h.count, {**base, "le": "+Inf"})
        self.sample(f"{name}_sum", h.total_ms / 1000.0, base)
        self.sample(f"{name}_count", h.count, base)
