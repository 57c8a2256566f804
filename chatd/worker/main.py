"""A worker process: one uvloop event loop serving WebSocket chat on its slot's socket.

The master forks a worker with :func:`run_worker`; everything the worker needs was imported
by the master before the fork, so a replacement serves within milliseconds. The event loop is
created here, after the fork (never inherited).

Life of a worker:

1. open the session store and the relay's connection pools;
2. serve ``/ws`` and the HTTP endpoints on the inherited listening socket;
3. tell the master it is ready, then report stats every second from the event loop (the
   heartbeat: a blocked loop stops it);
4. on ``predrain`` (the master's ``shutdown_delay``): answer 503 on ``/healthz`` and
   ``/readyz``, serve on; on ``drain`` (master order or SIGTERM): see :meth:`Worker.drain`;
5. on SIGINT/SIGQUIT: close everything at once and exit;
6. when the master is gone (its link closes): drain and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any, NoReturn

import psutil
import uvloop
from setproctitle import setproctitle
from websockets.asyncio.server import Server, ServerConnection, serve

from chatd import faults, tls
from chatd.backendtable import BackendTable
from chatd.config import Config
from chatd.errors import ExitCode, StoreError
from chatd.logs import set_role
from chatd.metrics import render
from chatd.proto import chat
from chatd.proto import control as proto
from chatd.relay.generate import Relay
from chatd.spec import WorkerSpec
from chatd.store import open_notices, open_slot_leases, open_store
from chatd.worker import leases
from chatd.worker.api.setup import api_router
from chatd.worker.closing import Closing
from chatd.worker.connection import serve_connection
from chatd.worker.discovered import Discovered
from chatd.worker.fleetsync import FleetSync
from chatd.worker.front import Front, connection_class
from chatd.worker.generation import Hub
from chatd.worker.http import HttpEndpoints, frame_limit, limit_headers
from chatd.worker.link import MasterLink
from chatd.worker.mover import Mover
from chatd.worker.moves import Moves
from chatd.worker.outbox import OutboundBudget
from chatd.worker.report import stats_message
from chatd.worker.session import WorkerState
from chatd.worker.slots import MasterSlots, dispatch

log = logging.getLogger("chatd.worker")

HEALTH_INTERVAL = 5.0  # seconds between backend health checks (1 s while one is down)
STORE_PROBE_S = 1.0  # seconds between two probes of an unavailable session store
STORE_PROBE_HEALTHY_S = 5.0  # seconds between two probes of a working one
METRICS_WAIT = 2.0  # seconds /metrics waits for the master's figures before answering 503
LIVEZ_WAIT = 2.0  # seconds /livez waits for the master's answer before answering 503


class Worker:
    """The serving side of one worker process."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.cfg: Config = spec.cfg
        self.name = f"{spec.slot}/{os.getpid()}"
        self.store = open_store(self.cfg.sessions, spec.store_writer)
        # Notices of stored replies across hosts (Redis pub/sub; None with SQLite: one host).
        self.notices = open_notices(self.cfg.sessions)
        # The backends: the static tables, then the dns tables' addresses as the master tells
        # them (chatd.backendtable: the relay and the slots index backends alike).
        self.table = BackendTable(self.cfg.llm.backends)
        self.relay = Relay(self.cfg.llm, self.table.configs)
        self.link = MasterLink.from_spec(spec)
        # The master grants the LLM slots of every worker: the cap is daemon-wide.
        self.slots = MasterSlots(self.table.configs, self.link.send)
        # Embeddings take slots of their own class (max_parallel_embed, their own queue), so a
        # burst of them never delays a chat generation: acquire/release like self.slots.
        embed = proto.SLOT_CLASS_EMBED
        self.embed_slots = MasterSlots(self.table.configs, self.link.send, embed)
        self.discovered = Discovered(
            self.table,
            self.relay,
            (self.slots, self.embed_slots),
            self.link.send,
            lambda i: self.relay.prewarm(i, self.cfg.llm.model),
        )
        self.slot_classes = {proto.SLOT_CLASS_CHAT: self.slots, embed: self.embed_slots}
        # With Redis the hosts share each backend's cap: this worker syncs it when its master
        # asks (chatd.master.fleet; the connection is made at the first sync).
        self.fleet = FleetSync(open_slot_leases(self.cfg.sessions), self.link.send)
        self.hub = Hub(self.cfg, self.store, self.relay, self.slots, self.link, self.notices)
        self.api = api_router(self.cfg, self.relay, self.slots, self.embed_slots)
        self.state = WorkerState(
            hub=self.hub,
            store=self.store,
            limits=chat.Limits(
                max_message_bytes=self.cfg.limits.max_message_bytes,
                messages_per_minute=self.cfg.limits.messages_per_minute,
                models=frozenset(self.cfg.llm.all_models),
            ),
            hello_timeout=self.cfg.limits.hello_timeout,
            worker_name=self.name,
            budget=OutboundBudget(
                self.cfg.limits.max_outbound_bytes, self.cfg.limits.max_worker_outbound_bytes
            ),
            auth_on=bool(self.cfg.auth.tokens),
        )
        self.moves = Moves(self.cfg, self.state)  # open WebSockets moving between workers
        self.closing = Closing(self.state, self.hub)  # how a drain lets them go
        self._successor = 0  # the pid a drain moves the connections to (0: none)
        self.server: Server | None = None
        self.front: Front | None = None  # the plain HTTP side of the port
        self._stop = asyncio.Event()
        self._fast = False
        self.predrain = False  # the master said ``predrain``: /healthz, /readyz answer 503
        self._tasks: list[asyncio.Task[Any]] = []
        self._proc = psutil.Process()
        self.started = time.monotonic()

    # -- 1-3: start -----------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until told to stop; returns the exit code."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, False)
        loop.add_signal_handler(signal.SIGINT, self.request_stop, True)
        loop.add_signal_handler(signal.SIGQUIT, self.request_stop, True)
        await self.store.open()
        if self.notices is not None:
            self.notices.start(self.hub.on_stored)
        await self.relay.start()
        endpoints = HttpEndpoints(
            self.cfg,
            ready=self._ready,
            serving=lambda: not (self.state.draining or self.predrain),
            alive=self._alive,
            connections=lambda: len(self.state.connections) + len(front.http),
            metrics=self._metrics,
            worker_name=self.name,
            per_ip=lambda ip: self.state.per_ip.get(ip, 0) + front.per_ip.get(ip, 0),
            api=self.api,
        )
        limit_headers(self.cfg.limits.max_header_count)
        limits = self.cfg.limits
        self.front = front = Front(
            endpoints.serve_http,
            max_header_bytes=limits.max_header_bytes,
            max_header_count=limits.max_header_count,
            open_timeout=limits.hello_timeout,
            max_connections=limits.max_connections,
            max_per_ip=limits.max_connections_per_ip,
            max_outbound=limits.max_outbound_bytes,
            max_body=self.cfg.api.max_body_bytes,
            refuse=endpoints.serve_error,
            others=lambda: len(self.state.connections),
            others_from=lambda ip: self.state.per_ip.get(ip, 0),
        )
        server = self.cfg.server
        ssl_context = (
            tls.server_context(server.tls_cert, server.tls_key) if server.tls_cert else None
        )
        # The link before the server: a message accepted at once needs a slot from the master.
        await self.link.start(self._on_command, self._on_master_gone)
        self.server = await serve(
            self._handle,
            sock=self.spec.listener,
            process_request=endpoints.process_request,
            max_size=frame_limit(self.cfg),
            ping_interval=self.cfg.limits.ping_interval,
            ping_timeout=self.cfg.limits.ping_timeout,
            compression="deflate" if self.cfg.server.compression else None,
            open_timeout=self.cfg.limits.hello_timeout,
            server_header=None,
            ssl=ssl_context,
            create_connection=connection_class(self.front),
        )
        self.moves.server, self.moves.front = self.server, self.front
        self.moves.listen()
        self._tasks.append(asyncio.create_task(self._health_loop()))
        self._tasks.append(asyncio.create_task(self._store_probe_loop()))
        self._tasks.append(asyncio.create_task(self._prewarm()))
        self._tasks.append(asyncio.create_task(self.discovered.sweep()))
        self._tasks.append(asyncio.create_task(self.hub.run_leases()))
        self._tasks.append(asyncio.create_task(self.hub.run_sweeps()))
        self._tasks.append(asyncio.create_task(self.hub.stages.watch_loop()))
        self.hub.stages.watch_gc()
        self.link.send_ready()
        self.link.send({proto.T: proto.OWNER, "owner": self.store.owner})  # chatd.master.takeover
        self.link.start_reporting(self.statistics, 1.0)
        log.info("worker %s serving (generation %d)", self.name, self.spec.generation)
        await self._stop.wait()
        if self._fast:
            await self.stop_now()
        else:
            await self.drain()
        return int(ExitCode.OK)

    def _handle(self, ws: ServerConnection) -> Coroutine[Any, Any, None]:
        return serve_connection(ws, self.state)

    def _ready(self) -> tuple[bool, str]:
        if self.predrain:
            return False, "the daemon is stopping (shutdown_delay): serving until it drains"
        health = self.store.health
        if not health.healthy:
            return False, f"the session store is unavailable: {health.last_error}"
        if self.slots.any_healthy():
            return True, ""
        urls = ", ".join(self.relay.backend(i).url for i in self.relay.live)
        return False, f"no LLM backend is healthy ({urls or 'none: no address discovered'})"

    async def _prewarm(self) -> None:
        """Load the default model on every backend, so the first message is not a cold start."""
        await asyncio.gather(*(self.relay.prewarm(i, self.cfg.llm.model) for i in self.relay.live))

    async def _store_probe_loop(self) -> None:
        """Probe the store (a write that changes no session) every STORE_PROBE_S while it is
        unavailable, so its recovery is seen without a client's message, and every
        STORE_PROBE_HEALTHY_S while it works, so an outage is seen on an idle worker too (a
        full disk fails the writes of every worker, not only of the one that wrote first)."""
        while True:
            healthy = self.store.health.healthy
            await asyncio.sleep(STORE_PROBE_HEALTHY_S if healthy else STORE_PROBE_S)
            try:
                with contextlib.suppress(StoreError):  # recorded by the store's health
                    await self.store.probe()
            except Exception:  # a bug: said, and the probing goes on (only it can recover)
                log.exception("session store probe failed unexpectedly")

    async def _health_loop(self) -> None:
        while True:
            live = self.relay.live  # the discovered addresses change: each round's own
            for i in live:
                ok = await self.relay.check_health(i)
                if ok != self.slots.healthy[i]:
                    level = logging.INFO if ok else logging.WARNING
                    url = self.relay.backend(i).url
                    log.log(level, "backend %s is %s", url, "healthy" if ok else "unhealthy")
                self.slots.set_healthy(i, ok)  # reported to the master, for every class
                self.embed_slots.set_healthy(i, ok)
            down = any(not self.slots.healthy[i] for i in live)
            await asyncio.sleep(1.0 if down else HEALTH_INTERVAL)

    async def _alive(self) -> tuple[bool, str]:
        """For ``/livez``: this worker's loop answers (it runs this) and so does the master's:
        one round trip over the link (the metrics request, which the master answers from its
        loop), so a hung or stopped master fails the probe."""
        try:
            await self.link.request({proto.T: proto.METRICS_REQUEST}, proto.METRICS, LIVEZ_WAIT)
        except (TimeoutError, ConnectionError) as exc:
            return False, f"the master did not answer within {LIVEZ_WAIT:g}s ({exc or 'timeout'})"
        return True, ""

    # -- reporting ------------------------------------------------------------------------

    async def _metrics(self) -> str | None:
        """The daemon-wide ``/metrics`` text, from the master's figures (None: no answer)."""
        try:
            answer = await self.link.request(
                {proto.T: proto.METRICS_REQUEST}, proto.METRICS, METRICS_WAIT
            )
        except (TimeoutError, ConnectionError) as exc:
            log.warning("/metrics: no figures from the master (%s)", str(exc) or "timed out")
            return None
        data = answer.get("data")
        return render(data if isinstance(data, dict) else {})

    def statistics(self) -> dict[str, Any]:
        """The ``stats`` message sent to the master every second (:mod:`chatd.worker.report`)."""
        msg = stats_message(
            self.cfg, self.state, self.hub, self.store, self.slots, self.embed_slots
        )
        msg["http"] = self.api.stats.report()  # the Ollama/OpenAI APIs' (chatd.metrics_http)
        msg["stages"] = self.hub.stages.report()  # where the time goes (chatd.metrics_stages)
        msg.update(self.moves.report())  # open WebSockets moved between workers
        return msg

    # -- 4-6: stop ------------------------------------------------------------------------

    def request_stop(self, fast: bool) -> None:
        """Stop serving: gracefully (drain) or, with ``fast``, at once."""
        self._fast = self._fast or fast
        self._stop.set()

    def _on_command(self, msg: dict[str, Any]) -> None:
        kind = msg.get("t")
        if kind in MasterSlots.MESSAGES:
            dispatch(msg, self.slot_classes)
        elif kind in Discovered.MESSAGES:
            self.discovered.on_message(msg)
        elif kind in FleetSync.MESSAGES:
            self.fleet.on_message(msg)
        elif kind == proto.STORED:
            session, seq = msg.get("session"), msg.get("seq")
            if isinstance(session, str):
                self.hub.on_stored(session, seq if isinstance(seq, int) else 0)
        elif kind == proto.OWNER_GONE:  # a worker of this host died: take its messages over
            leases.on_owner_gone(self.hub, msg.get("owner"))
        elif kind == proto.PREDRAIN:
            if not self.predrain:
                log.info("the daemon stops soon (shutdown_delay): /healthz and /readyz answer 503")
            self.predrain = True
        elif kind == "drain":
            self.state.handover = bool(msg.get("handover", False))
            successor = msg.get("successor")
            self._successor = successor if isinstance(successor, int) else 0
            self.request_stop(False)
        elif kind == "stop":
            self.request_stop(True)

    def _on_master_gone(self) -> None:
        log.warning("the master is gone: draining and exiting")
        for slots in self.slot_classes.values():
            slots.link_gone()
        self.request_stop(False)

    async def drain(self) -> None:
        """Graceful stop, in order:

        1. refuse new sessions (``hello`` gets ``shutting_down``), stop accepting connections
           and claiming messages; open connections still get their messages acknowledged;
        2. let the replies in flight finish, up to ``graceful_timeout``, and each connection go
           as soon as it is idle: moved to the successor the master named (``handoff``), else
           closed with 1001 once its frames are written (:mod:`chatd.worker.closing`);
        3. close what is left with 1001 (resume elsewhere);
        4. stop the generations still running and hand their leases back, so another worker
           takes them over at once; flush the store and close the pools.
        """
        self.state.draining = True
        self.hub.sweeping = False
        self.link.send_draining()
        assert self.server is not None
        self.server.close(close_connections=False)
        if self.front is not None:
            self.front.close_http()
        deadline = time.monotonic() + self.cfg.server.graceful_timeout
        mover = None
        if self.state.handover and self._successor:
            fallback = self.closing.fallback
            mover = await self.moves.start_moving(self._successor, deadline, fallback)
            if mover is None:  # handoff off or impossible: the master need not wait for it
                self.link.send({proto.T: proto.HANDOFF_DONE})
        else:
            self.moves.adopter.close()
        placed = None
        if mover is not None:  # the master's roll waits for this, not for the replies
            placed = asyncio.create_task(self._when_placed(mover, deadline))
        await self.closing.wait_replies(deadline, mover)
        if mover is not None and placed is not None:
            await mover.finish()
            await placed
            stats = mover.stats
            log.info(
                "handoff to pid %d: %d connections moved, %d closed with 1001 instead, "
                "%d deferrals, in %.1f ms",
                *(self._successor, stats.moved, stats.fell_back, stats.deferred),
                (stats.finished - stats.started) * 1000,
            )
        with contextlib.suppress(TimeoutError):  # the API requests being answered, too
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self.api.wait_idle()
        if self.hub.running:
            log.warning(
                "drain: %d replies still running after the graceful timeout", self.hub.in_flight
            )
        # Before the 1001: a client resuming elsewhere then finds its unanswered messages'
        # leases handed back, and its new worker claims them at the hello.
        self.state.closing = True
        await self.closing.stop_generations()
        await self.closing.close_all(max(1.0, deadline - time.monotonic()))
        await self._shutdown()

    async def _when_placed(self, mover: Mover, deadline: float) -> None:
        """Tell the master ``handoff_done`` once every connection moved or is falling back
        (or at the deadline), with the counts then."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await mover.placed()
        self.link.send({proto.T: proto.HANDOFF_DONE, **mover.stats.to_wire()})

    async def stop_now(self) -> None:
        """Fast stop: close the clients with 1001 at once; replies in flight stay unanswered."""
        self.state.draining = self.state.closing = True
        if self.server is not None:
            self.server.close(close_connections=False)
        if self.front is not None:
            self.front.close_http()
        await self.closing.stop_generations()
        await self.closing.close_all(1.0)
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self.front is not None:
            self.front.abort_http()
        await self.closing.stop_generations()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.server.wait_closed()
        await self.relay.close()
        await self.store.close()
        if self.notices is not None:  # after the store: the notices of the last finals
            await self.notices.close()
        await self.fleet.close()
        with contextlib.suppress(Exception):  # the last counters (a drain's handoff): kept
            self.link.send(self.statistics())  # by the master once this worker has exited
        self.link.close()


def run_worker(spec: WorkerSpec) -> NoReturn:
    """The forked worker's main: never returns; the process exits with the worker's code."""
    faults.at_worker_start()  # CHATD_FAULT (tests only): may exit here, before anything starts
    code = int(ExitCode.WORKER_BOOT_ERROR)
    try:
        setproctitle(f"chatd: worker {spec.slot} gen {spec.generation}")
        set_role(f"worker {spec.slot}")
        # The store's writer thread needs the GIL between its SQLite steps; at the default
        # 5 ms switch interval a busy event loop starves it (ack p99 of seconds, measured).
        sys.setswitchinterval(1e-4)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            code = runner.run(Worker(spec).run())
    except BaseException:
        log.exception("worker %d crashed", spec.slot)
        code = int(ExitCode.FAILURE)
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)
