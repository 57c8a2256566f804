"""chatd's configuration schema: the frozen dataclasses, their defaults, docs and checks.

One job: declare every key once, as a dataclass field whose default is the documented default
(``spec/interfaces.md``) and whose ``metadata`` carries the one-line doc (``"doc"``) and the value
check (``"check"``, a :data:`Check`). No I/O and no TOML here: :mod:`chatd.config` reads files and
flags into these classes, and is where callers import them from. :data:`SECTIONS` maps each TOML
table to its class; :func:`schema` and :func:`iter_keys` list the keys with their defaults.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

Check = Callable[[Any], str | None]
"""A value check: returns what is wrong with the value, or None when it is fine."""


def _doc(doc: str, check: Check | None = None) -> dict[str, Any]:
    return {"doc": doc, "check": check}


def at_least(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo:g}"


def positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else "must be one of " + ", ".join(map(repr, choices))


def parse_bind(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:8000`` for IPv6) into host and port; raises ValueError."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit():
        raise ValueError("expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError("expected HOST:PORT with a host")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError("port must be 0..65535")
    if not re.fullmatch(r"[A-Za-z0-9.\-]+", host):
        ipaddress.ip_address(host)  # IPv6 literal, or ValueError
    return host, port


def check_bind(v: str) -> str | None:
    try:
        parse_bind(v)
    except ValueError as exc:
        return f'{exc} (for example "0.0.0.0:8000")'
    return None


def check_mode(v: str) -> str | None:
    return None if re.fullmatch(r"0?[0-7]{3}", v) else 'must be an octal mode such as "0660"'


def check_store(v: str) -> str | None:
    if v.startswith("sqlite:") and len(v) > len("sqlite:"):
        return None
    if re.fullmatch(r"rediss?://[^/\s]+(/\d+)?", v):
        return None
    return 'must be "sqlite:///ABSOLUTE/PATH", "sqlite:relative/path" or "redis://HOST:PORT/DB"'


def check_url(v: str) -> str | None:
    return None if re.fullmatch(r"https?://[^/\s]+/?", v) else 'must be "http://HOST:PORT"'


def check_level(v: str) -> str | None:
    return one_of("debug", "info", "warning", "error")(v.lower())


def check_keep_alive(v: str) -> str | None:
    ok = re.fullmatch(r"-?\d+(\.\d+)?(ns|us|ms|s|m|h)?", v) or re.fullmatch(r"(\d+[hms])+", v)
    return None if ok else 'must be a duration such as "5m", "30s" or "-1" (forever)'


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """``[server]``: the listening socket and the worker processes."""

    bind: str = field(default="0.0.0.0:8000", metadata=_doc("HOST:PORT to listen on", check_bind))
    workers: int = field(
        default=0, metadata=_doc("worker processes; 0 = one per CPU core", at_least(0))
    )
    graceful_timeout: float = field(
        default=30.0,
        metadata=_doc("seconds a draining worker may take to finish replies", positive),
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
        default="/run/chatd/control.sock", metadata=_doc("path of the control socket")
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

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")


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
        metadata=_doc('"sqlite:///ABSOLUTE/PATH" or "redis://HOST:PORT/DB"', check_store),
    )
    history_turns: int = field(
        default=20, metadata=_doc("past turns sent to the model as context", at_least(0))
    )
    ttl: int = field(
        default=604800,
        metadata=_doc("seconds a session is kept after its last activity", at_least(1)),
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
    """``[limits]``: per-connection and per-worker limits."""

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


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """``[auth]``: optional bearer tokens and allowed origins."""

    tokens: tuple[str, ...] = field(default=(), metadata=_doc("empty = no auth"))
    allowed_origins: tuple[str, ...] = field(default=(), metadata=_doc("empty = any"))


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
    log: LogConfig = LogConfig()
    path: str = ""


SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "control": ControlConfig,
    "llm": LLMConfig,
    "sessions": SessionsConfig,
    "limits": LimitsConfig,
    "auth": AuthConfig,
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
