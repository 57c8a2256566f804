"""Resolving a dns backend table's name (chatd.relay.resolve) against a stub DNS server on
loopback (tests/dnsstub.py): what counts as addresses, as none, and as a failure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from chatd.relay.resolve import Resolution, resolve
from tests.dnsstub import StubDNS

NAME = "ollama.chatd.test"


@pytest.fixture
def stub() -> Iterator[StubDNS]:
    with StubDNS() as s:
        yield s


def ask(stub: StubDNS, name: str = NAME, lifetime: float = 1.0) -> Resolution:
    return asyncio.run(resolve(name, [stub.address], lifetime))


def test_a_and_aaaa_records_are_the_addresses_sorted_once(stub: StubDNS) -> None:
    stub.set(NAME, ["127.0.0.3", "127.0.0.2", "fd00:0::5", "127.0.0.2"])
    assert ask(stub) == Resolution(True, ("127.0.0.2", "127.0.0.3", "fd00::5"))
    assert ask(stub, NAME.upper() + ".") == Resolution(True, ("127.0.0.2", "127.0.0.3", "fd00::5"))


def test_no_such_name_and_no_record_are_answers_without_address(stub: StubDNS) -> None:
    """NXDOMAIN (a headless Service without a ready pod) and NODATA: ok, nothing."""
    assert ask(stub) == Resolution(True, (), "no such name (NXDOMAIN)")
    stub.set(NAME, [])
    assert ask(stub) == Resolution(True, (), "no A or AAAA record")


def test_servfail_and_silence_are_failures_within_the_lifetime(stub: StubDNS) -> None:
    stub.set(NAME, ["127.0.0.2"])
    stub.servfail = True
    failed = ask(stub)
    assert not failed.ok and failed.addresses == () and failed.error
    stub.servfail, stub.silent = False, True
    t0 = time.monotonic()
    silent = ask(stub, lifetime=0.5)
    assert not silent.ok and silent.error
    assert time.monotonic() - t0 < 1.5


def test_without_nameservers_the_system_resolver_answers() -> None:
    """getaddrinfo: /etc/hosts has localhost; an unknown name has no address (not a failure:
    the machine's resolver says so, or fails; both are possible offline)."""
    assert asyncio.run(resolve("localhost")).addresses[:1] in (("127.0.0.1",), ("::1",))
    unknown = asyncio.run(resolve("no-such-host.invalid", lifetime=2.0))
    assert unknown.addresses == ()
