"""``chatd --check``: validates the configuration (file and flags) and binds nothing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from chatd import cli
from chatd.config import Config

FACTOR = float(os.environ.get("CHATD_TESTS_TIMEOUT_FACTOR", "1"))
CHATD = Path(sys.executable).parent / "chatd"

VALID = """\
[server]
bind = "127.0.0.1:8123"
workers = 2

[control]
socket = "/tmp/chatd-test-never-created.sock"

[[llm.backends]]
url = "http://127.0.0.1:11434"
"""

INVALID = """\
[server]
bind = "nowhere"
workers = -1
colour = "blue"

[log]
level = "loud"
"""


@pytest.fixture
def valid(tmp_path: Path) -> Path:
    path = tmp_path / "chatd.toml"
    path.write_text(VALID)
    return path


@pytest.fixture
def invalid(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(INVALID)
    return path


def test_valid_file(valid: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid file: exit 0 and `PATH: configuration is valid` on stdout."""
    assert cli.main(["--check", "--config", str(valid)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{valid.resolve()}: configuration is valid\n"
    assert err == ""


def test_every_problem_is_reported(invalid: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid file: exit 78, one line per problem, each naming the file and the key."""
    assert cli.main(["--check", "--config", str(invalid)]) == 78
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    for key in ("server.bind", "server.workers", "server.colour", "log.level"):
        matching = [line for line in lines if f": {key}: " in line]
        assert len(matching) == 1, (key, lines)
        assert matching[0].startswith(str(invalid.resolve())), matching[0]
    assert len(lines) == 4


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that cannot be read is a configuration error too."""
    missing = tmp_path / "nope.toml"
    assert cli.main(["--check", "--config", str(missing)]) == 78
    assert str(missing) in capsys.readouterr().err


def test_flags_are_checked(valid: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad flag value is reported like a bad key, naming the flag."""
    code = cli.main(["--check", "--config", str(valid), "--bind", "nowhere", "--workers", "-2"])
    assert code == 78
    err = capsys.readouterr().err
    assert "--bind:" in err and "nowhere" in err
    assert "--workers:" in err


def test_flags_override_the_file(valid: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags win over the file: the master would be built from the overridden values, and a
    reload (which reads the file again) would apply them again."""
    built: list[Config] = []

    def fake_master(
        cfg: Config, worker_main: object, load_config: Callable[[], Config], writer_main: object
    ) -> _Stub:
        assert callable(writer_main)  # the SQLite store's writer: imported before any fork
        built.append(cfg)
        built.append(load_config())
        return _Stub()

    monkeypatch.setattr(cli, "Master", fake_master)
    monkeypatch.setattr(cli, "load_worker_main", lambda: lambda spec: None)
    monkeypatch.setattr(cli, "setup_logging", lambda cfg, role: None)
    argv = ["--config", str(valid), "--bind", "127.0.0.1:9999", "--workers", "5"]
    argv += ["--control-socket", "/tmp/x.sock", "--backend", "http://10.0.0.1:1#openai"]
    assert cli.main(argv) == 0
    for cfg in built:  # at start, then at a reload
        assert (cfg.server.bind, cfg.server.workers, cfg.control.socket) == (
            "127.0.0.1:9999",
            5,
            "/tmp/x.sock",
        )
        assert [(b.url, b.api) for b in cfg.llm.backends] == [("http://10.0.0.1:1", "openai")]
    assert len(built) == 2


class _Stub:
    def run(self) -> int:
        return 0


def test_check_binds_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--check succeeds even when the port is taken and creates no control socket."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sock = tmp_path / "ctl.sock"
        path = tmp_path / "c.toml"
        path.write_text(f'[server]\nbind = "127.0.0.1:{port}"\n[control]\nsocket = "{sock}"\n')
        assert cli.main(["--check", "--config", str(path)]) == 0
        assert not sock.exists()


def test_console_script_valid(valid: Path) -> None:
    """The installed `chatd` script: exit 0 and the message on stdout."""
    r = subprocess.run(
        [str(CHATD), "--check", "--config", str(valid)],
        capture_output=True,
        text=True,
        timeout=30 * FACTOR,
    )
    assert (r.returncode, r.stdout, r.stderr) == (
        0,
        f"{valid.resolve()}: configuration is valid\n",
        "",
    )


def test_console_script_invalid(invalid: Path) -> None:
    """The installed `chatd` script: exit 78 and every problem on stderr."""
    r = subprocess.run(
        [str(CHATD), "--check", "--config", str(invalid), "--workers", "3"],
        capture_output=True,
        text=True,
        timeout=30 * FACTOR,
    )
    assert r.returncode == 78
    assert r.stdout == ""
    problems = r.stderr.splitlines()
    assert len(problems) == 4
    assert all(line.startswith(str(invalid.resolve())) for line in problems)


def test_console_script_flag_override(valid: Path) -> None:
    """The installed `chatd` script checks flag values over a valid file."""
    r = subprocess.run(
        [str(CHATD), "--check", "--config", str(valid), "--store", "mysql://x"],
        capture_output=True,
        text=True,
        timeout=30 * FACTOR,
    )
    assert r.returncode == 78
    assert r.stderr.startswith("--store:")


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('url = "http://h:99999"', "llm.backends[0].url"),
        ('url = "http://h:abc"', "llm.backends[0].url"),
        ('url = "http://ollama:11434x"', "llm.backends[0].url"),
        ('url = "http://h:0"', "llm.backends[0].url"),
        ('url = "http://[::1:11434"', "llm.backends[0].url"),
        ('url = "http://h:1?x=1"', "llm.backends[0].url"),
        ('url = "http://\u4e2d.example:1"', "llm.backends[0].url"),
        ('store = "redis://h:abc/0"', "sessions.store"),
        ('store = "redis://h:99999/0"', "sessions.store"),
        ('store = "sqlite:///"', "sessions.store"),
        ('bind = "..:8000"', "server.bind"),
        ('bind = "h:\u00b2"', "server.bind"),
    ],
)
def test_check_refuses_what_a_worker_would_refuse(
    line: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An address a worker (or the master) cannot use at start is a --check error naming the
    file, the line and the key: a config that passes --check must not crash-loop every worker."""
    section = {"url": "[[llm.backends]]", "store": "[sessions]", "bind": "[server]"}
    path = tmp_path / "c.toml"
    path.write_text(f"# chatd\n{section[line.split()[0]]}\n{line}\n", encoding="utf-8")
    assert cli.main(["--check", "--config", str(path)]) == 78
    (problem,) = capsys.readouterr().err.splitlines()
    assert problem.startswith(f"{path.resolve()}:3: {key}: "), problem
