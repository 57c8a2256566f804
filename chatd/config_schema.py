"""chatd's configuration schema: the frozen dataclasses, their defaults, docs and checks.

One job: declare every key once, as a dataclass field whose default is the documented default
(``spec/interfaces.md``) and whose ``metadata`` carries the one-line doc (``"doc"``) and the value
check (``"check"``, from :mod:`chatd.config_checks`). No I/O and no TOML here: :mod:`chatd.config`
reads files and flags into these classes, and is where callers import them from.
:data:`SECTIONS` maps each TOML table to its class; :func:`schema` and :func:`iter_keys` list
the keys with their defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from chatd.config_checks import (
    Check,
    at_least,
    check_bind,
    check_header_name,
    check_keep_alive,
    check_level,
    check_mode,
    check_nameservers,
    check_networks,
    check_secret,
    check_socket_path,
    check_store,
    check_url,
    one_of,
    parse_bind,
    positive,
)


def _doc(doc: str, check: Check | None = None) -> dict[str, Any]:
    return {"doc": doc, "check": check}


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """``[server]``: the listening socket and the worker processes."""

    bind: str = field(default="0.0.0.0:8000", metadata=_doc("HOST:PORT to listen on", check_bind))
    workers: int = field(
        default=0,
        metadata=_doc(
            "worker processes; 0 = one per CPU it may use (affinity, cgroup quota)", at_least(0)
        ),
    )
    graceful_timeout: float = field(
        default=30.0,
        metadata=_doc("seconds a draining worker may take to finish replies", positive),
    )
    shutdown_delay: float = field(
        default=0.0,
        metadata=_doc(
            "seconds between SIGTERM and the drain: /healthz and /readyz answer 503 while "
            "chatd keeps serving, so load balancers that probe the pods take this one out "
            "first; 0 = drain at once",
            at_least(0),
        ),
    )
    worker_timeout: float = field(
        default=30.0,
        metadata=_doc(
            "seconds without a heartbeat before a worker is killed and replaced", positive
        ),
    )
    max_worker_rss_mb: int = field(
        default=0, metadata=_doc("0 = off; above it a worker is recycled gracefully", at_least(0))
    )
    compression: bool = field(
        default=False,
        metadata=_doc("permessage-deflate: ~47 KB per idle connection instead of ~14 KB"),
    )
    handoff: bool = field(
        default=True,
        metadata=_doc(
            "a reload, an RSS recycle or a scale-down moves each open WebSocket to a worker of "
            "the new generation (its TCP socket and chat state) instead of closing it with "
            "1001; never with compression or TLS (their state cannot move): those drain as "
            "with false"
        ),
    )
    metrics_token: str = field(
        default="",
        repr=False,
        metadata={
            **_doc(
                'GET /metrics requires "Authorization: Bearer TOKEN"; "" = /metrics is public',
                check_secret,
            ),
            "secret": True,
        },
    )
    metrics_token_file: str = field(
        default="",
        metadata=_doc(
            "file holding metrics_token (relative: to the config file's directory), read at "
            "start and at every reload; exclusive with metrics_token"
        ),
    )
    tls_cert: str = field(
        default="",
        metadata=_doc(
            "PEM certificate chain; with tls_key the port speaks TLS (wss://, https://); read "
            "by every new worker, so a renewed certificate takes effect at chatctl reload"
        ),
    )
    tls_key: str = field(default="", metadata=_doc("PEM private key of tls_cert"))

    @property
    def host(self) -> str:
        return parse_bind(self.bind)[0]

    @property
    def port(self) -> int:
        return parse_bind(self.bind)[1]


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlConfig:
    """``[control]``: the Unix socket of the control channel (chatctl, workers)."""

    socket: str = field(
        default="/run/chatd/control.sock",
        metadata=_doc("path of the control socket", check_socket_path),
    )
    mode: str = field(
        default="0660", metadata=_doc("permissions of the control socket", check_mode)
    )

    @property
    def mode_bits(self) -> int:
        return int(self.mode, 8)


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig:
    """One ``[[llm.backends]]`` table: an Ollama (or OpenAI-compatible) server."""

    url: str = field(default="http://127.0.0.1:11434", metadata=_doc("base URL", check_url))
    api: str = field(
        default="ollama",
        metadata=_doc(
            '"ollama" (/api/chat, NDJSON) or "openai" (/v1/chat/completions, SSE)',
            one_of("ollama", "openai"),
        ),
    )
    max_parallel: int = field(
        default=4,
        metadata=_doc("in-flight requests to this backend, all workers together", at_least(1)),
    )
    max_parallel_embed: int = field(
        default=2,
        metadata=_doc(
            "in-flight embedding requests to this backend, all workers together: slots and a "
            "queue of their own, besides max_parallel",
            at_least(1),
        ),
    )
    # A credential: repr=False keeps it out of every repr (a log line, a traceback, a
    # dataclass repr of the whole Config); "secret" keeps it out of config error messages.
    api_key: str = field(
        default="",
        repr=False,
        metadata={
            **_doc('sent as "Authorization: Bearer KEY" on every request; "" = none', check_secret),
            "secret": True,
        },
    )
    api_key_file: str = field(
        default="",
        metadata=_doc(
            "file holding api_key (relative: to the config file's directory), read at start "
            "and at every reload; exclusive with api_key"
        ),
    )
    discover: str = field(
        default="static",
        metadata=_doc(
            '"static": url is one backend; "dns": every address (A and AAAA) of url\'s host '
            "name is a backend of its own, with this table's settings, re-resolved every "
            "discover_interval seconds (a headless Service's pods)",
            one_of("static", "dns"),
        ),
    )
    discover_interval: float = field(
        default=5.0,
        metadata=_doc('seconds between two resolutions of the name (discover = "dns")', positive),
    )

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")

    def capacity(self, kind: str) -> int:
        """The slots of slot class ``kind`` (``chatd.proto.control.SLOT_CLASSES``) on this
        backend: ``max_parallel_embed`` for ``"embed"``, ``max_parallel`` for ``"chat"``."""
        return self.max_parallel_embed if kind == "embed" else self.max_parallel


@dataclass(frozen=True, slots=True, kw_only=True)
class LLMConfig:
    """``[llm]``: models, timeouts and the backends."""

    model: str = field(default="qwen2.5-coder:7b", metadata=_doc("default model"))
    models: tuple[str, ...] = field(
        default=(), metadata=_doc("extra models a client may pick with message.model")
    )
    system_prompt: str = field(default="", metadata=_doc("system prompt sent before the history"))
    max_queue: int = field(
        default=512,
        metadata=_doc("messages waiting for a slot, across the whole daemon", at_least(0)),
    )
    connect_timeout: float = field(
        default=2.0, metadata=_doc("seconds to connect to a backend", positive)
    )
    first_token_timeout: float = field(
        default=5.0,
        metadata=_doc("from request to first token when the model is loaded", positive),
    )
    load_timeout: float = field(
        default=300.0, metadata=_doc("first-token deadline while the model is loading", positive)
    )
    idle_timeout: float = field(
        default=30.0, metadata=_doc("longest gap between two tokens", positive)
    )
    total_timeout: float = field(default=300.0, metadata=_doc("longest whole generation", positive))
    keep_alive: str = field(default="5m", metadata=_doc("passed to Ollama", check_keep_alive))
    nameservers: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            'DNS servers (ADDRESS or ADDRESS:PORT) that resolve the discover = "dns" backends, '
            "asked for A and AAAA records of the name as given; empty = the system's resolver "
            "(getaddrinfo: /etc/hosts, resolv.conf and its search list)",
            check_nameservers,
        ),
    )
    backends: tuple[BackendConfig, ...] = field(
        default=(BackendConfig(),), metadata=_doc("one table per backend")
    )

    @property
    def all_models(self) -> tuple[str, ...]:
        """The default model first, then the extra ones, without duplicates."""
        return tuple(dict.fromkeys((self.model, *self.models)))


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionsConfig:
    """``[sessions]``: where sessions are stored and for how long."""

    store: str = field(
        default="sqlite:///var/lib/chatd/sessions.db",
        metadata=_doc(
            '"sqlite:///ABSOLUTE/PATH", "redis://HOST:PORT/DB" (one Redis), '
            '"redis+sentinel://HOST:PORT,HOST:PORT/MASTER[/DB]" (Sentinel failover) or '
            '"redis+cluster://HOST:PORT,HOST:PORT" (a Redis Cluster)',
            check_store,
        ),
    )
    history_turns: int = field(
        default=20, metadata=_doc("past turns sent to the model as context", at_least(0))
    )
    ttl: int = field(
        default=604800,
        metadata=_doc("seconds a session is kept after its last activity", at_least(1)),
    )
    sqlite_writer: bool = field(
        default=True,
        metadata=_doc(
            "SQLite only: one process of the master's writes for every worker, on one "
            "connection (no page re-reads between workers, one group commit for all); "
            "false: each worker writes the file itself"
        ),
    )
    min_replicas_acks: int = field(
        default=0,
        metadata=_doc(
            "Redis only: replicas that must hold each write before it is acknowledged (WAIT), "
            "so an acknowledged message survives the loss of the master; 0 = the master alone",
            at_least(0),
        ),
    )
    min_replicas_timeout: float = field(
        default=1.0,
        metadata=_doc(
            "seconds a write waits for min_replicas_acks replicas; past it the message is not "
            "acknowledged (store_unavailable: the client sends it again)",
            positive,
        ),
    )

    @property
    def sqlite_path(self) -> str | None:
        """The SQLite file path of ``store`` (``sqlite:///abs`` or ``sqlite:rel``), else None."""
        if not self.store.startswith("sqlite:"):
            return None
        rest = self.store[len("sqlite:") :]
        return rest[2:] if rest.startswith("///") else rest


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    """``[limits]``: per-connection, per-worker and per-client limits."""

    max_message_bytes: int = field(
        default=16384, metadata=_doc("longest message text", at_least(1))
    )
    max_connections: int = field(
        default=10000, metadata=_doc("per worker; beyond it: HTTP 503 + Retry-After", at_least(1))
    )
    messages_per_minute: int = field(default=60, metadata=_doc("per connection", at_least(1)))
    hello_timeout: float = field(default=10.0, metadata=_doc("seconds to send hello", positive))
    ping_interval: float = field(default=20.0, metadata=_doc("seconds between pings", positive))
    ping_timeout: float = field(default=20.0, metadata=_doc("seconds to answer a ping", positive))
    max_outbound_bytes: int = field(
        default=16 * 1024 * 1024,
        metadata=_doc("per connection: unread frames; beyond: close 1008", at_least(65536)),
    )
    max_connections_per_ip: int = field(
        default=0,
        metadata=_doc(
            "per worker and client address; beyond it: HTTP 429 + Retry-After; 0 = no limit",
            at_least(0),
        ),
    )
    max_header_count: int = field(
        default=64, metadata=_doc("request header lines; more: HTTP 431", at_least(8))
    )
    max_header_bytes: int = field(
        default=32768, metadata=_doc("request headers in all; more: HTTP 431", at_least(1024))
    )
    max_worker_outbound_bytes: int = field(
        default=512 * 1024 * 1024,
        metadata=_doc("per worker: all its slow readers' frames; beyond: close", at_least(65536)),
    )
    max_queued_per_key: int = field(
        default=0,
        metadata=_doc(
            "messages of one client waiting for an LLM slot; beyond: busy; 0 = max_queue only",
            at_least(0),
        ),
    )
    max_in_flight_per_key: int = field(
        default=0,
        metadata=_doc("LLM slots one client holds at once; 0 = no limit", at_least(0)),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """``[auth]``: optional bearer tokens and allowed origins."""

    tokens: tuple[str, ...] = field(
        default=(), repr=False, metadata={**_doc("empty = no auth"), "secret": True}
    )
    tokens_file: str = field(
        default="",
        metadata=_doc(
            "file of tokens, one per line, # comments (relative: to the config file's "
            "directory), read at start and at every reload; exclusive with tokens"
        ),
    )
    allowed_origins: tuple[str, ...] = field(default=(), metadata=_doc("empty = any"))


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiConfig:
    """``[api]``: the Ollama- and OpenAI-compatible HTTP APIs on the same port as ``/ws``."""

    ollama: bool = field(
        default=True, metadata=_doc('serve Ollama\'s API (/api/*, "Ollama is running" at /)')
    )
    openai: bool = field(default=True, metadata=_doc("serve OpenAI's API (/v1/*)"))
    user_header: str = field(
        default="",
        metadata=_doc(
            "request header naming the end user behind a trusted proxy (e.g. "
            'X-OpenWebUI-User-Id): each user is then a client of its own; "" = off',
            check_header_name,
        ),
    )
    trusted_proxies: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            "addresses (CIDR) whose user_header is believed; empty = nobody's", check_networks
        ),
    )
    max_body_bytes: int = field(
        default=32 * 1024 * 1024,
        metadata=_doc(
            "a request body (images, embedding batches), per request; beyond: HTTP 413",
            at_least(65536),
        ),
    )
    models_cache: float = field(
        default=5.0,
        metadata=_doc("seconds the backends' model list (/api/tags, /v1/models) is kept", positive),
    )
    access_log: bool = field(
        default=True,
        metadata=_doc("one log line per API request (method, path, client key, status, times)"),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    """``[log]``: level and format of the log lines on stderr."""

    level: str = field(default="info", metadata=_doc("debug, info, warning or error", check_level))
    format: str = field(default="text", metadata=_doc('"text" or "json"', one_of("text", "json")))


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration. ``path`` is the file it came from ("" for built-in defaults)."""

    server: ServerConfig = ServerConfig()
    control: ControlConfig = ControlConfig()
    llm: LLMConfig = LLMConfig()
    sessions: SessionsConfig = SessionsConfig()
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    api: ApiConfig = ApiConfig()
    log: LogConfig = LogConfig()
    path: str = ""


SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "control": ControlConfig,
    "llm": LLMConfig,
    "sessions": SessionsConfig,
    "limits": LimitsConfig,
    "auth": AuthConfig,
    "api": ApiConfig,
    "log": LogConfig,
}


def schema() -> dict[str, dict[str, Any]]:
    """Every section's keys with their defaults: ``{"server": {"bind": "0.0.0.0:8000", ...}}``.

    ``llm.backends`` is given as the list with the one default backend table.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, cls in SECTIONS.items():
        out[name] = {f.name: _default(f) for f in dataclasses.fields(cls)}
    return out


def _default(f: dataclasses.Field[Any]) -> Any:
    factory = f.default_factory
    if f.default is dataclasses.MISSING and callable(factory):
        return factory()
    return f.default


def iter_keys() -> Iterable[tuple[str, str, Any, str]]:
    """Every ``(section, key, default, doc)``, in declaration order (used to check etc/)."""
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield name, f.name, _default(f), f.metadata.get("doc", "")
    for f in dataclasses.fields(BackendConfig):
        yield "llm.backends", f.name, _default(f), f.metadata.get("doc", "")
