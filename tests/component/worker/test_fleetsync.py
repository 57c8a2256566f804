"""A worker's side of the fleet's slots (chatd.worker.fleetsync): what it answers its master.

A ``fleet_sync`` is run against a real Redis and answered with the pools' answers in the
order asked; a malformed one, or one on a worker whose store is not Redis, is answered
``ok: false`` with an error naming what is wrong (the master keeps what it knew and asks
again), never left unanswered.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest

from chatd.proto import control as proto
from chatd.store.redis_slots import SlotLeases
from chatd.worker.fleetsync import FleetSync

pytestmark = pytest.mark.timeout(30)


def run(leases: SlotLeases | None, msg: dict[str, Any]) -> dict[str, Any]:
    """``msg`` handled by a FleetSync; its one answer."""

    async def main() -> dict[str, Any]:
        got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        sync = FleetSync(leases, lambda m: got.put_nowait(dict(m)) is None)
        sync.on_message(msg)
        try:
            async with asyncio.timeout(10):
                return await got.get()
        finally:
            await sync.close()

    return asyncio.run(main())


def sync_msg(**fields: Any) -> dict[str, Any]:
    backend = f"http://10.1.2.3:11434/{secrets.token_hex(4)}"
    msg = {
        proto.T: proto.FLEET_SYNC,
        "rid": 7,
        "host": "h1",
        "ttl": 2.0,
        "pools": [["chat", backend, 4, 2, 0, 0], ["embed", backend, 2, 0, 0, 0]],
    }
    return {**msg, **fields}


def test_a_sync_is_answered_with_each_pools_answer_in_order(redis_url: str) -> None:
    answer = run(SlotLeases(redis_url), sync_msg())
    assert answer == {
        proto.T: proto.FLEET_SYNCED,
        "rid": 7,
        "ok": True,
        "pools": [[3, 3, 3, 0, 1, 0], [1, 1, 1, 0, 1, 0]],  # need + a spare each
        "error": "",
    }


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"host": ""}, "without a host"),
        ({"rid": 0}, "without a positive integer rid"),
        ({"ttl": 0}, "without a positive ttl"),
        ({"pools": "x"}, "without its pools"),
        ({"pools": [["chat", "http://b", 4, 1, 0]]}, "a malformed pool"),
        ({"pools": [["chat", "http://b", 4, -1, 0, 0]]}, "a malformed pool"),
        ({"pools": [["chat", 5, 4, 1, 0, 0]]}, "a malformed pool"),
    ],
)
def test_a_malformed_sync_is_answered_with_what_is_wrong(
    redis_url: str, fields: dict[str, Any], error: str
) -> None:
    answer = run(SlotLeases(redis_url), sync_msg(**fields))
    assert answer["ok"] is False and answer["rid"] == fields.get("rid", 7)
    assert error in answer["error"], answer


def test_a_worker_without_redis_refuses_and_an_unreachable_redis_says_where() -> None:
    answer = run(None, sync_msg())
    assert answer["ok"] is False and "not Redis" in answer["error"]
    answer = run(SlotLeases("redis://127.0.0.1:1/0", timeout=0.5), sync_msg())
    assert answer["ok"] is False and "127.0.0.1:1" in answer["error"], answer
