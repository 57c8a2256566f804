"""One backend as a worker's relay sees it: its state, and the figures the relay reports.

:class:`Backend` is the mutable state of one configured backend (its aiohttp session and
generation pool, its counters, which models it is known to have loaded); :class:`Reply`,
:class:`BackendStats` and :class:`RelayStats` are what :class:`chatd.relay.generate.Relay`
returns. No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp

from chatd.config import BackendConfig
from chatd.relay.pool import Pool


@dataclass(frozen=True, slots=True)
class Reply:
    """The result of one generation.

    Attributes:
        text: the whole reply, including the text of Ollama's done chunk.
        done_reason: ``"stop"`` or ``"length"`` (``cancelled`` is decided by the caller).
        tokens: the backend's count (eval_count, usage) when given, else pieces streamed.
        ttft_ms: request sent to the first text piece (total_ms for an empty reply).
        total_ms: request sent to the end of the reply.
    """

    text: str
    done_reason: str
    tokens: int
    ttft_ms: float
    total_ms: float


@dataclass(frozen=True, slots=True)
class BackendStats:
    """Counters of one backend since :meth:`Relay.start`, in this worker only."""

    url: str
    api: str
    requests: int
    tokens: int
    cancelled: int
    errors: Mapping[str, int]  # protocol error code (llm_timeout, ...) -> count
    in_flight: int
    loaded_models: tuple[str, ...]  # currently assumed loaded


@dataclass(frozen=True, slots=True)
class RelayStats:
    """A snapshot from :meth:`Relay.statistics`: one entry per configured backend, in order."""

    backends: tuple[BackendStats, ...]


@dataclass(slots=True)
class Backend:
    """Mutable state of one backend (a worker's own): its session, counters and the models
    it is known to have loaded."""

    url: str
    api: str
    chat_url: str
    # The backend's credential; repr=False: never in a repr, so never in a log line.
    api_key: str = field(default="", repr=False)
    session: aiohttp.ClientSession | None = None
    pool: Pool | None = None  # the generations' connections (relay_http)
    # The generation's request head, built once for the pool; it holds the Authorization.
    chat_head: bytes = field(default=b"", repr=False)
    requests: int = 0
    tokens: int = 0
    cancelled: int = 0
    in_flight: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    loaded: dict[str, float] = field(default_factory=dict)  # model -> monotonic() it stays till
    live: bool = True  # False: retired (an address no longer discovered: Relay.retire)

    @property
    def headers(self) -> dict[str, str]:
        """The headers every request to this backend carries: its ``Authorization``."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @classmethod
    def of(cls, cfg: BackendConfig) -> Backend:
        path = "/api/chat" if cfg.api == "ollama" else "/v1/chat/completions"
        return cls(cfg.base_url, cfg.api, cfg.base_url + path, api_key=cfg.api_key)

    def redact(self, body: bytes) -> bytes:
        """``body`` without this backend's api_key: an error text that echoes the key it was
        sent (some servers do, to say which key they refused) must not carry it into a log
        line or to a client."""
        return body.replace(self.api_key.encode(), b"[api_key]") if self.api_key else body
