"""A stub DNS server on loopback for the tests: answers A and AAAA queries from a table the
test changes while it runs.

``StubDNS()`` serves UDP on ``127.0.0.1`` (a free port) from a thread until :meth:`StubDNS.stop`:
a name in ``records`` gets its addresses of the asked type (none of that type: NOERROR with an
empty answer, i.e. NODATA); a name absent gets NXDOMAIN; with ``servfail`` every query gets
SERVFAIL, with ``silent`` none gets an answer (a resolver timeout). Names are absolute and
case-insensitive (``"ollama.chatd.test."``). Answers carry a TTL of 0. ``queries`` counts the
questions received. The answers are built with dnspython's message API, a different code path
from the resolver chatd queries with.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from types import TracebackType

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class StubDNS:
    """See the module."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.servfail = False
        self.silent = False
        self.queries = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.05)  # how soon stop() is seen
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="stub-dns")

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, as ``[llm] nameservers`` takes it."""
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, addresses: list[str]) -> None:
        """``name`` resolves to ``addresses`` from now on (an empty list: NODATA)."""
        self.records[name.lower().rstrip(".") + "."] = list(addresses)

    def remove(self, name: str) -> None:
        """``name`` gets NXDOMAIN from now on."""
        self.records.pop(name.lower().rstrip(".") + ".", None)

    def start(self) -> StubDNS:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()

    def __enter__(self) -> StubDNS:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.queries += 1
            if self.silent:
                continue
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue
            self._sock.sendto(self._answer(query).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        question = query.question[0]
        addresses = self.records.get(question.name.to_text().lower())
        if addresses is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        version = 4 if question.rdtype == dns.rdatatype.A else 6
        wanted = [a for a in addresses if ipaddress.ip_address(a).version == version]
        if wanted and question.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            rrset = dns.rrset.from_text_list(question.name, 0, "IN", question.rdtype, wanted)
            response.answer.append(rrset)
        return response
