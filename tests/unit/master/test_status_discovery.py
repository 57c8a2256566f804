"""Backends from DNS as an operator sees them: ``chatctl status --json`` (one row per
address, from its table, with the granter's figures; the ``discovery`` section), the human
``chatctl status`` and its exit code, and ``/metrics``."""

from __future__ import annotations

from typing import Any

from chatd.backendtable import BackendTable
from chatd.config import BackendConfig, Config, LLMConfig
from chatd.ctl.statusfmt import format_status, is_healthy, problems
from chatd.master.slotgrant import Granter
from chatd.master.status import aggregate_status
from chatd.metrics import render
from tests.promtext import parse
from tests.unit.master.test_status import snap

URL = "http://ollama:11434"
A, B = "http://10.0.0.5:11434", "http://10.0.0.6:11434"
CFG = Config(
    llm=LLMConfig(
        backends=(
            BackendConfig(url="http://static:1"),
            BackendConfig(url=URL, discover="dns", max_parallel=3),
        )
    )
)


def document(discovery: list[dict[str, Any]], addresses: tuple[str, ...]) -> dict[str, Any]:
    table = BackendTable(CFG.llm.backends)
    table.apply({URL: addresses})
    live = [table.entries[n] for n in table.live()]
    granter = Granter([(e.key, e.config.max_parallel) for e in live], 512)
    granter.acquire(1, 1, [A], 0.0)
    return aggregate_status(
        master={"pid": 1, "state": "running"},
        workers=[snap(1, backends=[{"url": A, "healthy": True, "in_flight": 1, "held": 1}])],
        cfg=CFG,
        restarts_total=0,
        slots=granter.statistics(),
        table=table,
        discovery=discovery,
    )


def resolved(addresses: list[str] | None, error: str = "") -> list[dict[str, Any]]:
    return [
        {
            "url": URL,
            "host": "ollama",
            "addresses": addresses,
            "resolved_s_ago": 1.5,
            "error": error,
        }
    ]


def test_each_address_is_a_backend_row_from_its_table() -> None:
    doc = document(resolved(["10.0.0.5", "10.0.0.6"]), ("10.0.0.5", "10.0.0.6"))
    rows = {r["url"]: r for r in doc["backends"]}
    assert list(rows) == ["http://static:1", A, B]
    assert "discovered_from" not in rows["http://static:1"]
    assert rows[A]["discovered_from"] == URL and rows[A]["max_parallel"] == 3
    assert rows[A]["in_flight"] == 1 and rows[A]["healthy"] is True
    assert doc["discovery"] == resolved(["10.0.0.5", "10.0.0.6"])
    text = format_status(doc)
    assert f"backend {A} (ollama, from {URL}): healthy" in text
    assert f"dns {URL}: 2 addresses (10.0.0.5, 10.0.0.6), resolved 1.5s ago" in text
    assert is_healthy(doc)


def test_a_failing_name_keeps_its_addresses_and_says_so() -> None:
    doc = document(resolved(["10.0.0.5"], "SERVFAIL"), ("10.0.0.5",))
    text = format_status(doc)
    assert (
        f"dns {URL}: 1 address (10.0.0.5), resolved 1.5s ago; CANNOT RESOLVE ollama: SERVFAIL "
        "(the last addresses are kept)"
    ) in text
    assert is_healthy(doc)  # it still has its backends


def test_no_address_is_a_problem_and_not_resolved_yet_is_shown() -> None:
    doc = document(resolved([]), ())
    assert [r["url"] for r in doc["backends"]] == ["http://static:1"]
    assert problems(doc) == [f"backend {URL} resolves to no address"]
    assert f"dns {URL}: 0 addresses, resolved 1.5s ago" in format_status(doc)
    assert f"dns {URL}: not resolved yet" in format_status(document(resolved(None), ()))


def test_no_discovery_section_without_a_dns_table() -> None:
    cfg = Config(llm=LLMConfig(backends=(BackendConfig(url="http://a:1"),)))
    doc = aggregate_status(master={"pid": 1}, workers=[], cfg=cfg, restarts_total=0)
    assert "discovery" not in doc and [r["url"] for r in doc["backends"]] == ["http://a:1"]


def test_metrics_count_each_tables_addresses_and_failures() -> None:
    other = {**resolved(None)[0], "url": "http://other:1"}
    fams = parse(render({"discovery": [*resolved(["10.0.0.5"], "SERVFAIL"), other]}))
    assert fams["chatd_backend_addresses"].value(table=URL) == 1
    assert len(fams["chatd_backend_addresses"].samples) == 1  # none before the first answer
    assert fams["chatd_backend_resolution_failing"].value(table=URL) == 1
    assert fams["chatd_backend_resolution_failing"].value(table="http://other:1") == 0
    assert "chatd_backend_addresses" not in render({})
