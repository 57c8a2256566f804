"""The relay's backends: each one's HTTP session and generation pool, in a list that may grow.

:class:`Backends` is the part of :class:`chatd.relay.generate.Relay` that holds the
:class:`~chatd.relay.backend.Backend` objects, by index. The list starts as the worker's
static backends and grows as the master discovers addresses (:mod:`chatd.backendtable`):

* :meth:`Backends.add` appends one (opened at once if the relay is started);
* :meth:`Backends.retire` takes one out of :attr:`Backends.live` (its address disappeared):
  no new request should go to it (the worker's slots see to that), the ones in flight go on;
* :meth:`Backends.close_backend` closes a retired one's connections once nothing runs on it
  (the caller knows); a closed backend is opened again if it is used or revived;
* :meth:`Backends.revive` puts a retired one back.

An index never changes meaning: a request holding one keeps its backend whatever happens to
the list. Use from one event loop, between :meth:`Backends.start` and :meth:`Backends.close`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import aiohttp

from chatd.config import BackendConfig, LLMConfig
from chatd.relay.backend import Backend
from chatd.relay.pool import Pool

# aiohttp warns that enable_cleanup_closed is useless where CPython fixed the SSL leak.
_CLEANUP_CLOSED = sys.version_info < (3, 12, 7) or (3, 13) <= sys.version_info < (3, 13, 1)
# The Accept header of a generation, per api (Ollama's own client sends application/x-ndjson).
_ACCEPT = {"ollama": "application/x-ndjson", "openai": "text/event-stream"}


class Backends:
    """The backends of a relay, by index (see the module)."""

    def __init__(self, llm: LLMConfig, backends: Sequence[BackendConfig]) -> None:
        self._llm = llm
        self._backends = [Backend.of(b) for b in backends]
        self.apis: list[str] = [b.api for b in self._backends]
        """Each backend's api, by index: a list that grows with :meth:`add` (so a view kept
        by the APIs stays current)."""
        self._started = False

    async def start(self) -> None:
        """Create one keep-alive HTTP session and one generation pool per backend; call
        inside the running loop.

        No connection limit: the master's LLM slots already bound the in-flight requests,
        and a limit would add a second, hidden queue without a deadline. aiohttp connects
        with Happy Eyeballs (its default 250 ms delay), like the pool.
        """
        self._started = True
        for b in self._backends:
            self._open(b)

    async def close(self) -> None:
        """Close every session and pool (generations still running fail with
        UpstreamUnavailable)."""
        self._started = False
        for i in range(len(self._backends)):
            await self.close_backend(i)

    @property
    def llm(self) -> LLMConfig:
        """The ``[llm]`` settings this relay was built from."""
        return self._llm

    @property
    def count(self) -> int:
        """How many backends there are, retired ones included (indexes 0 .. count - 1)."""
        return len(self._backends)

    @property
    def live(self) -> list[int]:
        """The indexes of the backends not retired, in order."""
        return [i for i, b in enumerate(self._backends) if b.live]

    def backend(self, index: int) -> Backend:
        """The state of one backend (:mod:`chatd.relay.passthrough` streams through it)."""
        return self._backends[index]

    def pool(self, index: int) -> Pool:
        """The generation pool of one backend (after :meth:`start`)."""
        return self._pool(self._backends[index])

    def add(self, config: BackendConfig) -> int:
        """Append a backend (opened at once after :meth:`start`); returns its index."""
        b = Backend.of(config)
        self._backends.append(b)
        self.apis.append(b.api)
        if self._started:
            self._open(b)
        return len(self._backends) - 1

    def retire(self, index: int) -> None:
        """Take a backend out of :attr:`live` (see the module)."""
        self._backends[index].live = False

    def revive(self, index: int) -> None:
        """Put a retired backend back in :attr:`live` (what it had loaded is forgotten)."""
        b = self._backends[index]
        b.live = True
        b.loaded.clear()

    async def close_backend(self, index: int) -> None:
        """Close one backend's session and pool (requests still running on it fail)."""
        b = self._backends[index]
        if b.pool is not None:
            pool, b.pool = b.pool, None
            pool.close()
        if b.session is not None:
            session, b.session = b.session, None
            await session.close()

    def _open(self, b: Backend) -> None:
        """Give ``b`` its aiohttp session and generation pool, where it has none."""
        if b.session is None:
            timeout = aiohttp.ClientTimeout(
                total=None,
                connect=self._llm.connect_timeout,  # covers DNS too
                sock_connect=self._llm.connect_timeout,
                sock_read=None,  # the read deadlines are the Guard's (relay_guard)
            )
            b.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=_CLEANUP_CLOSED),
                timeout=timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
                headers=b.headers,
            )
        if b.pool is None:
            b.pool = Pool(b.url, connect_timeout=self._llm.connect_timeout, headers=b.headers)
            path = b.chat_url[len(b.url) :]
            b.chat_head = b.pool.head("POST", path, _ACCEPT.get(b.api, "*/*"))

    def _session(self, b: Backend) -> aiohttp.ClientSession:
        if b.session is None and self._started:
            self._open(b)  # closed by close_backend, used again
        if b.session is None:
            raise RuntimeError("Relay.start() must be awaited before use")
        return b.session

    def _pool(self, b: Backend) -> Pool:
        if b.pool is None and self._started:
            self._open(b)  # closed by close_backend, used again
        if b.pool is None:
            raise RuntimeError("Relay.start() must be awaited before use")
        return b.pool
