"""The fleet's part of ``/metrics``: each backend's LLM slots over every host (a Redis store).

The master adds ``fleet`` (:meth:`chatd.master.fleet.Fleet.status`) to the figures it sends a
worker for ``/metrics``; :func:`render` writes, per backend and slot class,
``chatd_fleet_slots_in_flight`` and ``chatd_fleet_slots_held`` (over every host, as of each
host's last renewal), ``chatd_fleet_slots_held_here`` and ``chatd_fleet_hosts``, and
``chatd_fleet_renewal_failing``. Nothing without a Redis store (the slots are not shared). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from chatd.metrics_http import Writer

_POOL_FAMILIES = (
    ("chatd_fleet_slots_in_flight", "fleet_in_flight", "LLM slots in flight on every host "
     "sharing the backend (each host's figure as of its last renewal, at most 0.5 s old)."),
    ("chatd_fleet_slots_held", "fleet_held", "LLM slots held by every host sharing the "
     "backend (never above its max_parallel)."),
    ("chatd_fleet_slots_held_here", "held", "LLM slots of the backend this host holds."),
    ("chatd_fleet_hosts", "hosts", "Hosts sharing the backend's LLM slots (a live lease)."),
)  # fmt: skip


def render(out: Writer, fleet: Any) -> None:
    """The fleet's families (see the module); nothing when ``fleet`` is not a mapping."""
    if not isinstance(fleet, Mapping):
        return
    pools = [p for p in fleet.get("pools") or () if isinstance(p, Mapping)]
    for name, key, help_text in _POOL_FAMILIES:
        out.family(name, "gauge", help_text)
        for p in pools:
            labels = {"backend": str(p.get("backend")), "class": str(p.get("class"))}
            value = p.get(key)
            out.sample(name, float(value) if isinstance(value, int | float) else 0.0, labels)
    out.family(
        "chatd_fleet_renewal_failing",
        "gauge",
        "1 while this host cannot renew its share of the fleet's LLM slots in Redis (after "
        "2 s it grants none), else 0.",
    )
    out.sample("chatd_fleet_renewal_failing", 1.0 if fleet.get("error") else 0.0)
