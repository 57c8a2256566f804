"""The value checks of chatd's configuration keys: pure functions, one per kind of value.

Each :data:`Check` returns what is wrong with a value (one phrase, never quoting a secret), or
None. An address is checked as the workers will use it (the relay's URL split, redis-py's URL
parser, the listening socket), so ``chatd --check`` refuses every value a worker would refuse
at start. :func:`parse_bind` is also what the master binds with, :func:`parse_redis_url` what the
Redis session store connects with (here, not in ``chatd.store``: the master checks configs and
never imports the store).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

Check = Callable[[Any], str | None]
"""A value check: returns what is wrong with the value, or None when it is fine."""


def at_least(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo:g}"


def positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def check_header_name(v: str) -> str | None:
    """An HTTP header name (RFC 9110 token), or "" for none."""
    return None if re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]*", v) else "is not a header name"


def check_networks(v: tuple[str, ...]) -> str | None:
    """Each an IP network in CIDR form (an address alone: that address)."""
    for item in v:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"{item!r} is not an IP network (CIDR, e.g. 10.0.0.0/8)"
    return None


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else "must be one of " + ", ".join(map(repr, choices))


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
"""A host name as resolvers take it: ASCII labels of letters, digits, ``-`` (not at either end)
and ``_`` (container service names), dot-separated; IPv4 literals match too. Non-ASCII names
must be given in their IDNA form (``xn--...``): the relay writes the name into a latin-1 Host
header."""


def check_host(host: str) -> None:
    """Raise ValueError unless ``host`` is a host name, an IPv4 or an IPv6 literal (no brackets)."""
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not a host name or an IP address") from None


def parse_port(text: str, lo: int = 0) -> int:
    """``text`` as a port number in ``lo..65535``; raises ValueError.

    ASCII digits only: ``str.isdigit`` also takes ``"²"`` and other digits ``int`` refuses.
    """
    if not re.fullmatch(r"[0-9]{1,5}", text) or not lo <= int(text) <= 65535:
        raise ValueError(f"port must be {lo}..65535, not {text!r}")
    return int(text)


def parse_bind(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:8000`` for IPv6) into host and port; raises ValueError.

    Everything :func:`chatd.master.listeners.bind_slots` needs before it resolves the host is
    checked here, so an address that passes fails at start only when the host does not resolve.
    """
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s:
        raise ValueError("expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError("expected HOST:PORT with a host")
    port = parse_port(port_s)
    check_host(host)
    return host, port


def check_bind(v: str) -> str | None:
    try:
        parse_bind(v)
    except ValueError as exc:
        return f'{exc} (for example "0.0.0.0:8000")'
    return None


def check_socket_path(v: str) -> str | None:
    """A path the master can bind a Unix socket to (sun_path: 107 bytes and a NUL)."""
    raw = v.encode("utf-8", "surrogateescape")
    if not raw or b"\0" in raw:
        return "must be a path (not empty, no NUL character)"
    if len(raw) > 107:
        return f"must be at most 107 bytes long (a Unix socket address), it has {len(raw)}"
    return None


def check_mode(v: str) -> str | None:
    return None if re.fullmatch(r"0?[0-7]{3}", v) else 'must be an octal mode such as "0660"'


def _check_authority(netloc: str, *, userinfo: bool) -> None:
    """Raise ValueError unless ``netloc`` is ``[USER[:PASSWORD]@]HOST[:PORT]`` with a valid host
    (an IPv6 literal in brackets) and, when given, a port in 1..65535 (nothing listens on 0)."""
    creds, at, hostport = netloc.rpartition("@")
    if at and not userinfo:
        raise ValueError("no USER:PASSWORD@ (the relay would not send it: use api_key)")
    if re.search(r"[\s/?#@]", creds):
        raise ValueError(f"bad user info {creds!r}")
    if hostport.startswith("["):
        host, bracket, rest = hostport[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad IPv6 literal in {hostport!r}")
        ipaddress.IPv6Address(host.partition("%")[0])  # a zone (%eth0) is the resolver's
        port = rest[1:] if rest else None
    else:
        host, colon, port_s = hostport.partition(":")
        port = port_s if colon else None
        if not host:
            raise ValueError("no host")
        if not _HOSTNAME.fullmatch(host) or len(host) > 253:
            raise ValueError(f"{host!r} is not a host name or an IP address")
    if port is not None:
        parse_port(port, lo=1)


def check_store(v: str) -> str | None:
    what = (
        'must be "sqlite:///ABSOLUTE/PATH", "sqlite:relative/path", "redis://HOST:PORT/DB", '
        '"redis+sentinel://HOST:PORT,HOST:PORT/MASTER[/DB]" or "redis+cluster://HOST:PORT,..."'
    )
    if v.startswith("sqlite:"):
        rest = v[len("sqlite:") :]
        path = rest[2:] if rest.startswith("///") else rest  # SessionsConfig.sqlite_path
        if not path or path.endswith("/"):
            return f"{what}: no SQLite file named"
        if "\0" in path:
            return f"{what}: a NUL character in the path"
        return None
    try:
        parse_redis_url(v)
    except ValueError as exc:
        return f"{what}: {exc}" if str(exc) else what
    return None


@dataclass(frozen=True, slots=True)
class RedisUrl:
    """A Redis store URL, split by :func:`parse_redis_url` (what the Redis store connects to).

    ``kind`` "single": one server (``redis://``, ``rediss://``), ``hosts`` has one entry;
    "sentinel": ``hosts`` are the Sentinels, asked for the master named ``master``;
    "cluster": ``hosts`` are seed nodes of a Redis Cluster (the others are discovered).
    ``username``/``password`` (percent-decoded) authenticate to the data nodes (the master and
    replicas, or every Cluster node); Sentinels are asked without credentials.
    """

    kind: str
    hosts: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    master: str = ""


_REDIS_URL = re.compile(r"(rediss?)(\+sentinel|\+cluster)?://([^/?#]*)(/[^?#]*)?")
_REDIS_PATH = {  # the path of each kind: [/MASTER][/DB][/]
    "single": re.compile(r"(?:/([0-9]+))?/?"),
    "sentinel": re.compile(r"/([A-Za-z0-9._-]+)(?:/([0-9]+))?/?"),
    "cluster": re.compile(r"(?:/([0-9]+))?/?"),
}


def _host_port(hostport: str, default: int) -> tuple[str, int]:
    """``HOST[:PORT]`` or ``[IPv6][:PORT]`` (checked by :func:`_check_authority` first)."""
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        return host, int(rest[1:]) if rest else default
    host, colon, port = hostport.partition(":")
    return host, int(port) if colon else default


def parse_redis_url(url: str) -> RedisUrl:
    """Split ``redis://[USER:PASSWORD@]HOST[:PORT][/DB]`` (``rediss://``: TLS),
    ``redis+sentinel://[USER:PASSWORD@]HOST[:PORT],HOST[:PORT].../MASTER[/DB]`` (Sentinels,
    port 26379 by default) or ``redis+cluster://[USER:PASSWORD@]HOST[:PORT],...`` (Cluster seed
    nodes; database 0 only); ``rediss+sentinel://``, ``rediss+cluster://`` for TLS. Raises
    ValueError saying what is wrong (an empty message: not a Redis URL at all).

    What redis-py refuses when the worker connects is refused here, at ``chatd --check``.
    """
    m = _REDIS_URL.fullmatch(url)
    if not m:
        raise ValueError("")
    scheme, variant, netloc, path = m.group(1), m.group(2) or "", m.group(3), m.group(4) or ""
    kind = variant[1:] or "single"
    creds, _, hostlist = netloc.rpartition("@")
    if re.search(r"[\s/?#@]", creds):
        raise ValueError(f"bad user info {creds!r}")
    hosts: list[tuple[str, int]] = []
    for hostport in [hostlist] if kind == "single" else hostlist.split(","):
        _check_authority(hostport, userinfo=False)
        hosts.append(_host_port(hostport, 26379 if kind == "sentinel" else 6379))
    where = _REDIS_PATH[kind].fullmatch(path)
    if where is None:
        if kind == "sentinel":
            raise ValueError(f"{path!r} is not /MASTER[/DB] (the name the Sentinels monitor)")
        raise ValueError(f"{path!r} is not /DB (a database number)")
    master = where.group(1) if kind == "sentinel" else ""
    db = int(where.groups()[-1] or 0)  # the last group is the database in every kind
    if kind == "cluster" and db != 0:
        raise ValueError("a Redis Cluster has database 0 only")
    user, colon, password = creds.partition(":")
    return RedisUrl(
        kind,
        tuple(hosts),
        tls=scheme == "rediss",
        username=unquote(user) if user else None,
        password=unquote(password) if colon else None,
        db=db,
        master=master,
    )


def check_url(v: str) -> str | None:
    """A backend's base URL: what the relay's Pool and aiohttp (yarl) both accept.

    The relay splits it with ``urlsplit`` (whose ``.port`` raises on ``:abc`` or ``:99999``)
    and writes the host into a latin-1 request head when a worker starts; a URL refused there
    would crash every worker at start, so it is refused here, at ``chatd --check``.
    """
    what = 'must be "http://HOST:PORT"'
    m = re.fullmatch(r"https?://([^/?#]*)/?", v)
    if not m:
        return what
    try:
        _check_authority(m.group(1), userinfo=False)
    except ValueError as exc:
        return f"{what}: {exc}"
    return None


def url_host(url: str) -> str:
    """The host of a backend URL that :func:`check_url` accepted, without IPv6 brackets."""
    hostport = url.split("://", 1)[1].rstrip("/")
    if hostport.startswith("["):
        return hostport[1:].partition("]")[0]
    return hostport.partition(":")[0]


def check_discoverable(url: str) -> str | None:
    """What keeps a backend URL (valid for :func:`check_url`) from ``discover = "dns"``: an
    ``https`` URL (each address is connected to by its IP, which the server's certificate does
    not name) or a host that is an IP literal (there is nothing to resolve)."""
    if url.startswith("https:"):
        return (
            'discover = "dns" needs an http:// URL (each address is connected to by its IP, '
            "which a TLS certificate does not name)"
        )
    host = url_host(url)
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    return f'discover = "dns" needs a host name to resolve, not the address {host!r}'


def parse_nameserver(v: str) -> tuple[str, int]:
    """``ADDRESS`` or ``ADDRESS:PORT`` (``[IPv6]:PORT``; a bare IPv6 address takes port 53)
    as ``(address, port)``; raises ValueError."""
    if v.startswith("["):
        address, bracket, rest = v[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{v!r} is not ADDRESS[:PORT]")
        port = parse_port(rest[1:], lo=1) if rest else 53
    elif v.count(":") == 1:
        address, _, port_s = v.partition(":")
        port = parse_port(port_s, lo=1)
    else:
        address, port = v, 53
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{address!r} is not an IP address") from None
    return address, port


def check_nameservers(v: tuple[str, ...]) -> str | None:
    """Each an IP address with an optional port (``127.0.0.1:5353``, ``[::1]:53``)."""
    for item in v:
        try:
            parse_nameserver(item)
        except ValueError as exc:
            return f'{exc} (expected ADDRESS or ADDRESS:PORT, e.g. "10.96.0.10:53")'
    return None


def check_secret(v: str) -> str | None:
    """A credential sent in an HTTP header: visible ASCII only (a CR or LF would inject
    header lines, a space at either end is a paste error). The message never quotes it."""
    if v and not re.fullmatch(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?", v):
        return "must be printable ASCII without spaces at either end or line breaks"
    return None


def check_level(v: str) -> str | None:
    return one_of("debug", "info", "warning", "error")(v.lower())


def check_keep_alive(v: str) -> str | None:
    ok = re.fullmatch(r"-?\d+(\.\d+)?(ns|us|ms|s|m|h)?", v) or re.fullmatch(r"(\d+[hms])+", v)
    return None if ok else 'must be a duration such as "5m", "30s" or "-1" (forever)'


def redacted(url: str) -> str:
    """The URL without its password, fit for errors and logs (a store URL may carry one)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()
