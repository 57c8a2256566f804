"""Resolving a dns backend table's host name, for the master (``resolve`` over the link).

:func:`resolve` asks for the name's IPv4 and IPv6 addresses (A and AAAA records) and says
whether the answer is one to act on (:class:`Resolution`):

* ``ok`` with addresses: the name's addresses;
* ``ok`` without any: the name has none (NXDOMAIN, or no A or AAAA record): Kubernetes answers
  so for a headless Service with no ready pod;
* not ``ok``: the resolution failed (a timeout, SERVFAIL, no server reachable); ``error`` says
  why. The master then keeps the addresses it had (:mod:`chatd.master.discovery`).

Two resolvers:

* no ``nameservers`` (the default): the system's, ``getaddrinfo`` in the event loop's
  executor, as every other connection of chatd's resolves: ``/etc/hosts``, ``resolv.conf``
  with its search list (a short name such as ``ollama-headless`` finds
  ``ollama-headless.NAMESPACE.svc.cluster.local`` in a pod), nsswitch. ``EAI_NONAME`` and
  ``EAI_NODATA`` are the name having no address; any other error is a failure;
* ``nameservers`` (``ADDRESS[:PORT]``, checked by ``chatd --check``): those servers, asked
  with dnspython's asyncio resolver for A and AAAA records of the name as given (absolute:
  no search list), each query retried across them within :data:`LIFETIME`. The answer is a
  failure if either query fails: half an answer would drop the other family's addresses.

Never raises (but CancelledError); takes at most :data:`LIFETIME` seconds (a ``getaddrinfo``
still running then goes on in its thread, its answer dropped).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from chatd.config_checks import parse_nameserver

LIFETIME = 3.0
"""Seconds one resolution may take, all queries and retries included."""

_NO_ADDRESS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


@dataclass(frozen=True, slots=True)
class Resolution:
    """The outcome of :func:`resolve` (see the module): ``addresses`` as ``ipaddress`` writes
    them, sorted, without duplicates."""

    ok: bool
    addresses: tuple[str, ...] = ()
    error: str = ""


async def resolve(
    host: str, nameservers: Sequence[str] = (), lifetime: float = LIFETIME
) -> Resolution:
    """The addresses of ``host`` (see the module)."""
    try:
        async with asyncio.timeout(lifetime):
            if nameservers:
                return await _ask(host, nameservers, lifetime)
            return await _getaddrinfo(host)
    except TimeoutError:
        return Resolution(False, error=f"no answer within {lifetime:g}s")


async def _getaddrinfo(host: str) -> Resolution:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _NO_ADDRESS:
            return Resolution(True, error=exc.strerror or "no such name")
        return Resolution(False, error=exc.strerror or str(exc))
    except (OSError, UnicodeError) as exc:
        return Resolution(False, error=str(exc) or type(exc).__name__)
    return Resolution(True, _addresses(str(info[4][0]) for info in infos))


async def _ask(host: str, nameservers: Sequence[str], lifetime: float) -> Resolution:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [
        dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in nameservers
    ]
    resolver.lifetime = lifetime
    resolver.cache = None  # every question is a fresh one: the master asks on its interval
    name = host if host.endswith(".") else host + "."
    found: list[str] = []
    nxdomain = ""
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        try:
            answer = await resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            nxdomain = "no such name (NXDOMAIN)"
            break  # the name does not exist: no record of any type
        except dns.resolver.NoAnswer:
            continue  # the name has no record of this type
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            return Resolution(False, error=str(exc) or type(exc).__name__)
        found += [r.to_text() for r in answer]
    if not found:
        return Resolution(True, error=nxdomain or "no A or AAAA record")
    return Resolution(True, _addresses(found))


def _addresses(texts: Iterable[str]) -> tuple[str, ...]:
    """Each text an IP address (an IPv6 zone dropped), normalized, sorted, once."""
    out = set()
    for text in texts:
        try:
            out.add(ipaddress.ip_address(text.partition("%")[0]).compressed)
        except ValueError:
            continue
    return tuple(sorted(out))
