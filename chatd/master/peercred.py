"""Who may use the control socket: the peer's credentials, checked with SO_PEERCRED.

The socket file's mode (``[control] mode``, 0660 by default) is the first gate; this is the
second, so a socket made wider by mistake (0666, or a directory anyone can enter) still only
obeys its operators. A peer is allowed when it is root, runs as the master's uid, or belongs
to the socket file's group (as its primary group or a supplementary one, read from
``/proc/PID/status``: SO_PEERCRED gives only the primary gid).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of a Unix socket, when it connected."""

    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    """The credentials of ``sock``'s peer (SO_PEERCRED); raises OSError."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return Peer(*_UCRED.unpack(raw))


def groups_of(pid: int) -> set[int]:
    """The supplementary groups of ``pid`` (empty when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def refusal(peer: Peer, *, master_uid: int, group: int, groups: set[int]) -> str | None:
    """Why ``peer`` may not use the control socket, or None when it may.

    Args:
        peer: its credentials.
        master_uid: the master's uid.
        group: the socket file's gid.
        groups: the peer's supplementary groups.
    """
    if peer.uid in (0, master_uid) or peer.gid == group or group in groups:
        return None
    return (
        f"permission denied: uid {peer.uid} is neither root, nor the daemon's uid "
        f"{master_uid}, nor in the control socket's group {group}"
    )
