"""chatd's configuration: frozen dataclasses, loaded once from TOML and validated whole.

The schema is declared once, as the dataclass fields of :mod:`chatd.config_schema`: each field's
default is the documented default and its ``metadata`` carries the one-line doc and the check.
This module reads a file (or command-line flags) into those classes, and is where callers import
them from. :func:`load` reports every problem of a file at once, each as
``PATH: section.key: what is wrong (expected ..., got ...)``, with the line where it is known,
and raises :class:`~chatd.errors.ConfigError`. Nothing unknown is silently ignored.

Runtime objects (sockets, pools, stores) are built *from* a :class:`Config` by the role
modules, never in here; a reload parses a new :class:`Config` completely before anything is
touched.
"""

from __future__ import annotations

import dataclasses
import re
import ssl
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from chatd import tls
from chatd.config_checks import (
    Check,
    at_least,
    check_bind,
    check_discoverable,
    check_secret,
    check_store,
    check_url,
    one_of,
)
from chatd.config_schema import (
    SECTIONS,
    ApiConfig,
    AuthConfig,
    BackendConfig,
    Config,
    ControlConfig,
    LimitsConfig,
    LLMConfig,
    LogConfig,
    ServerConfig,
    SessionsConfig,
)
from chatd.errors import ConfigError

__all__ = [
    "DEFAULT_PATH",
    "ApiConfig",
    "AuthConfig",
    "BackendConfig",
    "Config",
    "ControlConfig",
    "LLMConfig",
    "LimitsConfig",
    "LogConfig",
    "ServerConfig",
    "SessionsConfig",
    "load",
    "parse",
    "with_overrides",
]

DEFAULT_PATH = "/etc/chatd/chatd.toml"


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
        # "llm.backends[2]": the key in the third [[llm.backends]] table, not the first.
        base, _, index = section.partition("[")
        want = int(index.rstrip("]")) if index.rstrip("]").isdigit() else 0
        current, seen = "", -1
        for no, raw in enumerate(self.lines, 1):
            line = raw.strip()
            header = re.fullmatch(r"\[\[?\s*([^\]]+?)\s*\]\]?(\s*#.*)?", line)
            if header:
                current = header.group(1)
                seen += current == base
                if not base and current == key:
                    return no
                continue
            if current == base and seen == want and re.match(rf"{re.escape(key)}\s*=", line):
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
        secret = f.metadata.get("secret", False)  # a credential: never quoted in a problem
        if secret and f.type != "str":  # a list of secrets (auth.tokens): never quoted either
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                out.add(dotted, "expected a list of strings")
                continue
        elif secret and not isinstance(value, str):
            out.add(dotted, "expected a string")
            continue
        converted = _convert(value, f.type, dotted, out)
        if converted is None:
            continue
        check: Check | None = f.metadata.get("check")
        problem = check(converted) if check else None
        if problem:
            out.add(dotted, problem if secret else f"{problem}, got {value!r}")
            continue
        values[key] = converted
    return cls(**values)


def _build_backends(value: Any, key: str, out: _Collector) -> tuple[BackendConfig, ...]:
    if not isinstance(value, list) or not value:
        out.add(key, f"expected one or more [[llm.backends]] tables, got {value!r}")
        return LLMConfig().backends
    built = tuple(
        _with_key_file(_build(BackendConfig, t, f"{key}[{i}]", out), f"{key}[{i}]", out)
        for i, t in enumerate(value)
    )
    urls = [b.url for b in built]
    if len(set(urls)) != len(urls):
        out.add(key, f"each backend url must appear once, got {urls!r}")
    for i, b in enumerate(built):
        # The url passed check_url (else it is the default, which is static).
        problem = check_discoverable(b.url) if b.discover == "dns" else None
        if problem:
            out.add(f"{key}[{i}].url", f"{problem}, got {b.url!r}")
    return built


def _with_key_file(b: BackendConfig, key: str, out: _Collector) -> BackendConfig:
    """``b`` with ``api_key`` read from ``api_key_file`` (stripped of surrounding whitespace),
    when that is set; a problem (both keys set, an unreadable, empty or invalid file) is added
    to ``out``, naming the key, never quoting the file's content."""
    if not b.api_key_file:
        return b
    dotted = f"{key}.api_key_file"
    if b.api_key:
        out.add(dotted, "api_key and api_key_file are exclusive: set only one")
        return b
    path = Path(b.api_key_file)
    if not path.is_absolute() and Path(out.path).is_absolute():
        path = Path(out.path).parent / path
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        out.add(dotted, f"cannot read {str(path)!r}: {exc.strerror or exc}")
        return b
    except UnicodeDecodeError:
        out.add(dotted, f"{str(path)!r} is not UTF-8 text")
        return b
    except ValueError:  # a NUL in the name (found by tests/unit/test_config_property.py)
        out.add(dotted, f"{str(path)!r} is not a file name")
        return b
    problem = "is empty" if not secret else check_secret(secret)
    if problem:
        out.add(dotted, f"the key in {str(path)!r} {problem}")
        return b
    return dataclasses.replace(b, api_key=secret)


def _read_tokens(name: str, dotted: str, out: _Collector) -> tuple[str, ...] | None:
    """The tokens in the file ``name``: one per line, blank lines and ``#`` comments ignored.

    A relative ``name`` is relative to the config file's directory (systemd starts chatd in
    ``/``). Returns None after adding a problem to ``out`` (naming ``dotted``, never quoting a
    token) when the file cannot be read, is not UTF-8, holds no token (an empty file must not
    turn authentication off) or a token that cannot travel in an HTTP header.
    """
    path = Path(name)
    if not path.is_absolute() and Path(out.path).is_absolute():
        path = Path(out.path).parent / path
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        out.add(dotted, f"cannot read {str(path)!r}: {exc.strerror or exc}")
        return None
    except ValueError as exc:  # a NUL in the name, or UnicodeDecodeError
        what = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else "not a file name"
        out.add(dotted, f"{str(path)!r}: {what}")
        return None
    tokens = []
    for no, raw in enumerate(text.splitlines(), 1):
        token = raw.strip()
        if not token or token.startswith("#"):
            continue
        problem = check_secret(token)
        if problem:
            out.add(dotted, f"the token on line {no} of {str(path)!r} {problem}")
            return None
        tokens.append(token)
    if not tokens:
        out.add(dotted, f"{str(path)!r} holds no token (an empty file would turn auth off)")
        return None
    return tuple(tokens)


def _with_token_files(cfg: Config, out: _Collector) -> Config:
    """``cfg`` with ``[auth] tokens`` read from ``tokens_file`` and ``[server] metrics_token``
    from ``metrics_token_file``, when those are set (see :func:`_read_tokens`). Each file key
    is exclusive with the key it fills: both set is a problem."""
    auth, server = cfg.auth, cfg.server
    if auth.tokens_file:
        if auth.tokens:
            out.add("auth.tokens_file", "tokens and tokens_file are exclusive: set only one")
        else:
            tokens = _read_tokens(auth.tokens_file, "auth.tokens_file", out)
            auth = dataclasses.replace(auth, tokens=tokens or ())
    if server.metrics_token_file:
        dotted = "server.metrics_token_file"
        if server.metrics_token:
            out.add(dotted, "metrics_token and metrics_token_file are exclusive: set only one")
        else:
            tokens = _read_tokens(server.metrics_token_file, dotted, out)
            if tokens and len(tokens) > 1:
                out.add(dotted, f"expected one token, found {len(tokens)}")
            elif tokens:
                server = dataclasses.replace(server, metrics_token=tokens[0])
    return dataclasses.replace(cfg, auth=auth, server=server)


def _with_tls(cfg: Config, out: _Collector) -> Config:
    """``[server] tls_cert`` and ``tls_key``: both or neither; made absolute (relative to the
    config file's directory); loaded once, so ``--check`` refuses what a worker would."""
    server = cfg.server
    if not server.tls_cert and not server.tls_key:
        return cfg
    if not (server.tls_cert and server.tls_key):
        missing = "tls_key" if server.tls_cert else "tls_cert"
        out.add(f"server.{missing}", "tls_cert and tls_key go together: set both, or neither")
        return cfg
    base = Path(out.path).parent if Path(out.path).is_absolute() else Path()
    cert, key = (str((base / p).absolute()) for p in (server.tls_cert, server.tls_key))
    try:
        tls.server_context(cert, key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        out.add("server.tls_cert", f"cannot load {cert} with its key {key}: {exc}")
        return cfg
    return dataclasses.replace(cfg, server=dataclasses.replace(server, tls_cert=cert, tls_key=key))


def _cross_checks(cfg: Config, out: _Collector) -> None:
    """Checks that involve more than one key."""
    if cfg.llm.first_token_timeout > cfg.llm.total_timeout:
        out.add("llm.first_token_timeout", "must not exceed llm.total_timeout")
    if cfg.sessions.min_replicas_acks and cfg.sessions.sqlite_path is not None:
        # Silently ignored, it would promise a durability SQLite does not give.
        out.add("sessions.min_replicas_acks", "needs a Redis store (SQLite has no replicas)")


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
    cfg = _with_tls(_with_token_files(Config(**sections, path=path), out), out)
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
        check("--bind", bind, check_bind)
        server = dataclasses.replace(server, bind=bind)
    if workers is not None:
        check("--workers", workers, at_least(0))
        server = dataclasses.replace(server, workers=workers)
    if control_socket is not None:
        control = dataclasses.replace(control, socket=control_socket)
    if store is not None:
        check("--store", store, check_store)
        sessions = dataclasses.replace(sessions, store=store)
    if backends:
        built = []
        for url in backends:
            url, _, api = url.partition("#")
            check("--backend", url, check_url)
            check("--backend", api or "ollama", one_of("ollama", "openai"))
            built.append(BackendConfig(url=url, api=api or "ollama"))
        llm = dataclasses.replace(llm, backends=tuple(built))
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(cfg, server=server, control=control, sessions=sessions, llm=llm)
