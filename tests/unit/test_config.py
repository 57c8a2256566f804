"""Configuration: defaults, validation messages, the shipped etc/ file, command-line overrides."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from chatd import config
from chatd.config_schema import iter_keys
from chatd.errors import ConfigError

ETC = Path(__file__).resolve().parents[2] / "etc" / "chatd" / "chatd.toml"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config.parse(text, "/x/chatd.toml")
    return err.value.problems


def test_defaults_are_the_documented_ones() -> None:
    """The built-in defaults are interfaces.md's."""
    cfg = config.Config()
    assert cfg.server.bind == "0.0.0.0:8000" and cfg.server.workers == 0
    assert (cfg.server.host, cfg.server.port) == ("0.0.0.0", 8000)
    assert cfg.control.socket == "/run/chatd/control.sock" and cfg.control.mode_bits == 0o660
    assert cfg.llm.model == "qwen2.5-coder:7b" and cfg.llm.max_queue == 512
    assert cfg.llm.backends == (config.BackendConfig(),)
    assert cfg.llm.backends[0].max_parallel == 4 and cfg.llm.backends[0].api == "ollama"
    assert cfg.sessions.sqlite_path == "/var/lib/chatd/sessions.db"
    assert cfg.limits.max_message_bytes == 16384 and cfg.limits.hello_timeout == 10.0
    assert cfg.auth.tokens == () and cfg.log.level == "info"


def test_config_is_frozen() -> None:
    """Sections cannot be changed after loading."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.Config().server.workers = 3  # type: ignore[misc]


def test_every_problem_is_reported_at_once_with_file_key_and_line() -> None:
    """Unknown sections and keys, wrong types and bad values: all listed, each located."""
    text = """[server]
bind = "nowhere"
workers = -2
colour = "blue"

[llm]
max_queue = "many"
models = ["a", 3]

[[llm.backends]]
url = "ftp://x"
api = "grpc"

[sessions]
store = "mysql://db"

[bogus]
"""
    got = problems(text)
    assert got == [
        "/x/chatd.toml:2: server.bind: expected HOST:PORT "
        "(for example \"0.0.0.0:8000\"), got 'nowhere'",
        "/x/chatd.toml:3: server.workers: must be >= 0, got -2",
        "/x/chatd.toml:4: server.colour: unknown key (expected one of bind, workers, "
        "graceful_timeout, shutdown_delay, worker_timeout, max_worker_rss_mb, compression, "
        "handoff, metrics_token, metrics_token_file, tls_cert, tls_key)",
        "/x/chatd.toml:7: llm.max_queue: expected an integer, got 'many'",
        "/x/chatd.toml:8: llm.models: expected a list of strings, got ['a', 3]",
        "/x/chatd.toml:11: llm.backends[0].url: must be \"http://HOST:PORT\", got 'ftp://x'",
        "/x/chatd.toml:12: llm.backends[0].api: must be one of 'ollama', 'openai', got 'grpc'",
        '/x/chatd.toml:15: sessions.store: must be "sqlite:///ABSOLUTE/PATH", '
        '"sqlite:relative/path", "redis://HOST:PORT/DB", '
        '"redis+sentinel://HOST:PORT,HOST:PORT/MASTER[/DB]" or "redis+cluster://HOST:PORT,...", '
        "got 'mysql://db'",
        "/x/chatd.toml:17: bogus: unknown section (expected one of server, control, llm, "
        "sessions, limits, auth, api, log)",
    ]


def test_syntax_error_names_file_and_line() -> None:
    """A TOML syntax error carries the parser's line and column."""
    (msg,) = problems("[server]\nbind = \n")
    assert msg.startswith("/x/chatd.toml: TOML syntax error:") and "line 2" in msg


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[server]\ncompression = 1", "server.compression: expected a boolean, got 1"),
        ("[server]\nworkers = true", "server.workers: expected an integer, got True"),
        ("[server]\ngraceful_timeout = 0", "server.graceful_timeout: must be > 0"),
        ('[control]\nmode = "rw"', "control.mode: must be an octal mode"),
        ('[llm]\nkeep_alive = "soon"', "llm.keep_alive: must be a duration"),
        ("[llm]\nbackends = []", "llm.backends: expected one or more"),
        ("[[llm.backends]]\nmax_parallel = 0", "llm.backends[0].max_parallel: must be >= 1"),
        ("[[llm.backends]]\n[[llm.backends]]", "each backend url must appear once"),
        ("[llm]\nfirst_token_timeout = 10.0\ntotal_timeout = 5.0", "must not exceed"),
        ('[log]\nlevel = "loud"', "log.level: must be one of"),
        ('[log]\nformat = "xml"', "log.format: must be one of 'text', 'json'"),
        ("server = 3", "server: expected a table"),
        ('[auth]\ntokens = "secret"', "auth.tokens: expected a list of strings"),
        ('[server]\nbind = "[::1]:99999"', "port must be 0..65535"),
        ('[server]\nbind = "bad host:80"', "server.bind"),
    ],
)
def test_each_check(text: str, fragment: str) -> None:
    """Each validation rule produces a message naming the key and what is wrong."""
    assert any(fragment in p for p in problems(text)), problems(text)


def test_valid_values_parse() -> None:
    """Ints are accepted for floats; IPv6 binds; relative sqlite paths; redis URLs."""
    cfg = config.parse(
        '[server]\nbind = "[::1]:8001"\ngraceful_timeout = 5\n'
        '[sessions]\nstore = "sqlite:var/s.db"\n'
        '[llm]\nmodels = ["b", "qwen2.5-coder:7b"]\n'
        '[[llm.backends]]\nurl = "http://h:1"\napi = "openai"\n'
    )
    assert cfg.server.host == "::1" and cfg.server.graceful_timeout == 5.0
    assert cfg.sessions.sqlite_path == "var/s.db"
    assert cfg.llm.all_models == ("qwen2.5-coder:7b", "b")
    assert cfg.llm.backends[0].base_url == "http://h:1"
    assert (
        config.parse('[sessions]\nstore = "redis://127.0.0.1:6379/0"').sessions.sqlite_path is None
    )


def test_load_missing_and_default_path(tmp_path: Path) -> None:
    """A missing explicit file is an error; no file and no --config means the defaults."""
    with pytest.raises(ConfigError, match="cannot read the file"):
        config.load(str(tmp_path / "nope.toml"))
    if not Path(config.DEFAULT_PATH).exists():
        assert config.load(None) == config.Config()
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(str(bad))


def test_overrides_win_and_are_checked() -> None:
    """Command-line flags replace the file's values and are validated like it."""
    cfg = config.with_overrides(
        config.Config(),
        bind="127.0.0.1:9000",
        workers=3,
        control_socket="/tmp/c.sock",
        store="sqlite:x.db",
        backends=["http://127.0.0.1:1", "http://127.0.0.1:2#openai"],
    )
    assert cfg.server.bind == "127.0.0.1:9000" and cfg.server.workers == 3
    assert cfg.control.socket == "/tmp/c.sock" and cfg.sessions.store == "sqlite:x.db"
    assert [(b.url, b.api) for b in cfg.llm.backends] == [
        ("http://127.0.0.1:1", "ollama"),
        ("http://127.0.0.1:2", "openai"),
    ]
    with pytest.raises(ConfigError) as err:
        config.with_overrides(config.Config(), bind="x", workers=-1, store="y", backends=["z#q"])
    assert [p.split(":")[0] for p in err.value.problems] == [
        "--bind",
        "--workers",
        "--store",
        "--backend",
        "--backend",
    ]


def test_etc_file_lists_exactly_the_known_keys_with_defaults_and_comments() -> None:
    """etc/chatd/chatd.toml: every key the code knows and no other, with defaults and comments."""
    doc = tomllib.loads(ETC.read_text())
    file_keys = set()
    for section, table in doc.items():
        if section == "llm":
            for key, value in table.items():
                if key == "backends":
                    for b in value:
                        file_keys.update(("llm.backends", k) for k in b)
                else:
                    file_keys.add(("llm", key))
        else:
            file_keys.update((section, k) for k in table)
    code_keys = {(s, k) for s, k, _, _ in iter_keys() if (s, k) != ("llm", "backends")}
    assert file_keys == code_keys
    cfg = config.load(str(ETC))
    assert dataclasses.replace(cfg, path="") == config.Config()
    for line in ETC.read_text().splitlines():
        if re.match(r"^[a-z_]+ = ", line):
            assert "#" in line, f"no comment: {line}"


def test_backend_api_key_is_parsed_and_never_shown() -> None:
    """api_key: kept, but in no repr and in no problem message (it is a credential)."""
    cfg = config.parse('[[llm.backends]]\nurl = "http://h:1"\napi_key = "sk-secret-1"\n')
    assert cfg.llm.backends[0].api_key == "sk-secret-1"
    assert "sk-secret-1" not in repr(cfg) and "sk-secret-1" not in repr(cfg.llm.backends[0])
    got = problems('[[llm.backends]]\napi_key = "sk-bad\\r\\nX-Injected: 1"\n')
    assert got == [
        "/x/chatd.toml:2: llm.backends[0].api_key: must be printable ASCII without spaces at "
        "either end or line breaks"
    ]
    assert problems("[[llm.backends]]\napi_key = 12345\n") == [
        "/x/chatd.toml:2: llm.backends[0].api_key: expected a string"
    ]


def test_backend_api_key_file_is_read_at_load(tmp_path: Path) -> None:
    """api_key_file: read (stripped) at every load, relative to the config file's directory."""
    (tmp_path / "key").write_text("sk-from-file\n")
    conf = tmp_path / "chatd.toml"
    conf.write_text('[[llm.backends]]\nurl = "http://h:1"\napi_key_file = "key"\n')
    assert config.load(str(conf)).llm.backends[0].api_key == "sk-from-file"
    (tmp_path / "key").write_text("sk-rotated")  # a reload reads the file again
    cfg = config.load(str(conf))
    assert cfg.llm.backends[0].api_key == "sk-rotated" and "sk-rotated" not in repr(cfg)


def test_backend_api_key_file_problems_name_the_key_and_line(tmp_path: Path) -> None:
    """Both keys, an unreadable, empty or invalid file: config errors, content never quoted."""
    empty, bad = tmp_path / "empty", tmp_path / "bad"
    empty.write_text("\n")
    bad.write_text("sk-one\nsk-two\n")
    missing = tmp_path / "missing"
    text = (
        '[[llm.backends]]\nurl = "http://h:1"\napi_key = "k"\napi_key_file = "/k"\n'
        f'[[llm.backends]]\nurl = "http://h:2"\napi_key_file = "{missing}"\n'
        f'[[llm.backends]]\nurl = "http://h:3"\napi_key_file = "{empty}"\n'
        f'[[llm.backends]]\nurl = "http://h:4"\napi_key_file = "{bad}"\n'
    )
    got = problems(text)
    assert got[0] == (
        "/x/chatd.toml:4: llm.backends[0].api_key_file: "
        "api_key and api_key_file are exclusive: set only one"
    )
    assert got[1].startswith("/x/chatd.toml:7: llm.backends[1].api_key_file: cannot read ")
    assert "No such file or directory" in got[1] and str(missing) in got[1]
    assert got[2] == (
        f"/x/chatd.toml:10: llm.backends[2].api_key_file: the key in {str(empty)!r} is empty"
    )
    assert got[3].startswith("/x/chatd.toml:13: llm.backends[3].api_key_file: the key in ")
    assert "line breaks" in got[3] and "sk-one" not in got[3]
    assert len(got) == 4
