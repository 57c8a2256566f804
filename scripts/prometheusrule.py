#!/usr/bin/env python3
"""Print etc/prometheus/chatd-alerts.yml as a PrometheusRule (prometheus-operator's CRD).

    scripts/prometheusrule.py > deploy/k8s/components/monitoring/prometheusrule.yaml

(``make k8s-rules`` does exactly that). The rules file stays the one source: the
PrometheusRule's ``spec.groups`` are its groups, unchanged, and
tests/system/test_k8s_manifests.py fails when the committed file differs from this output.
Needs PyYAML (in the test extra).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

RULES = Path(__file__).resolve().parents[1] / "etc" / "prometheus" / "chatd-alerts.yml"
HEADER = """\
# GENERATED from etc/prometheus/chatd-alerts.yml by `make k8s-rules`: edit that file, not this
# one (a test fails when they differ). Prometheus' ruleSelector must match these labels; with
# kube-prometheus-stack that is often `release: <its release name>`: add it in your overlay.
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Multi-line PromQL stays readable as a block, as in the rules file.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def prometheus_rule(rules_text: str) -> str:
    """The PrometheusRule document (with its header) for the rules file's text."""
    doc: dict[str, Any] = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "chatd",
            "labels": {"app.kubernetes.io/name": "chatd", "app.kubernetes.io/component": "gateway"},
        },
        "spec": {"groups": yaml.safe_load(rules_text)["groups"]},
    }
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=10**6, allow_unicode=True)
    return HEADER + body


if __name__ == "__main__":
    sys.stdout.write(prometheus_rule(RULES.read_text()))
