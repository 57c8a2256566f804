"""The Redis store on several Redis nodes: a Cluster, and a Sentinel failover under load.

The store's contracts run on a Cluster and on Sentinel in ``test_store.py`` (its ``backend``
fixture); here is what only several nodes show:

- Cluster (the run's 3 masters, tests/conftest.py): sessions spread over every master, each
  session's keys and its lease index on one slot, the sweep finds lapsed leases on every master,
  the probe writes on every master.
- ``min_replicas_acks`` (the run's master + replica + 3 Sentinels): a write the replicas cannot
  confirm in time is refused, and its resend through the same store is not a duplicate.
- A Sentinel failover under load (a master + replica + 3 Sentinels of the test's own):
  APPENDERS tasks append TEXT-sized messages flat out, each resending a refused message with the
  same id as a client does; the replica stalls (SIGSTOP) for STALL_S, as a replica behind its
  master does (a slow network, a full sync, a busy host), the master is SIGKILLed at the end of
  the stall and the replica resumes and is promoted. What the master had not handed to the
  kernel for the replica by then is gone. With ``min_replicas_acks = 1`` no acknowledged append
  is missing from the new master (the killed one is restarted as a replica, as its supervisor
  and the Sentinels would, so writes can be confirmed again); without it, the appends
  acknowledged during the stall that had not reached the replica are lost: counted and printed
  (``pytest -s``), not asserted, the loss window documented in docs/operations.md ("Running
  several hosts").
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from chatd.config import SessionsConfig
from chatd.errors import StoreError
from chatd.store import SqliteStore, open_store
from chatd.store.redis import RedisStore
from chatd.store.redis_lua import keys as session_keys
from tests.conftest import SentinelGroup, flush_redis

pytestmark = pytest.mark.timeout(60)

APPENDERS = 16
TEXT = "x" * 8192  # big enough to fill the kernel's socket buffers to the replica in a stall
LOAD_S = 0.5  # seconds of appends before the replica stalls
STALL_S = 0.4  # seconds the replica is stopped (below the Sentinels' 500 ms down-after)


def test_open_store_takes_every_redis_form_and_refuses_replicas_for_sqlite() -> None:
    for url in ("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", "redis+sentinel://h:1/m/2"):
        store = open_store(SessionsConfig(store=url, min_replicas_acks=1))
        assert isinstance(store, RedisStore) and store.url == url
    with pytest.raises(StoreError, match="min_replicas_acks"):
        open_store(SessionsConfig(store="sqlite:///tmp/x.db", min_replicas_acks=1))
    assert isinstance(open_store(SessionsConfig(store="sqlite:///tmp/x.db")), SqliteStore)


def test_cluster_spreads_sessions_sweeps_and_probes_every_master(redis_cluster_url: str) -> None:
    from redis.cluster import RedisCluster
    from redis.crc import key_slot

    flush_redis(redis_cluster_url)  # a sweep across every session: no other test's leftovers
    store = RedisStore(redis_cluster_url, 60)
    host, port = redis_cluster_url.split("//")[1].split(",")[0].split(":")
    raw = RedisCluster(host=host, port=int(port), decode_responses=True)

    async def main() -> None:
        await store.open()
        try:
            sessions = [await store.create_session("") for _ in range(24)]
            for s in sessions:
                await store.append_user(s, "m", s, "x", lease_s=0.05)
            await asyncio.sleep(0.1)
            claimed = await store.claim(None, 30, 100)
            assert {(e.session, e.text) for e in claimed} >= {(s, s) for s in sessions}
            await store.probe()
            assert store.health.healthy
            for s in sessions:  # answered: no lapsed lease left for the other tests' sweeps
                await store.append_final(s, "m", "reply", "r", {})
        finally:
            await store.close()
        masters = {raw.get_node_from_key(session_keys(s)[0]).name for s in sessions}
        assert len(masters) == 3, "24 sessions all on fewer than 3 masters"
        for s in sessions:
            index = store._layout.index(s)
            assert raw.zscore(index, f"{s} m") is None  # answered: out of the index
            assert {key_slot(k.encode()) for k in [*session_keys(s), index]} == {
                key_slot(s.encode())
            }
        mine = f"chatd:probe:*:{store.owner}"
        probes = {n.name: raw.keys(mine, target_nodes=n) for n in raw.get_primaries()}
        assert sorted(map(len, probes.values())) == [1, 1, 1], probes  # one on each master

    asyncio.run(main())
    raw.close()


def test_writes_short_of_replicas_are_refused_and_a_resend_is_no_duplicate(
    redis_sentinel_url: str,
) -> None:
    """One replica, ``min_replicas_acks = 2``: every write is refused after the timeout (the
    master has it: WAIT cannot be satisfied). With the bar lowered to what the replica gives,
    the resend of the refused message answers as the first attempt would have: not a
    duplicate, same seq (so the worker generates it at once, not after a lapsed lease)."""
    store = RedisStore(redis_sentinel_url, 60, min_replicas_acks=1, min_replicas_timeout=0.2)

    async def main() -> None:
        await store.open()
        try:
            s = await store.create_session("")
            store._conn.acks = 2  # what this deployment cannot give
            started = time.monotonic()
            with pytest.raises(StoreError, match="1 of 2 replicas confirmed"):
                await store.append_user(s, "m1", "q", "m")
            assert 0.2 <= time.monotonic() - started < 2.0
            assert not store.health.healthy
            store._conn.acks = 1
            assert (await store.append_user(s, "m1", "q", "m")).duplicate is False
            assert [e.msg_id for e in await store.events_after(s, 0)] == ["m1"]
            assert (await store.append_user(s, "m1", "q", "m")).duplicate is True
            await store.probe()
            assert store.health.healthy
            await store.append_final(s, "m1", "reply", "r", {})  # no lapsed lease left behind
        finally:
            await store.close()

    asyncio.run(main())


# -- a Sentinel failover under load ------------------------------------------------------------


async def _appender(
    store: RedisStore, session: str, stop: asyncio.Event, acked: dict[tuple[str, str], int]
) -> int:
    """Append m0, m1, ... until ``stop``; a refused one is sent again (same id) after 20 ms, as
    a client resends after ``store_unavailable``. Returns how many attempts were refused."""
    refused, n = 0, 0
    while not stop.is_set():
        try:
            got = await store.append_user(session, f"m{n}", TEXT, "x")
        except StoreError:
            refused += 1
            await asyncio.sleep(0.02)
            continue
        acked[(session, f"m{n}")] = got.seq
        n += 1
    return refused


def _failover(group: SentinelGroup, acks: int) -> dict[str, Any]:
    store = RedisStore(
        group.url,
        3600,
        backoff=(0.02, 0.05),
        timeout=1.0,
        min_replicas_acks=acks,
        min_replicas_timeout=0.5,
    )
    acked: dict[tuple[str, str], int] = {}
    times: dict[str, float] = {}

    async def main() -> list[int]:
        await store.open()
        try:
            sessions = [await store.create_session("") for _ in range(APPENDERS)]
            stop = asyncio.Event()
            tasks = [asyncio.create_task(_appender(store, s, stop, acked)) for s in sessions]
            await asyncio.sleep(LOAD_S)
            old, new = group.master, group.replica
            assert new.proc is not None
            os.kill(new.proc.pid, signal.SIGSTOP)
            try:
                before_stall = len(acked)
                await asyncio.sleep(STALL_S)  # the writes go on, confirmed by no replica
                times["acked_in_stall"] = len(acked) - before_stall
                times["acked_before_kill"] = len(acked)
                times["kill"] = time.monotonic()
                old.kill()
            finally:
                os.kill(new.proc.pid, signal.SIGCONT)
            await _until(lambda: group.master_port() == new.port, 15, "the failover")
            times["promoted"] = time.monotonic()
            if acks:  # no replica is left to confirm: the old master comes back as one, as
                old.start()  # after its supervisor restarted it; the Sentinels would make it
                with redis.Redis(port=old.port) as r:  # a replica within their 10 s INFO
                    r.replicaof("127.0.0.1", new.port)  # period: told at once here
            before = len(acked)
            await _until(lambda: len(acked) >= before + 10 * APPENDERS, 20, "writes again")
            times["writing"] = time.monotonic()
            stop.set()
            return list(await asyncio.gather(*tasks))
        finally:
            await store.close()

    refused = asyncio.run(main())
    with redis.Redis(port=group.replica.port, decode_responses=True) as raw:  # the new master
        stored = {}
        for s in {s for s, _ in acked}:
            for entry_id, f in raw.xrange(session_keys(s)[1]):
                stored[(s, f["m"])] = int(entry_id.partition("-")[0])
    lost = sorted(k for k, seq in acked.items() if stored.get(k) != seq)
    return {
        "min_replicas_acks": acks,
        "acknowledged": len(acked),
        "acknowledged_before_kill": times["acked_before_kill"],
        "acknowledged_in_stall": times["acked_in_stall"],
        "lost": len(lost),
        "refused_attempts": sum(refused),
        "failover_s": round(times["promoted"] - times["kill"], 2),
        "unavailable_s": round(times["writing"] - times["kill"], 2),
    }


async def _until(cond: Callable[[], bool], within: float, what: str) -> None:
    """Until ``cond()`` (run in a thread: it may ask a Sentinel), at most ``within`` s."""
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(cond):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {within} s")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("acks", [1, 0], ids=["min_replicas_acks=1", "min_replicas_acks=0"])
def test_sentinel_failover_under_load(
    start_sentinel: Callable[[], SentinelGroup], acks: int
) -> None:
    group = start_sentinel()
    group.wait_ready()
    figures = _failover(group, acks)
    print(f"\nFAILOVER {json.dumps(figures)}")
    assert figures["acknowledged_before_kill"] >= 10 * APPENDERS, figures  # it was under load
    assert figures["refused_attempts"] > 0, figures  # the failover was seen, and refused
    if acks:
        assert figures["lost"] == 0, figures
