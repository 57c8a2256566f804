"""The table of a worker's backends (chatd.backendtable): static tables, and one backend per
address of each dns table, append-only, the same on both sides of a link."""

from __future__ import annotations

from chatd.backendtable import BackendTable, address_url
from chatd.config import BackendConfig

DNS = BackendConfig(
    url="http://ollama:11434", discover="dns", max_parallel=3, max_parallel_embed=1, api_key="k"
)
STATIC = BackendConfig(url="http://gpu-box:11434/", max_parallel=2)


def test_a_dns_table_is_no_backend_until_it_has_addresses() -> None:
    table = BackendTable([DNS, STATIC])
    assert table.keys == ["http://gpu-box:11434"] and table.live() == [0]
    assert table.entries[0].source == 1 and table.entries[0].origin is None
    assert table.dns_tables() == [(0, DNS)]


def test_each_address_is_a_backend_with_the_tables_settings() -> None:
    table = BackendTable([DNS, STATIC])
    change = table.apply({DNS.url: ["10.0.0.6", "10.0.0.5", "fd00:0::7", "10.0.0.5"]})
    assert change.added == [1, 2, 3] and not change.retired and not change.revived
    assert table.keys == [
        "http://gpu-box:11434",
        "http://10.0.0.6:11434",
        "http://10.0.0.5:11434",
        "http://[fd00::7]:11434",
    ]
    e = table.entries[3]
    assert (e.source, e.origin, e.live) == (0, DNS.url, True)
    assert e.config.url == e.key and e.config.discover == "static"
    assert (e.config.max_parallel, e.config.max_parallel_embed, e.config.api_key) == (3, 1, "k")


def test_append_only_gone_addresses_retire_returning_ones_revive() -> None:
    """An index never changes meaning: retired entries stay, a returning address gets its
    old index back, a new one is appended."""
    table = BackendTable([DNS])
    table.apply({DNS.url: ["10.0.0.5", "10.0.0.6"]})
    change = table.apply({DNS.url: ["10.0.0.6", "10.0.0.7"]})
    assert (change.added, change.retired, change.revived) == ([2], [0], [])
    assert table.live() == [1, 2] and table.index_of("http://10.0.0.5:11434") is None
    assert table.find("http://10.0.0.5:11434") == 0  # a late grant still finds it
    change = table.apply({DNS.url: ["10.0.0.5"]})
    assert (change.added, sorted(change.retired), change.revived) == ([], [1, 2], [0])
    assert table.live() == [0] and len(table) == 3
    assert not table.apply({DNS.url: ["10.0.0.5"]})  # the same set: no change
    assert not table.apply({})  # a table not named keeps its addresses
    assert table.apply({DNS.url: []}).retired == [0] and table.live() == []


def test_an_address_that_is_already_a_backend_is_skipped() -> None:
    """One server, one slot pool: a static table's URL, or a first dns table's address."""
    other = BackendConfig(url="http://ollama-b:11434", discover="dns")
    static = BackendConfig(url="http://10.0.0.9:11434")
    table = BackendTable([static, DNS, other])
    change = table.apply({DNS.url: ["10.0.0.9", "10.0.0.5"], other.url: ["10.0.0.5", "10.0.0.6"]})
    assert table.keys == ["http://10.0.0.9:11434", "http://10.0.0.5:11434", "http://10.0.0.6:11434"]
    assert change.skipped == [
        ("http://10.0.0.9:11434", DNS.url),
        ("http://10.0.0.5:11434", other.url),
    ]
    # The first table lets go of 10.0.0.5: the second one's entry for it takes over.
    change = table.apply({DNS.url: [], other.url: ["10.0.0.5", "10.0.0.6"]})
    assert change.retired == [1] and change.added == [3]
    assert table.index_of("http://10.0.0.5:11434") == 3 and table.entries[3].source == 2


def test_replicas_given_the_same_sets_agree_index_for_index() -> None:
    """The master's replica and the worker's table: same configuration, same messages."""
    steps = [
        {DNS.url: ["10.0.0.5"]},
        {DNS.url: ["10.0.0.5", "10.0.0.6", "10.0.0.7"]},
        {DNS.url: ["10.0.0.7"]},
        {DNS.url: []},
        {DNS.url: ["10.0.0.6", "10.0.0.8"]},
    ]
    worker, replica = BackendTable([STATIC, DNS]), BackendTable([STATIC, DNS])
    for sets in steps:
        assert worker.apply(sets) == replica.apply(sets)
    assert worker.entries == replica.entries


def test_malformed_addresses_are_never_backends() -> None:
    table = BackendTable([DNS])
    table.apply({DNS.url: ["not-an-ip", 7, "10.0.0.5"]})  # type: ignore[list-item]
    assert table.keys == ["http://10.0.0.5:11434"]


def test_address_url_keeps_scheme_and_port() -> None:
    assert address_url("http://ollama:11434", "10.0.0.5") == "http://10.0.0.5:11434"
    assert address_url("http://ollama", "fd00::1") == "http://[fd00::1]:80"
    assert address_url("http://ollama:8080/", "10.0.0.5") == "http://10.0.0.5:8080"
