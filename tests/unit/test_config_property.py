"""The config loader, by property: any TOML document gives a Config or a ConfigError whose every
problem names a key (or is the TOML syntax error), never another exception; and whatever passes
can be built into what the master and a worker build from it at start.

Documents are generated as dicts (the real sections and keys, unknown ones, values of every TOML
type, and values close to the real ones: URLs, binds, stores with bad ports and hosts) written
out as TOML text, and as raw text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yarl
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import parse_url as redis_parse_url

from chatd import config
from chatd.config_schema import SECTIONS, BackendConfig, iter_keys, parse_bind
from chatd.errors import ConfigError
from chatd.relay.backend import Backend
from chatd.relay.generate import Relay
from chatd.store import open_store
from chatd.worker.http import HttpEndpoints, frame_limit

PATH = "/x/chatd.toml"

# -- generating documents -------------------------------------------------------------------

_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=12)
_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 65535, 65536, 10**6]),
    st.floats(allow_nan=True, allow_infinity=True),
    _text,
    st.datetimes(),
    st.dates(),
    st.times(),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)),
    max_leaves=6,
)

_hosts = ["h", "127.0.0.1", "[::1]", "[::1", "::1", "\u4e2d", "a_b", "-x", "", "h.", "..", "x" * 70]
_ports = ["", ":", ":0", ":1", ":8000", ":65535", ":65536", ":99999", ":abc", ":1x", ":\u00b2"]
_tails = ["", "/", "/0", "/x", "?q=1", "#f", "/99999999999999999999", " "]
_schemes = ["http://", "https://", "ftp://", "redis://", "rediss://", "sqlite:", "sqlite:///", ""]
_addresses = st.builds(
    lambda *parts: "".join(parts),
    st.sampled_from(_schemes),
    st.sampled_from(["", "u:p@", "@"]),
    st.sampled_from(_hosts),
    st.sampled_from(_ports),
    st.sampled_from(_tails),
)
_near_values = st.one_of(
    _addresses,
    st.sampled_from(["0660", "777", "rw", "5m", "-1", "1h30m", "soon", "json", "text", "debug"]),
    st.sampled_from(["ollama", "openai", "INFO", "/run/chatd/c.sock", "", "\x00", "a" * 120]),
)


def _typed(f: dataclasses.Field[Any]) -> st.SearchStrategy[Any]:
    """Values of the field's own type, most near the real ones: those get past the type check
    and reach the value checks (a port, a host, a range)."""
    kind = f.type
    if kind == "bool":
        return st.booleans()
    if kind == "int":
        return st.one_of(st.integers(-2, 70000), st.integers(-(2**63), 2**63 - 1))
    if kind == "float":
        return st.one_of(st.floats(-1, 1000), st.floats(allow_nan=True, allow_infinity=True))
    if kind == "str":
        default = f.default if isinstance(f.default, str) else ""
        return st.one_of(st.just(default), _near_values, _text)
    return st.lists(st.one_of(_text, _near_values), max_size=3)


def _section(cls: type[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Up to three keys (most real, with values mostly of their type), so that many documents
    get past every check and reach the build."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "backends"}
    one = st.sampled_from([*fields, "unknown"]).flatmap(
        lambda name: st.tuples(
            st.just(name),
            st.one_of(_typed(fields[name]), _typed(fields[name]), _values)
            if name in fields
            else _values,
        )
    )
    return st.lists(one, max_size=3).map(dict)


_backends = st.one_of(
    st.lists(_section(BackendConfig), min_size=0, max_size=3),
    _values,
)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(list(SECTIONS)), unique=True, max_size=4)):
        doc[name] = draw(st.one_of(_section(SECTIONS[name]), _section(SECTIONS[name]), _values))
        if name == "llm" and isinstance(doc[name], dict) and draw(st.booleans()):
            doc[name]["backends"] = draw(_backends)
    if draw(st.booleans()):
        doc[draw(_text)] = draw(_values)
    return doc


# -- writing them out -----------------------------------------------------------------------


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _string(k)


def _string(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    assert isinstance(v, dict)
    return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"


def to_toml(doc: dict[str, Any]) -> str:
    """A TOML text for ``doc``: tables as ``[section]``, ``llm.backends`` tables as
    ``[[llm.backends]]`` (so the loader's line lookup is exercised), the rest inline."""
    top = [f"{_key(k)} = {_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    lines = [*top]
    for name, table in doc.items():
        if not isinstance(table, dict):
            continue
        lines.append(f"[{_key(name)}]")
        backends = table.get("backends") if name == "llm" else None
        tables = (
            backends
            if isinstance(backends, list)
            and backends
            and all(isinstance(b, dict) for b in backends)
            else None
        )
        for k, v in table.items():
            if tables is not None and k == "backends":
                continue
            lines.append(f"{_key(k)} = {_value(v)}")
        for b in tables or ():
            lines.append("[[llm.backends]]")
            lines.extend(f"{_key(k)} = {_value(v)}" for k, v in b.items())
    return "\n".join(lines) + "\n"


def key_paths(doc: Any) -> set[str]:
    """Every dotted path a problem may name: sections, keys, ``llm.backends[i].key``."""
    paths = set()
    for name, table in doc.items() if isinstance(doc, dict) else ():
        paths.add(name)
        for k, v in table.items() if isinstance(table, dict) else ():
            paths.add(f"{name}.{k}")
            if isinstance(v, list):
                for i, b in enumerate(v):
                    paths.add(f"{name}.{k}[{i}]")
                    if isinstance(b, dict):
                        paths.update(f"{name}.{k}[{i}].{bk}" for bk in b)
    return paths


# -- the properties -------------------------------------------------------------------------


async def _start_relay(relay: Relay) -> None:
    await relay.start()
    await relay.close()


def build_like_at_start(cfg: config.Config) -> None:
    """What the master and a worker construct from a Config before serving (no I/O)."""
    host, port = parse_bind(cfg.server.bind)  # the master's bind_slots
    assert (cfg.server.host, cfg.server.port) == (host, port)
    path = os.fsencode(cfg.control.socket)  # the master's control socket
    assert path and b"\0" not in path and len(path) < 108, cfg.control.socket
    assert 0 <= cfg.control.mode_bits <= 0o777
    relay = Relay(cfg.llm)  # the worker: its relay's pools (URL parsing), request heads
    asyncio.run(_start_relay(relay))
    for b in cfg.llm.backends:  # aiohttp's requests (health checks, prewarm) parse with yarl
        url = yarl.URL(Backend.of(b).chat_url)
        assert url.host and url.port
    open_store(cfg.sessions)  # builds without I/O; open() parses a Redis URL so:
    if cfg.sessions.sqlite_path is None:
        redis_parse_url(cfg.sessions.store)
    assert frame_limit(cfg) > 0
    HttpEndpoints(cfg, ready=lambda: (True, ""), serving=lambda: True, connections=lambda: 0)


def check(text: str, doc: Any | None) -> None:
    try:
        cfg = config.parse(text, PATH)
    except ConfigError as exc:
        event("ConfigError")
        assert exc.problems
        # A key of the document, or a known key a cross-check names (its default being
        # in conflict with a value given).
        paths = key_paths(doc) | {f"{s}.{k}" for s, k, _, _ in iter_keys()}
        for problem in exc.problems:
            m = re.match(rf"{re.escape(PATH)}(?::\d+)?: (.*)", problem, re.S)
            assert m, problem
            rest = m.group(1)
            if rest.startswith("TOML syntax error"):
                continue
            assert any(rest.startswith(f"{p}: ") for p in paths), (problem, sorted(paths))
        return
    event("Config")
    build_like_at_start(cfg)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Relative paths (sqlite:rel, token files) resolve in a scratch directory."""
    monkeypatch.chdir(tmp_path)
    yield


_SETTINGS = settings(
    max_examples=int(os.environ.get("CHATD_CONFIG_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_SETTINGS
@given(documents())
def test_any_document_gives_a_config_or_key_naming_problems(doc: dict[str, Any]) -> None:
    check(to_toml(doc), doc)


@_SETTINGS
@given(st.text(max_size=200))
def test_any_text_gives_a_config_or_key_naming_problems(text: str) -> None:
    try:
        doc: Any = __import__("tomllib").loads(text)
    except Exception:
        doc = None
    check(text, doc)


@_SETTINGS
@given(st.sampled_from(["url", "store", "bind", "socket"]), _addresses)
def test_any_address_is_refused_naming_its_key_or_builds(key: str, value: str) -> None:
    """The keys a worker or the master parses at start, with addresses near the real ones."""
    section = {"url": "[[llm.backends]]", "store": "[sessions]", "bind": "[server]"}
    doc = {"url": {"llm": {"backends": [{"url": value}]}}, "store": {"sessions": {"store": value}}}
    doc |= {"bind": {"server": {"bind": value}}, "socket": {"control": {"socket": value}}}
    check(f"{section.get(key, '[control]')}\n{key} = {_string(value)}\n", doc[key])


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:11434", "https://h.example/", "http://[::1]:1", "http://a_b:65535"],
)
def test_valid_urls_build(url: str) -> None:
    """Examples of what must keep passing, built like at start."""
    build_like_at_start(config.parse(f'[[llm.backends]]\nurl = "{url}"\n'))
