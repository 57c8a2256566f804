"""The backends a worker uses: its static ``[[llm.backends]]`` tables, and one backend per
address of each table with ``discover = "dns"``. Pure logic, no I/O.

A dns table is not a backend itself: every address its host name resolves to is one, with the
table's settings (``api``, ``api_key``, ``max_parallel``, ``max_parallel_embed``) and the URL
of the table with the address in place of the name (``http://ollama:11434`` resolving to
10.0.0.5 gives ``http://10.0.0.5:11434``). The master resolves the names
(:mod:`chatd.master.discovery`) and tells every worker the addresses of each table as
``backends {sets: {table URL: [address, ...]}}``; :meth:`BackendTable.apply` turns that into
entries.

**One table, kept on both sides of a link.** A worker's relay and slots name a backend by its
index in the worker's table; the master names it by its *key* in the slot granter. The worker
keeps its table; the master keeps a replica of it per worker (to turn an index into a key and
back). Both start from the worker's configuration (its static tables, in order: no address is
known yet) and apply the same ``backends`` messages in the same order, so they agree at every
message of the link.

**Append-only.** An entry never moves and never changes meaning: an address that disappears
is *retired* (kept, marked not live: no new requests go to it, those in flight finish), and
one that comes back is *revived* at its old index. So an index in any message means the same
backend whenever the message was sent (a release sent before the worker learnt of a removal,
a grant sent before it learnt of an addition: the master sends the ``backends`` message
before anything that depends on it), and no acknowledgement is needed. A table grows by the
distinct addresses its worker sees in its life, a few hundred bytes each.

**Keys.** A static table's key is its URL (:func:`chatd.stats.backend_keys`, as without
discovery); an address's key is its URL: the daemon-wide slot pool of that server, whichever
worker or generation uses it, so its ``max_parallel`` holds across all of them. An address
that is already a static table's URL is skipped (that server has its pool), and one resolved
by two dns tables belongs to the first of them in the configuration.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from chatd.config_schema import BackendConfig
from chatd.stats import backend_keys

__all__ = ["BackendTable", "Change", "Entry", "address_url", "is_dns"]


def is_dns(b: BackendConfig) -> bool:
    """Whether ``b`` is a table whose addresses are discovered (``discover = "dns"``)."""
    return b.discover == "dns"


def address_url(table_url: str, address: str) -> str:
    """The URL of ``address`` (an IP address) as a backend of the dns table ``table_url``:
    its scheme and port (the scheme's default when it has none), the address for the host."""
    parts = urlsplit(table_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{address}]" if ":" in address else address
    return f"{parts.scheme}://{host}:{port}"


def _normal(address: object) -> str | None:
    """``address`` as ipaddress writes it (``fd00::5``, not ``fd00:0::5``), or None when it is
    not an IP address (a malformed message is never a backend)."""
    if not isinstance(address, str):
        return None
    try:
        return ipaddress.ip_address(address).compressed
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Entry:
    """One backend of a :class:`BackendTable`.

    Attributes:
        key: its name in the master's slot granter (see the module).
        config: what the relay connects to: a static table as configured, or a dns table's
            settings with ``url`` the address's URL (and ``discover = "static"``).
        source: the index of its ``[[llm.backends]]`` table in the configuration.
        origin: the dns table's URL for an address; None for a static table.
        live: False once retired (its address disappeared): no new requests go to it.
    """

    key: str
    config: BackendConfig
    source: int
    origin: str | None = None
    live: bool = True


@dataclass(slots=True)
class Change:
    """What one :meth:`BackendTable.apply` did, by index; ``skipped``: the ``(address URL,
    table URL)`` pairs left out because another entry already is that server."""

    added: list[int] = field(default_factory=list)
    retired: list[int] = field(default_factory=list)
    revived: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.retired or self.revived)


class BackendTable:
    """A worker's backends, in index order (see the module).

    Args:
        tables: the worker's ``[[llm.backends]]``, in configuration order. The static ones
            are the first entries, in that order; the dns ones get entries from
            :meth:`apply`.
    """

    def __init__(self, tables: Sequence[BackendConfig]) -> None:
        self.tables = tuple(tables)
        static = [(i, b) for i, b in enumerate(self.tables) if not is_dns(b)]
        keys = backend_keys(b.url for _, b in static)
        self.entries: list[Entry] = [
            Entry(key, b, i) for key, (i, b) in zip(keys, static, strict=True)
        ]
        self._static = frozenset(keys)
        self._by_key = {e.key: n for n, e in enumerate(self.entries)}  # key -> live entry
        self._by_pair: dict[tuple[int, str], int] = {}  # (dns source, key) -> its entry

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def keys(self) -> list[str]:
        """Each entry's key, by index (retired ones too)."""
        return [e.key for e in self.entries]

    @property
    def configs(self) -> list[BackendConfig]:
        """Each entry's config, by index (retired ones too)."""
        return [e.config for e in self.entries]

    def live(self) -> list[int]:
        """The indexes of the live entries, in order."""
        return [n for n, e in enumerate(self.entries) if e.live]

    def index_of(self, key: str) -> int | None:
        """The index of the live entry named ``key``, or None."""
        n = self._by_key.get(key)
        return n if n is not None and self.entries[n].live else None

    def find(self, key: str) -> int | None:
        """The index of the entry named ``key``: the live one, else the last one retired."""
        return self._by_key.get(key)

    def dns_tables(self) -> list[tuple[int, BackendConfig]]:
        """The dns tables, with their index in the configuration."""
        return [(i, b) for i, b in enumerate(self.tables) if is_dns(b)]

    def apply(self, sets: Mapping[str, Sequence[str]]) -> Change:
        """Make the entries of each dns table named in ``sets`` (by its URL, as configured)
        its addresses there: new ones are added, gone ones retired, returning ones revived.
        A dns table not named keeps its entries. Deterministic: the master's replica and the
        worker's table, given the same ``sets`` in the same order, change alike."""
        change = Change()
        owner: dict[str, int] = {}  # key -> the dns table it belongs to, from now on
        wanted: dict[str, Entry] = {}
        for source, table in self.dns_tables():
            if table.url in sets:
                addresses = [_normal(a) for a in sets[table.url]]
                urls = [address_url(table.url, a) for a in addresses if a is not None]
            else:
                urls = [e.key for e in self.entries if e.live and e.source == source]
            for url in dict.fromkeys(urls):
                if url in self._static or url in owner:
                    change.skipped.append((url, table.url))
                    continue
                owner[url] = source
                config = dataclasses.replace(table, url=url, discover="static")
                wanted[url] = Entry(url, config, source, table.url)
        for n, e in enumerate(self.entries):
            if e.live and e.origin is not None and owner.get(e.key) != e.source:
                self.entries[n] = dataclasses.replace(e, live=False)
                change.retired.append(n)
        for key, entry in wanted.items():
            found = self._by_pair.get((entry.source, key))
            if found is None:
                found = self._by_pair[(entry.source, key)] = len(self.entries)
                self.entries.append(entry)
                change.added.append(found)
            elif not self.entries[found].live:
                self.entries[found] = dataclasses.replace(self.entries[found], live=True)
                change.revived.append(found)
            self._by_key[key] = found
        return change
