"""chatd.master.peercred: who may use the control socket."""

from __future__ import annotations

import os
import socket

from chatd.master.peercred import Peer, groups_of, peer_of, refusal


def test_rules() -> None:
    def check(uid: int, gid: int, groups: set[int]) -> str | None:
        return refusal(Peer(1, uid, gid), master_uid=1000, group=50, groups=groups)

    assert check(0, 0, set()) is None  # root
    assert check(1000, 1000, set()) is None  # the daemon's own uid
    assert check(2000, 50, set()) is None  # primary group is the socket's
    assert check(2000, 2000, {7, 50}) is None  # supplementary group
    why = check(2000, 2000, {7})
    assert why is not None and why.startswith("permission denied: uid 2000")


def test_peer_of_a_socketpair_is_us() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert peer_of(a) == Peer(os.getpid(), os.getuid(), os.getgid())
    assert groups_of(os.getpid()) == set(os.getgroups())
    assert groups_of(-1) == set()
