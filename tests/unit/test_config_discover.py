"""Backends from DNS in the configuration: discover, discover_interval, [llm] nameservers;
what chatd --check refuses, named by key and line."""

from __future__ import annotations

import pytest

from chatd import config
from chatd.config_checks import parse_nameserver
from chatd.errors import ConfigError


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config.parse(text, "/x/chatd.toml")
    return err.value.problems


def test_defaults_are_static_every_five_seconds_and_the_system_resolver() -> None:
    cfg = config.Config()
    assert cfg.llm.backends[0].discover == "static"
    assert cfg.llm.backends[0].discover_interval == 5.0
    assert cfg.llm.nameservers == ()


def test_a_dns_table_and_its_nameservers_are_taken() -> None:
    cfg = config.parse(
        '[llm]\nnameservers = ["10.96.0.10", "127.0.0.1:5353", "[::1]:53"]\n'
        '[[llm.backends]]\nurl = "http://ollama-headless:11434"\ndiscover = "dns"\n'
        "discover_interval = 0.5\nmax_parallel = 2\n"
    )
    b = cfg.llm.backends[0]
    assert (b.discover, b.discover_interval, b.max_parallel) == ("dns", 0.5, 2)
    assert cfg.llm.nameservers == ("10.96.0.10", "127.0.0.1:5353", "[::1]:53")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://10.0.0.5:11434", "needs a host name to resolve, not the address '10.0.0.5'"),
        ("http://[fd00::5]:11434", "needs a host name to resolve, not the address 'fd00::5'"),
        ("https://ollama:443", "needs an http:// URL"),
    ],
)
def test_dns_needs_a_name_over_http(url: str, why: str) -> None:
    (problem,) = problems(f'[[llm.backends]]\nurl = "{url}"\ndiscover = "dns"\n')
    assert problem.startswith(f'/x/chatd.toml:2: llm.backends[0].url: discover = "dns" {why}')
    assert problem.endswith(f"got {url!r}")
    config.parse(f'[[llm.backends]]\nurl = "{url}"\n')  # static: fine


def test_bad_values_are_named() -> None:
    got = problems(
        '[llm]\nnameservers = ["ns.example:53"]\n'
        '[[llm.backends]]\ndiscover = "srv"\ndiscover_interval = 0\n'
    )
    assert got[0].startswith("/x/chatd.toml:2: llm.nameservers: 'ns.example' is not an IP")
    assert got[1] == (
        "/x/chatd.toml:4: llm.backends[0].discover: must be one of 'static', 'dns', got 'srv'"
    )
    assert got[2] == "/x/chatd.toml:5: llm.backends[0].discover_interval: must be > 0, got 0"


def test_parse_nameserver() -> None:
    assert parse_nameserver("10.96.0.10") == ("10.96.0.10", 53)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    assert parse_nameserver("fd00::53") == ("fd00::53", 53)
    for bad in ("127.0.0.1:0", "[::1", "[::1]x", "host:53", ""):
        with pytest.raises(ValueError):
            parse_nameserver(bad)
