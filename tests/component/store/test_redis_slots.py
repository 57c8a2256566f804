"""The fleet's LLM slot pools in Redis (chatd.store.redis_slots), on real Redis servers.

Hosts here are :class:`SlotLeases` clients with host names of their own, as the masters of
several hosts are (each through one of its workers). Checked: a lone host gets its need plus
one spare; two hosts share a pool max-min fairly, a host over its share keeps what it cannot
give back and gives it back on its next sync; a host that stops renewing loses its slots after
the TTL; under random interleavings of three hosts that follow the master's rule (a limit
rises only with the answer, ``hold`` = max(limit, in use)) the slots in use never exceed the
pool's max and Redis never counts more held than that; and a Cluster serves a pool (its keys
share a hash tag).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from dataclasses import dataclass

import pytest
import redis

from chatd.errors import StoreError
from chatd.store import redis_slots
from chatd.store.redis_slots import PoolAnswer, PoolAsk, SlotLeases, pool_key

pytestmark = pytest.mark.timeout(60)

MAX = 4


def _backend() -> str:
    """A backend URL of this test's own: each test has pools nobody else touches."""
    return f"http://10.0.0.{random.randint(1, 254)}:11434/{secrets.token_hex(4)}"


SEQ = iter(range(1, 1_000_000))  # each sync's seq: growing, as a master's


@pytest.fixture(autouse=True)
def fixed_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The water-filling's rounds start at the first host by name (no rotation within a
    test, unless it sets ROTATE_MS itself): the shares are then known exactly."""
    monkeypatch.setattr(redis_slots, "ROTATE_MS", 10**15)  # now / it < 1: the first host


async def _sync(
    leases: SlotLeases,
    host: str,
    backend: str,
    want: int,
    hold: int,
    busy: int,
    ttl: float = 5,
    max_parallel: int = MAX,
    seq: int | None = None,
) -> PoolAnswer:
    ask = PoolAsk("chat", backend, max_parallel, want, hold, busy)
    (answer,) = await leases.sync(host, ttl, next(SEQ) if seq is None else seq, [ask])
    assert isinstance(answer, PoolAnswer), answer
    return answer


def test_a_pools_key_has_a_hash_tag_of_its_own() -> None:
    key = pool_key("chat", "http://a:1/{x}")
    tag = key[key.index("{") : key.index("}") + 1]
    assert key.startswith("chatd:slots:{") and "x" not in tag  # a digest: the URL's braces
    assert pool_key("embed", "http://a:1/{x}") != key


def test_a_lone_host_gets_its_need_and_a_spare(redis_url: str) -> None:
    async def main() -> None:
        a = SlotLeases(redis_url)
        backend = _backend()
        try:
            idle = await _sync(a, "a", backend, want=0, hold=0, busy=0)
            assert (idle.count, idle.allowed, idle.hosts, idle.hungry) == (1, 1, 1, 0)
            two = await _sync(a, "a", backend, want=2, hold=1, busy=1)
            assert (two.count, two.allowed, two.fleet_held, two.fleet_busy) == (3, 3, 3, 1)
            full = await _sync(a, "a", backend, want=MAX, hold=3, busy=3)
            assert (full.count, full.allowed) == (MAX, MAX)  # no spare beyond the max
        finally:
            await a.close()

    asyncio.run(main())


def test_spares_are_half_the_need_and_go_to_a_host_that_needs_them(redis_url: str) -> None:
    """While nobody else needs them, a host may hold half its need again (so a load that
    grows finds slots without waiting for a sync); another host's need takes them back."""

    async def main() -> None:
        a, b = SlotLeases(redis_url), SlotLeases(redis_url)
        backend = _backend()

        async def sync(c: SlotLeases, h: str, want: int, hold: int) -> PoolAnswer:
            return await _sync(c, h, backend, want, hold, 0, max_parallel=64)

        try:
            assert (await sync(a, "a", 10, 0)).allowed == 15
            got = await sync(b, "b", 60, 0)  # needs nearly all: A's 5 spares are in the way
            assert (got.allowed, got.count) == (49, 49)
            got = await sync(a, "a", 10, 15)  # A hears it: no spare left for it
            assert (got.allowed, got.count, got.hungry) == (10, 15, 1)
            assert (await sync(a, "a", 10, 10)).count == 10  # given back once idle
            got = await sync(b, "b", 60, 49)
            assert (got.allowed, got.count) == (54, 54)  # 64 - 10: B's need is 54 of it
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_two_hosts_share_fairly_and_a_host_gives_back_only_what_is_free(redis_url: str) -> None:
    async def main() -> None:
        a, b = SlotLeases(redis_url), SlotLeases(redis_url)
        backend = _backend()
        try:
            got = await _sync(a, "a", backend, want=MAX, hold=0, busy=0)
            assert (got.count, got.allowed) == (MAX, MAX)
            # B needs 4 too: A holds them all, B gets none yet and is short of its share.
            got = await _sync(b, "b", backend, want=MAX, hold=0, busy=0)
            assert (got.count, got.allowed, got.fleet_held, got.hosts) == (0, 0, MAX, 2)
            # A's next sync: its share is 2, but its 4 are in use: it keeps them, may use 2.
            got = await _sync(a, "a", backend, want=MAX, hold=MAX, busy=MAX)
            assert (got.count, got.allowed, got.hungry) == (MAX, 2, 1)
            # Two of A's requests end; A (limit 2) now holds only what it keeps.
            got = await _sync(a, "a", backend, want=MAX, hold=2, busy=2)
            assert (got.count, got.allowed) == (2, 2)
            got = await _sync(b, "b", backend, want=MAX, hold=0, busy=0)
            assert (got.count, got.allowed, got.fleet_held, got.hungry) == (2, 2, MAX, 0)
            # A needs nothing any more: B may take everything but A's spare... and A's spare
            # goes as soon as B needs it (no slot is left over once B's need is counted).
            got = await _sync(a, "a", backend, want=0, hold=2, busy=0)
            assert (got.count, got.allowed) == (2, 0)
            got = await _sync(a, "a", backend, want=0, hold=0, busy=0)
            assert (got.count, got.allowed) == (0, 0)
            got = await _sync(b, "b", backend, want=MAX, hold=2, busy=2)
            assert (got.count, got.allowed, got.fleet_held) == (MAX, MAX, MAX)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_three_hosts_that_need_everything_share_it_and_the_remainder_rotates(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shares 2, 1, 1 of 4 (the remainder to the first host of the round); the round starts
    at another host every ROTATE_MS, so with one slot and two hosts that both always need
    it, each holds it in turn: nobody starves."""

    async def main() -> None:
        clients = {h: SlotLeases(redis_url) for h in ("h1", "h2", "h3")}
        backend = _backend()
        try:
            for h in clients:  # everybody needs everything, nobody holds anything yet
                await _sync(clients[h], h, backend, want=MAX, hold=0, busy=0)
            shares = {}
            for h in clients:
                got = await _sync(clients[h], h, backend, want=MAX, hold=0, busy=0)
                shares[h] = got.allowed
            assert shares == {"h1": 2, "h2": 1, "h3": 1}
            monkeypatch.setattr(redis_slots, "ROTATE_MS", 50)
            one = _backend()
            held = {"h1": 0, "h2": 0}
            turns = []
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and len(set(turns)) < 2:
                for h in held:
                    got = await _sync(
                        clients[h], h, one, want=1, hold=held[h], busy=held[h], max_parallel=1
                    )
                    held[h] = got.allowed  # its request ends; another starts while allowed
                    assert sum(held.values()) <= 1, held
                    if got.allowed:
                        turns.append(h)
                await asyncio.sleep(0.01)
            assert set(turns) == {"h1", "h2"}, turns
        finally:
            for c in clients.values():
                await c.close()

    asyncio.run(main())


def test_idle_hosts_spares_never_starve_a_host_that_needs_a_slot(redis_url: str) -> None:
    """More hosts than slots: two idle hosts hold the two spares; a third needs one. A spare
    holder hears it at its next sync and gives its spare back (the master's two steps: the
    limit drops, then the holding); the other spare is the one left over once the third
    host's need is counted, and nobody takes a second."""

    async def main() -> None:
        c = {h: SlotLeases(redis_url) for h in ("s1", "s2", "x")}
        backend = _backend()

        async def sync(h: str, want: int, hold: int) -> PoolAnswer:
            return await _sync(c[h], h, backend, want, hold, 0, max_parallel=2)

        try:
            assert (await sync("s1", 0, 0)).count == 1
            assert (await sync("s2", 0, 0)).count == 1
            got = await sync("x", 1, 0)
            assert (got.count, got.allowed) == (0, 0)  # both slots are the idle spares
            got = await sync("s1", 0, 1)  # hold: its limit (1), as its master says
            assert (got.count, got.allowed, got.hungry) == (1, 0, 1)
            assert (await sync("s1", 0, 0)).count == 0  # its limit is 0 now: given back
            got = await sync("s2", 0, 1)
            assert (got.count, got.allowed) == (1, 1)  # the spare left over: kept
            got = await sync("x", 1, 0)
            assert (got.count, got.allowed, got.fleet_held) == (1, 1, 2)
            assert (await sync("s1", 0, 0)).count == 0  # no second spare
        finally:
            for leases in c.values():
                await leases.close()

    asyncio.run(main())


def test_a_host_that_stops_renewing_loses_its_slots_after_the_ttl(redis_url: str) -> None:
    async def main() -> None:
        a, b = SlotLeases(redis_url), SlotLeases(redis_url)
        backend = _backend()
        try:
            got = await _sync(a, "a", backend, want=MAX, hold=0, busy=0, ttl=0.3)
            assert got.count == MAX
            got = await _sync(b, "b", backend, want=MAX, hold=0, busy=0)
            assert got.allowed == 0
            await asyncio.sleep(0.35)  # A is dead: no renewal
            got = await _sync(b, "b", backend, want=MAX, hold=0, busy=0)
            assert (got.count, got.allowed, got.hosts) == (MAX, MAX, 1)
            r = redis.Redis.from_url(redis_url)
            fields = r.hkeys(pool_key("chat", backend))
            r.close()
            assert sorted(f.decode() for f in fields) == ["b:b", "h:b", "l:b", "s:b", "w:b"]
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


@dataclass
class Host:
    """A host as the master runs it: its limit rises only with an answer, it starts a
    request only below its limit, and it tells Redis it holds max(limit, in use)."""

    name: str
    leases: SlotLeases
    need: int = 0
    busy: int = 0
    limit: int = 0

    async def sync(self, backend: str) -> None:
        want = min(MAX, self.need + self.busy)
        got = await _sync(
            self.leases, self.name, backend, want, max(self.limit, self.busy), self.busy
        )
        self.limit = got.allowed

    def step(self, rng: random.Random) -> None:
        roll = rng.random()
        if roll < 0.3:
            self.need += 1
        elif roll < 0.6 and self.busy:
            self.busy -= 1  # a request ends
        if self.need and self.busy < self.limit:
            self.need -= 1
            self.busy += 1  # the granter starts a waiting request


def test_the_cap_holds_under_random_interleavings(redis_url: str) -> None:
    async def main() -> None:
        rng = random.Random(14)
        hosts = [Host(f"h{i}", SlotLeases(redis_url)) for i in range(3)]
        backend = _backend()
        r = redis.Redis.from_url(redis_url)
        try:
            for _ in range(600):
                host = rng.choice(hosts)
                if rng.random() < 0.5:
                    await host.sync(backend)
                else:
                    host.step(rng)
                assert sum(h.busy for h in hosts) <= MAX
                held = r.hgetall(pool_key("chat", backend))
                assert sum(int(v) for k, v in held.items() if k.startswith(b"h:")) <= MAX
                for h in hosts:  # what a host uses, Redis counts for it
                    assert h.busy <= int(held.get(f"h:{h.name}".encode(), 0))
            # Then every host needs more than it can have: a few rounds of syncs and requests
            # ending and starting reach the fair shares, all slots in use.
            for h in hosts:
                h.need = 100
            for _ in range(8):
                for h in hosts:
                    await h.sync(backend)
                    h.busy = min(h.busy, h.limit)  # requests end; the limit is not refilled
                for h in hosts:
                    await h.sync(backend)
                    h.busy = h.limit  # ...then the freed slots go to whoever may use them
            assert sorted(h.busy for h in hosts) == [1, 1, 2]
        finally:
            r.close()
            for h in hosts:
                await h.leases.close()

    asyncio.run(main())


def test_a_late_sync_changes_nothing_and_what_is_in_flight_is_always_counted(
    redis_url: str,
) -> None:
    """A sync that reaches Redis after a newer one of its host (a slow worker; a retry)
    changes nothing: the newer answer stays the host's holding. And a host whose record was
    lost (a lapse, a Redis failover) is counted at least what it has in flight."""

    async def main() -> None:
        a, b = SlotLeases(redis_url), SlotLeases(redis_url)
        backend = _backend()
        try:
            got = await _sync(a, "a", backend, want=MAX, hold=0, busy=0, seq=10)
            assert got.count == MAX
            late = await _sync(a, "a", backend, want=0, hold=1, busy=0, seq=9)
            assert (late.count, late.allowed) == (MAX, -1)
            got = await _sync(b, "b", backend, want=MAX, hold=0, busy=0)
            assert got.allowed == 0  # A's 4 still count
            again = await _sync(a, "a", backend, want=MAX, hold=MAX, busy=MAX, seq=10)
            assert again.count == MAX  # the same seq again (a retry) is fine
            r = redis.Redis.from_url(redis_url)
            r.delete(pool_key("chat", backend))  # the pool is lost (a failover)
            r.close()
            got = await _sync(b, "b", backend, want=MAX, hold=0, busy=0)
            assert got.count == MAX  # B sees nobody...
            got = await _sync(a, "a", backend, want=MAX, hold=MAX, busy=3, seq=11)
            assert (got.count, got.allowed) == (3, 0)  # ...A's 3 in flight count again
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_cluster_serves_pools_on_every_master(redis_cluster_url: str) -> None:
    async def main() -> None:
        a, b = SlotLeases(redis_cluster_url), SlotLeases(redis_cluster_url)
        backends = [_backend() for _ in range(6)]  # pools on several masters, one round trip
        try:
            asks = [PoolAsk("chat", x, MAX, MAX, 0, 0) for x in backends]
            got = await a.sync("a", 5, 1, asks)
            assert [g.count for g in got if isinstance(g, PoolAnswer)] == [MAX] * 6
            got = await b.sync("b", 5, 1, asks)
            answers = [(g.count, g.fleet_held, g.hosts) for g in got if isinstance(g, PoolAnswer)]
            assert answers == [(0, MAX, 2)] * 6
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_an_unreachable_redis_is_a_store_error() -> None:
    async def main() -> None:
        leases = SlotLeases("redis://127.0.0.1:1/0", timeout=0.5)
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"127\.0\.0\.1:1"):
            await _sync(leases, "a", _backend(), want=1, hold=0, busy=0)
        assert time.monotonic() - started < 5
        await leases.close()

    asyncio.run(main())
