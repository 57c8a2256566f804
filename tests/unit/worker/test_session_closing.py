"""A message read on a connection whose close frame is out is neither stored nor acknowledged.

The worker closes a connection with 1001 (a drain's fallback, a handoff that failed at
commit) while the client may still be sending: websockets keeps delivering the frames read
until the client's close answers. Acknowledging such a message would send an ack the client
never reads (it is leaving) and start a generation on a worker that is going away; the client
resends it, same id, where it resumes. Checked in one process with stand-ins: the same
message is stored and acknowledged while the connection is open, and not once it is closing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from websockets.protocol import State

from chatd.proto import chat
from chatd.store.base import Appended
from chatd.worker.outbox import OutboundBudget, Outbox
from chatd.worker.session import WorkerState, run_actions
from tests.unit.worker.test_handoff import Sink


class Hub:
    def __init__(self) -> None:
        self.submitted: list[str] = []

    async def submit(self, session: str, msg: chat.Message, key: str, received: float) -> Any:
        self.submitted.append(msg.id)
        return Appended(len(self.submitted), False)


class Ws:
    remote_address = ("127.0.0.1", 5000)

    def __init__(self, state: State) -> None:
        self.protocol = type("P", (), {"state": state})()


def worker_state(hub: Any, store: Any) -> WorkerState:
    """A worker's shared state around stand-ins for its hub and store (default limits)."""
    return WorkerState(hub, store, chat.Limits(), 5.0, "1/1", OutboundBudget(1 << 20, 1 << 20))


def run(ws_state: State) -> tuple[list[str], list[dict[str, Any]]]:
    hub = Hub()
    state = worker_state(hub, None)
    sink = Sink()

    async def main() -> None:
        outbox = Outbox(sink)
        conn = chat.ChatConnection(state.limits, 0.0)
        conn.session = "s1"
        actions: list[chat.Action] = [chat.Message("m1", "hi", None)]
        await run_actions(actions, Ws(ws_state), state, conn, outbox)  # type: ignore[arg-type]
        await outbox.wait_empty()

    asyncio.run(main())
    return hub.submitted, [orjson.loads(f) for f in sink.frames]


def test_a_message_on_an_open_connection_is_stored_and_acknowledged() -> None:
    submitted, frames = run(State.OPEN)
    assert submitted == ["m1"]
    assert [(f["type"], f["id"], f["seq"]) for f in frames] == [("ack", "m1", 1)]


def test_a_message_read_after_the_close_frame_went_out_is_left_for_the_resend() -> None:
    submitted, frames = run(State.CLOSING)
    assert submitted == [] and frames == []
