"""A strict little parser of the Prometheus text exposition format (version 0.0.4), for tests.

Written from the format's description, sharing no code with ``chatd.metrics``. It refuses what
Prometheus would refuse (bad names, bad label syntax, bad escapes, samples of an undeclared or
repeated family) and checks the histogram rules: cumulative buckets in increasing ``le``, the
last one ``+Inf``, equal to ``_count``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?,?\}})? (\S+)(?: -?\d+)?$")
_ONE_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", "")}


@dataclass
class Family:
    name: str
    type: str
    help: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def value(self, **labels: str) -> float:
        """The one sample named like the family with exactly these labels."""
        found = [v for n, lab, v in self.samples if n == self.name and lab == labels]
        assert len(found) == 1, f"{self.name}{labels}: {found}"
        return found[0]


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def _number(text: str) -> float:
    if text in ("+Inf", "Inf"):
        return math.inf
    if text == "-Inf":
        return -math.inf
    if text == "NaN":
        return math.nan
    assert re.fullmatch(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text), f"bad value {text!r}"
    return float(text)


def parse(text: str) -> dict[str, Family]:
    """The families of an exposition, by name; AssertionError on anything malformed."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, Family] = {}
    current: Family | None = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name), line
            fam = families.setdefault(name, Family(name, "untyped"))
            fam.help = help_text
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name) and kind in _TYPES, line
            fam = families.setdefault(name, Family(name, kind))
            assert not fam.samples, f"TYPE of {name} after its samples"
            fam.type = kind
            current = fam
            continue
        if line.startswith("#") or not line:
            continue
        m = _SAMPLE.match(line)
        assert m, f"malformed sample line {line!r}"
        name, labels_text, value = m.groups()
        labels = {k: _unescape(v) for k, v in _ONE_LABEL.findall(labels_text or "")}
        assert current is not None, f"sample before any TYPE: {line!r}"
        allowed = [current.name + s for s in _SUFFIXES.get(current.type, ("",))]
        assert name in allowed, f"{name} in family {current.name} ({current.type})"
        current.samples.append((name, labels, _number(value)))
    for fam in families.values():
        if fam.type == "histogram":
            _check_histogram(fam)
    return families


def _check_histogram(fam: Family) -> None:
    series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    for name, labels, value in fam.samples:
        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        if name.endswith("_bucket"):
            series.setdefault(rest, []).append((_number(labels["le"]), value))
        elif name.endswith("_count"):
            counts[rest] = value
    assert series, f"histogram {fam.name} without buckets"
    for rest, buckets in series.items():
        les = [le for le, _ in buckets]
        assert les == sorted(les) and les[-1] == math.inf, f"{fam.name}: le {les}"
        values = [v for _, v in buckets]
        assert values == sorted(values), f"{fam.name}: buckets not cumulative {values}"
        assert counts.get(rest) == values[-1], f"{fam.name}: _count != +Inf bucket"
