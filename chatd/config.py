"""chatd's configuration: frozen dataclasses, loaded once from TOML and validated whole.

The schema is declared once, as the dataclass fields below: each field's default is the
documented default (``spec/interfaces.md``) and its ``metadata`` carries the one-line doc and
the check. :func:`load` reports every problem of a file at once, each as
``PATH: section.key: what is wrong (expected ..., got ...)``, with the line where it is known,
and raises :class:`~chatd.errors.ConfigError`. Nothing unknown is silently ignored.

Runtime objects (sockets, pools, stores) are built *from* a :class:`Config` by the role
modules, never in here; a reload parses a new :class:`Config` completely before anything is
touched.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatd.errors import ConfigError

DEFAULT_PATH = "/etc/chatd/chatd.toml"

Check = Callable[[Any], str | None]
"""A value check: returns what is wrong with the value, or None when it is fine."""


def _doc(doc: str, check: Check | None = None) -> dict[str, Any]:
    return {"doc": doc, "check": check}


def _at_least(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo:g}"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _one_of(*choices: str) -> Check:
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


def _check_bind(v: str) -> str | None:
    try:
        parse_bind(v)
    except ValueError as exc:
        return f'{exc} (for example "0.0.0.0:8000")'
    return None


def _check_mode(v: str) -> str | None:
    return None if re.fullmatch(r"0?[0-7]{3}", v) else 'must be an octal mode such as "0660"'


def _check_store(v: str) -> str | None:
    if v.startswith("sqlite:") and len(v) > len("sqlite:"):
        return None
    if re.fullmatch(r"rediss?://[^/\s]+(/\d+)?", v):
        return None
    return 'must be "sqlite:///ABSOLUTE/PATH", "sqlite:relative/path" or "redis://HOST:PORT/DB"'


def _check_url(v: str) -> str | None:
    return None if re.fullmatch(r"https?://[^/\s]+/?", v) else 'must be "http://HOST:PORT"'


def _check_level(v: str) -> str | None:
    return _one_of("debug", "info", "warning", "error")(v.lower())


def _check_keep_alive(v: str) -> str | None:
    ok = re.fullmatch(r"-?\d+(\.\d+)?(ns|us|ms|s|m|h)?", v) or re.fullmatch(r"(\d+[hms])+", v)
    return None if ok else 'must be a duration such as "5m", "30s" or "-1" (forever)'


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """``[server]``: the listening socket and the worker processes."""

    bind: str = field(default="0.0.0.0:8000", metadata=_doc("HOST:PORT to listen on", _check_bind))
    workers: int = field(
        default=0, metadata=_doc("worker processes; 0 = one per CPU core", _at_least(0))
    )
    graceful_timeout: float = field(
        default=30.0,
        metadata=_doc("seconds a draining worker may take to finish replies", _positive),
    )
    worker_timeout: float = field(
        default=30.0,
        metadata=_doc(
            "seconds without a heartbeat before a worker is killed and replaced", _positive
        ),
    )
    max_worker_rss_mb: int = field(
        default=0, metadata=_doc("0 = off; above it a worker is recycled gracefully", _at_least(0))
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
        default="0660", metadata=_doc("permissions of the control socket", _check_mode)
    )

    @property
    def mode_bits(self) -> int:
        return int(self.mode, 8)


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig:
    """One ``[[llm.backends]]`` table: an Ollama (or OpenAI-compatible) server."""

    url: str = field(default="http://127.0.0.1:11434", metadata=_doc("base URL", _check_url))
    api: str = field(
        default="ollama",
        metadata=_doc(
            '"ollama" (/api/chat, NDJSON) or "openai" (/v1/chat/completions, SSE)',
            _one_of("ollama", "openai"),
        ),
    )
    max_parallel: int = field(
        default=4,
        metadata=_doc("in-flight requests to this backend, all workers together", _at_least(1)),
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
        metadata=_doc("messages waiting for a slot, across the whole daemon", _at_least(0)),
    )
    connect_timeout: float = field(
        default=2.0, metadata=_doc("seconds to connect to a backend", _positive)
    )
    first_token_timeout: float = field(
        default=5.0,
        metadata=_doc("from request to first token when the model is loaded", _positive),
    )
    load_timeout: float = field(
        default=300.0, metadata=_doc("first-token deadline while the model is loading", _positive)
    )
    idle_timeout: float = field(
        default=30.0, metadata=_doc("longest gap between two tokens", _positive)
    )
    total_timeout: float = field(
        default=300.0, metadata=_doc("longest whole generation", _positive)
    )
    keep_alive: str = field(default="5m", metadata=_doc("passed to Ollama", _check_keep_alive))
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
        metadata=_doc('"sqlite:///ABSOLUTE/PATH" or "redis://HOST:PORT/DB"', _check_store),
    )
    history_turns: int = field(
        default=20, metadata=_doc("past turns sent to the model as context", _at_least(0))
    )
    ttl: int = field(
        default=604800,
        metadata=_doc("seconds a session is kept after its last activity", _at_least(1)),
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
        default=16384, metadata=_doc("longest message text", _at_least(1))
    )
    max_connections: int = field(
        default=10000, metadata=_doc("per worker; beyond it: HTTP 503 + Retry-After", _at_least(1))
    )
    messages_per_minute: int = field(default=60, metadata=_doc("per connection", _at_least(1)))
    hello_timeout: float = field(default=10.0, metadata=_doc("seconds to send hello", _positive))
    ping_interval: float = field(default=20.0, metadata=_doc("seconds between pings", _positive))
    ping_timeout: float = field(default=20.0, metadata=_doc("seconds to answer a ping", _positive))


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """``[auth]``: optional bearer tokens and allowed origins."""

    tokens: tuple[str, ...] = field(default=(), metadata=_doc("empty = no auth"))
    allowed_origins: tuple[str, ...] = field(default=(), metadata=_doc("empty = any"))


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    """``[log]``: level and format of the log lines on stderr."""

    level: str = field(default="info", metadata=_doc("debug, info, warning or error", _check_level))
    format: str = field(default="text", metadata=_doc('"text" or "json"', _one_of("text", "json")))


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


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


class _Collector:
    """Gathers problems, each located by file, dotted key and, where found, line."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.problems: list[str] = []

    def add(self, key: str, what: str) -> None:
        line = self._line_of(key)
        where = f"{self.path}:{line}" if line else self.path
        self.problems.append(f"{where}: {key}: {what}")

    def _line_of(self, dotted: str) -> int | None:
        """Best-effort line of ``section.key`` (tomllib keeps no positions for values)."""
        parts = dotted.split(".")
        section, key = ".".join(parts[:-1]), parts[-1].split("[")[0]
        current = ""
        for no, raw in enumerate(self.lines, 1):
            line = raw.strip()
            header = re.fullmatch(r"\[\[?\s*([^\]]+?)\s*\]\]?(\s*#.*)?", line)
            if header:
                current = header.group(1)
                if not section.split("[")[0] and current == key:
                    return no
                continue
            if current == section.split("[")[0] and re.match(rf"{re.escape(key)}\s*=", line):
                return no
        return None


def _convert(value: Any, ftype: Any, key: str, out: _Collector) -> Any:
    """Check one value against a field type; returns the converted value or None (problem added)."""
    if ftype in ("tuple[str, ...]",):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            out.add(key, f"expected a list of strings, got {value!r}")
            return None
        return tuple(value)
    pytype = {"bool": bool, "int": int, "float": float, "str": str}[ftype]
    ok = isinstance(value, pytype) and not (pytype is not bool and isinstance(value, bool))
    if pytype is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        out.add(key, f"expected {_TYPE_NAMES[pytype]}, got {value!r}")
        return None
    return value


def _build(cls: type[Any], table: Any, prefix: str, out: _Collector) -> Any:
    """Build one section dataclass from its TOML table, adding every problem to ``out``."""
    if not isinstance(table, Mapping):
        out.add(prefix, f"expected a table, got {table!r}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        f = fields.get(key)
        if f is None:
            out.add(dotted, "unknown key (expected one of " + ", ".join(fields) + ")")
            continue
        if cls is LLMConfig and key == "backends":
            values[key] = _build_backends(value, dotted, out)
            continue
        converted = _convert(value, f.type, dotted, out)
        if converted is None:
            continue
        check: Check | None = f.metadata.get("check")
        problem = check(converted) if check else None
        if problem:
            out.add(dotted, f"{problem}, got {value!r}")
            continue
        values[key] = converted
    return cls(**values)


def _build_backends(value: Any, key: str, out: _Collector) -> tuple[BackendConfig, ...]:
    if not isinstance(value, list) or not value:
        out.add(key, f"expected one or more [[llm.backends]] tables, got {value!r}")
        return LLMConfig().backends
    built = tuple(_build(BackendConfig, t, f"{key}[{i}]", out) for i, t in enumerate(value))
    urls = [b.url for b in built]
    if len(set(urls)) != len(urls):
        out.add(key, f"each backend url must appear once, got {urls!r}")
    return built


def _cross_checks(cfg: Config, out: _Collector) -> None:
    """Checks that involve more than one key."""
    if cfg.llm.first_token_timeout > cfg.llm.total_timeout:
        out.add("llm.first_token_timeout", "must not exceed llm.total_timeout")


def parse(text: str, path: str = "<string>") -> Config:
    """Parse and validate a TOML document; raises ConfigError listing every problem."""
    out = _Collector(path, text)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message carries "(at line X, column Y)" on 3.11-3.13.
        raise ConfigError([f"{path}: TOML syntax error: {exc}"]) from None
    sections: dict[str, Any] = {}
    for name, table in doc.items():
        cls = SECTIONS.get(name)
        if cls is None:
            out.add(name, "unknown section (expected one of " + ", ".join(SECTIONS) + ")")
            continue
        sections[name] = _build(cls, table, name, out)
    cfg = Config(**sections, path=path)
    _cross_checks(cfg, out)
    if out.problems:
        raise ConfigError(out.problems)
    return cfg


def load(path: str | None) -> Config:
    """Load the file at ``path``; with None, the default path if it exists, else the defaults.

    Raises:
        ConfigError: the file cannot be read, or has any problem (all of them are listed).
    """
    if path is None:
        if not Path(DEFAULT_PATH).exists():
            return Config()
        path = DEFAULT_PATH
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    return parse(text, str(Path(path).resolve()))


def with_overrides(
    cfg: Config,
    *,
    bind: str | None = None,
    workers: int | None = None,
    control_socket: str | None = None,
    store: str | None = None,
    backends: Sequence[str] | None = None,
) -> Config:
    """Apply command-line flags over a loaded config (flags win); checks them like the file.

    ``backends`` replaces the backend list; each URL may end with ``#openai`` to pick that API.
    """
    problems: list[str] = []

    def check(flag: str, value: Any, chk: Check) -> None:
        p = chk(value)
        if p:
            problems.append(f"{flag}: {p}, got {value!r}")

    server, control, sessions, llm = cfg.server, cfg.control, cfg.sessions, cfg.llm
    if bind is not None:
        check("--bind", bind, _check_bind)
        server = dataclasses.replace(server, bind=bind)
    if workers is not None:
        check("--workers", workers, _at_least(0))
        server = dataclasses.replace(server, workers=workers)
    if control_socket is not None:
        control = dataclasses.replace(control, socket=control_socket)
    if store is not None:
        check("--store", store, _check_store)
        sessions = dataclasses.replace(sessions, store=store)
    if backends:
        built = []
        for url in backends:
            url, _, api = url.partition("#")
            check("--backend", url, _check_url)
            check("--backend", api or "ollama", _one_of("ollama", "openai"))
            built.append(BackendConfig(url=url, api=api or "ollama"))
        llm = dataclasses.replace(llm, backends=tuple(built))
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(cfg, server=server, control=control, sessions=sessions, llm=llm)


def iter_keys() -> Iterable[tuple[str, str, Any, str]]:
    """Every ``(section, key, default, doc)``, in declaration order (used to check etc/)."""
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield name, f.name, _default(f), f.metadata.get("doc", "")
    for f in dataclasses.fields(BackendConfig):
        yield "llm.backends", f.name, _default(f), f.metadata.get("doc", "")
