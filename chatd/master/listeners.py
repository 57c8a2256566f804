"""The per-slot listening sockets: one SO_REUSEPORT socket per worker slot, all bound by the master.

nginx's layout (``ngx_clone_listening``): the master creates and keeps every slot's socket for its
whole life; the worker of slot *i*, and each of its replacements, accepts from socket *i*. A dead
worker's queued connections therefore wait for its replacement instead of being reset, which is
what happens when the only holder of a SO_REUSEPORT socket closes it (gunicorn #3612).

Detecting a taken port
----------------------
``bind()`` fails with EADDRINUSE when the port is held by a socket *without* SO_REUSEPORT, or by
another user. But SO_REUSEPORT sockets of the *same* user share a port silently: a second chatd
(or anything else of ours) would quietly receive part of our traffic. So :func:`bind_slots`
also reads the kernel's table of TCP sockets (``/proc/net/tcp`` and ``tcp6``, the current
network namespace):

1. *before* binding, any socket in LISTEN on an overlapping address and the same port refuses
   the start. Checking first matters: binding into another process's group, even briefly, would
   steal connections from it and reset them when we close (nginx ticket #1300), so we never bind
   a probe;
2. *after* binding, every LISTEN entry on the port must be one of our own sockets (compared by
   inode), which closes the race with a process that bound between step 1 and our bind.

Addresses overlap when they are equal (an IPv4-mapped IPv6 address equals its IPv4 address) or
when either is a wildcard (``0.0.0.0`` or ``::``, which may be dual-stack).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Sequence

from chatd.config_checks import parse_bind
from chatd.errors import ChatdError

BACKLOG = 1024
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


class BindError(ChatdError):
    """The slot sockets cannot be created: the port is taken, or the address is not ours."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _decode_proc_address(hexaddr: str) -> IPAddress:
    """Decode an address as ``/proc/net/tcp*`` prints it: 32-bit words in host byte order."""
    raw = b"".join(
        int(hexaddr[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hexaddr), 8)
    )
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _overlap(a: IPAddress, b: IPAddress) -> bool:
    return a.is_unspecified or b.is_unspecified or a == b


def listening_sockets(address: str, port: int) -> dict[int, str]:
    """TCP sockets in LISTEN whose address overlaps ``address`` on ``port``: inode -> address.

    Reads ``/proc/net/tcp`` and ``/proc/net/tcp6`` (a missing file, e.g. IPv6 disabled, is
    skipped).
    """
    ours = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ours, ipaddress.IPv6Address) and ours.ipv4_mapped is not None:
        ours = ours.ipv4_mapped
    found: dict[int, str] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path, encoding="ascii") as table:
                lines = table.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            hexaddr, _, hexport = fields[1].partition(":")
            if fields[3] != _LISTEN or int(hexport, 16) != port:
                continue
            theirs = _decode_proc_address(hexaddr)
            if _overlap(ours, theirs):
                host = f"[{theirs}]" if theirs.version == 6 else str(theirs)
                found[int(fields[9])] = f"{host}:{port}"
    return found


def _owner(inode: int) -> str:
    """Best effort: ``pid 123 (nginx)``, the process holding socket ``inode``, else ``""``."""
    target = f"socket:[{inode}]"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                if os.readlink(fd.path) == target:
                    with open(f"/proc/{entry.name}/comm", encoding="utf-8") as comm:
                        return f"pid {entry.name} ({comm.read().strip()})"
        except OSError:
            continue  # gone, or not ours to look at
    return ""


def _taken(bind: str, others: dict[int, str]) -> BindError:
    inode, where = next(iter(others.items()))
    owner = _owner(inode)
    holder = f"{where} is held by {owner}" if owner else f"{where} is listening"
    return BindError(
        f"cannot listen on {bind}: the port is already in use ({holder}); "
        "stop that process or choose another [server] bind"
    )


def tcp_migrate_req() -> int | None:
    """``net.ipv4.tcp_migrate_req`` (Linux >= 5.14), or None when the kernel lacks it.

    With 0, the connections queued on a slot socket that is closed (scaling down) are reset;
    with 1 the kernel moves them to the other sockets of the group.
    """
    try:
        with open("/proc/sys/net/ipv4/tcp_migrate_req", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def bind_slots(
    bind: str,
    count: int,
    backlog: int = BACKLOG,
    existing: Sequence[socket.socket] = (),
) -> list[socket.socket]:
    """Create ``count`` listening SO_REUSEPORT sockets on ``bind`` (``HOST:PORT``).

    Port 0 picks a free port for the first socket and binds the others to the same one.
    With ``existing`` (our slot sockets already listening: scaling up), the new sockets join
    their group, on their port; only sockets that are not ours count as "taken".

    Returns:
        the new sockets, listening, blocking, in slot order.

    Raises:
        BindError: the host does not resolve, the port is taken (by anyone, see the module
            docstring), or the address cannot be bound; the message says which.
    """
    host, port = parse_bind(bind)
    if existing:
        port = existing[0].getsockname()[1]
    ours = {os.fstat(s.fileno()).st_ino for s in existing}
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise BindError(f"cannot listen on {bind}: {exc.strerror}") from None
    address = str(sockaddr[0])
    if port:
        others = {i: a for i, a in listening_sockets(address, port).items() if i not in ours}
        if others:
            raise _taken(bind, others)
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address, port, *sockaddr[2:]))
            port = sock.getsockname()[1]
            sock.listen(backlog)
        mine = ours | {os.fstat(s.fileno()).st_ino for s in socks}
        others = {i: a for i, a in listening_sockets(address, port).items() if i not in mine}
        if others:
            raise _taken(bind, others)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise BindError(f"cannot listen on {bind}: {exc.strerror or exc}") from None
    except BindError:
        for sock in socks:
            sock.close()
        raise
    return socks
