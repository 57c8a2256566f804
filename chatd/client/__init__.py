"""``chatd.client``: the asyncio Python client of the chatd chat protocol.

It keeps an outbox of unacknowledged messages, reconnects with jittered exponential backoff,
resumes its session with ``hello{session, last_seq}``, resends the outbox with the same ids
(the server deduplicates) and hands every stored event to the caller exactly once::

    async with ChatClient("ws://127.0.0.1:8000/ws") as client:
        answer = await client.ask("Hello!")

Guarantees, limits and examples: ``docs/client.md``. This package speaks the protocol as
``docs/protocol.md`` specifies it and imports nothing else from chatd: a client that shared
code with the server could not catch the server's mistakes.
"""

from chatd.client.core import ChatClient
from chatd.client.events import (
    Ack,
    ClientClosed,
    Closed,
    Error,
    Event,
    Notice,
    Queued,
    Reconnecting,
    Reply,
    Statistics,
    Token,
    Welcome,
)

__all__ = [
    "Ack",
    "ChatClient",
    "ClientClosed",
    "Closed",
    "Error",
    "Event",
    "Notice",
    "Queued",
    "Reconnecting",
    "Reply",
    "Statistics",
    "Token",
    "Welcome",
]
