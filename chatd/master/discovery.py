"""Backends from DNS, the master's side: one resolver for the whole daemon.

Each ``[[llm.backends]]`` table with ``discover = "dns"`` names a host whose addresses are the
backends (:mod:`chatd.backendtable`). The master holds the one set of addresses of each table
that the slot granter and every worker use, so that they all agree: the caps stay exact per
address. It re-resolves each name every ``discover_interval`` seconds and, when the set
changes, hands it to :meth:`chatd.master.services.Services.set_addresses`, which reconfigures
the granter (an address that disappears gets no new slot; its requests in flight finish) and
tells every worker (``backends {sets}``); a new worker gets the current sets first thing.

**Who resolves.** The master runs one selector loop that must never block, and no threads
(a fork-safe arbiter: a thread inside ``getaddrinfo`` when a worker is forked could leave the
C library's resolver locks held in the child). So a worker resolves for it, as workers
already check the backends' health for it: the master sends ``resolve {rid, host,
nameservers}`` to one worker (the ready ones in turn, else one still starting, for the
first answer at start), which answers ``resolved {rid, ok, addresses, error}`` from its event
loop (:mod:`chatd.relay.resolve`). One question per name per interval, whatever the number of
workers; the answer counts only as the master judges it, below.

**What an answer does** (:class:`Name`):

* addresses: they are the set (sorted, deduplicated);
* no address (NXDOMAIN, no A or AAAA record, as Kubernetes answers for a headless Service
  with no ready pod): the set becomes empty, since there is no backend, but only when a
  second answer in a row says so, one interval later: one odd answer never empties a set
  that had addresses (a table that never had any is empty at once);
* a failure (a timeout, SERVFAIL, no answer from the worker within ``ANSWER_TIMEOUT``, the
  worker exited): the last set is kept (an outage of the resolver is not one of the
  backends), with one warning when the outage begins and one line when it ends, not one
  per interval. Before any answer the set is empty.

The next question is due ``discover_interval`` after the answer (or the timeout): never two
at once for a name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chatd.backendtable import is_dns
from chatd.config import BackendConfig, Config
from chatd.config_checks import url_host
from chatd.master.services import Services
from chatd.master.workers import Worker, Workers
from chatd.proto import control as proto

log = logging.getLogger("chatd.master")

ANSWER_TIMEOUT = 5.0
"""Seconds a worker has to answer a ``resolve`` (it gives up on the name itself after
:data:`chatd.relay.resolve.LIFETIME`, 3 s); then the question counts as a failure."""

EMPTY_ANSWERS = 2
"""Answers without any address, in a row, that empty a set that had addresses."""

NO_WORKER_RETRY = 0.5
"""Seconds before a name that found no worker to ask (all of them starting over, say) is
tried again: the loop must not spin on a question it cannot send."""


@dataclass(eq=False)
class Name:
    """One dns table's name and what the master knows of it (see the module).

    ``addresses`` is None before the first answer; ``failure`` is the first error of the
    current outage ("" while the name resolves); ``asked`` is ``(rid, pid, deadline)`` while a
    worker resolves it.
    """

    url: str
    host: str
    interval: float
    addresses: tuple[str, ...] | None = None
    due: float = 0.0
    asked: tuple[int, int, float] | None = None
    failure: str = ""
    empty: int = 0  # answers in a row without an address, while the set has some
    resolved_at: float | None = None  # monotonic time of the last answer that resolved

    def answer(self, ok: bool, addresses: Sequence[str], error: str, now: float) -> bool:
        """Judge one answer (module docstring); True when the set changed."""
        self.asked, self.due = None, now + self.interval
        if not ok:
            self._failed(error or "no reason given")
            return False
        if self.failure:
            log.info("%s (%s) resolves again", self.host, self.url)
            self.failure = ""
        self.resolved_at = now
        found = tuple(sorted(set(addresses)))
        old = self.addresses
        if found or not old:
            self.empty = 0
            if not found and old is None:
                log.warning(
                    "%s (%s) has no address (%s): no backend from it until it has",
                    *(self.host, self.url, error or "no record"),
                )
            self.addresses = found
            return found != old
        self.empty += 1
        if self.empty < EMPTY_ANSWERS:
            log.info(
                "%s (%s) answered no address (%s); its %d addresses are kept until the next "
                "answer says so too",
                *(self.host, self.url, error or "no record", len(old)),
            )
            return False
        log.warning(
            "%s (%s) has no address any more (%s): no backend from it until it has",
            *(self.host, self.url, error or "no record"),
        )
        self.addresses, self.empty = (), 0
        return True

    def _failed(self, error: str) -> None:
        if self.failure:
            return  # one warning per outage
        self.failure = error
        kept = (
            f"keeping its {len(self.addresses)} addresses of the last answer"
            if self.addresses
            else "no backend from it until it resolves"
        )
        log.warning(
            "cannot resolve %s (%s): %s; %s, retrying every %gs",
            *(self.host, self.url, error, kept, self.interval),
        )


class Discovery:
    """The master's resolver of dns tables (see the module): a clock of the master's loop
    (added to ``services.clocks``), the handler of ``resolved``, and the source of
    :meth:`Services.set_addresses`."""

    def __init__(self, cfg: Config, workers: Workers, services: Services) -> None:
        self.workers = workers
        self.services = services
        self.names: dict[str, Name] = {}
        self.nameservers: tuple[str, ...] = ()
        self._rid = 0
        self._turn = 0
        workers.handlers[proto.RESOLVED] = self._resolved
        workers.on_exit.append(self._exited)
        services.clocks.append(self)
        services.discovery = self.status
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        """Resolve the dns tables of ``cfg`` from now on: a new one at once; a kept one (same
        URL) keeps its addresses; a dropped one is forgotten."""
        self.nameservers = cfg.llm.nameservers
        tables: list[BackendConfig] = [b for b in cfg.llm.backends if is_dns(b)]
        old, self.names = self.names, {}
        for b in tables:
            name = old.pop(b.url, None) or Name(b.url, url_host(b.url), b.discover_interval)
            name.interval = b.discover_interval
            self.names[b.url] = name
        if any(n.addresses for n in old.values()):
            self.services.set_addresses(self.sets())

    def sets(self) -> dict[str, tuple[str, ...]]:
        """The addresses of each dns table that has had an answer, by the table's URL."""
        return {url: n.addresses for url, n in self.names.items() if n.addresses is not None}

    # -- the master loop's clock -----------------------------------------------------------------

    def timeout(self, now: float, longest: float) -> float:
        for n in self.names.values():
            due = n.asked[2] if n.asked is not None else n.due
            longest = max(0.0, min(longest, due - now))
        return longest

    def tick(self, now: float) -> None:
        """Give up on the answers that are late; ask for the names that are due."""
        for n in self.names.values():
            if n.asked is not None and now >= n.asked[2]:
                n.answer(False, (), f"no answer from the worker within {ANSWER_TIMEOUT:g}s", now)
            if n.asked is None and now >= n.due:
                self._ask(n, now)

    # -- the workers -----------------------------------------------------------------------------

    def _ask(self, name: Name, now: float) -> None:
        self._turn += 1
        worker = self.workers.helper(self._turn)
        self._rid += 1
        msg = {
            proto.T: proto.RESOLVE,
            "rid": self._rid,
            "host": name.host,
            "nameservers": list(self.nameservers),
        }
        if worker is not None and self.workers.tell(worker, msg):
            name.asked = (self._rid, worker.pid, now + ANSWER_TIMEOUT)
        else:
            name.due = now + NO_WORKER_RETRY  # nobody to ask: the set stays as it is

    def _resolved(self, worker: Worker, msg: dict[str, Any]) -> None:
        rid = msg.get("rid")
        name = next((n for n in self.names.values() if n.asked and n.asked[0] == rid), None)
        if name is None:
            return  # a late answer, after its timeout (or for a table dropped since)
        addresses = msg.get("addresses")
        addresses = (
            [a for a in addresses if isinstance(a, str)] if isinstance(addresses, list) else []
        )
        error = msg.get("error")
        ok = msg.get("ok") is True
        if name.answer(ok, addresses, error if isinstance(error, str) else "", time.monotonic()):
            self.services.set_addresses(self.sets())

    def _exited(self, worker: Worker) -> None:
        """A worker asked that exits will not answer: a failure now, and asked again."""
        now = time.monotonic()
        for n in self.names.values():
            if n.asked is not None and n.asked[1] == worker.pid:
                n.answer(False, (), f"worker {worker.slot} exited before it answered", now)
                n.due = now

    # -- views -----------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Each dns table: ``{url, host, addresses, resolved_s_ago, error}`` (``addresses``
        None before the first answer; ``error`` the current outage's, "" when it resolves)."""
        now = time.monotonic()
        return [
            {
                "url": n.url,
                "host": n.host,
                "addresses": None if n.addresses is None else list(n.addresses),
                "resolved_s_ago": None if n.resolved_at is None else round(now - n.resolved_at, 3),
                "error": n.failure,
            }
            for n in self.names.values()
        ]
