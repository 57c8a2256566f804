"""Secrets kept out of the TOML: ``[auth] tokens_file`` and ``[server] metrics_token_file``.

One token per line, blank lines and ``#`` comments ignored, read by the loader (so at start and
at every reload, and by ``chatd --check``); exclusive with the key they fill; a file that cannot
be used is a problem naming the key and its line; a token is never quoted anywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chatd import cli, config
from chatd.errors import ConfigError


def write(tmp_path: Path, text: str, **files: str) -> Path:
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    path = tmp_path / "chatd.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config.load(str(path))
    return err.value.problems


def test_tokens_file_gives_the_tokens_and_is_read_again_at_each_load(tmp_path: Path) -> None:
    """Comments and blank lines are skipped; a relative name is next to the config file; a
    second load (what a reload does) sees the file's new content."""
    path = write(
        tmp_path,
        '[auth]\ntokens_file = "tokens"\n',
        tokens="# clients\n\n  alpha-1  \nbeta.2\n# old: gamma\n",
    )
    assert config.load(str(path)).auth.tokens == ("alpha-1", "beta.2")
    (tmp_path / "tokens").write_text("delta\n", encoding="utf-8")
    assert config.load(str(path)).auth.tokens == ("delta",)


def test_tokens_file_problems_name_the_key_and_line_and_never_a_token(tmp_path: Path) -> None:
    cases = {
        "missing": ('[auth]\n\ntokens_file = "nope"\n', {}, "cannot read"),
        "empty": ('[auth]\n\ntokens_file = "t"\n', {"t": "# none yet\n\n"}, "holds no token"),
        "both": ('[auth]\ntokens = ["s3cr3t-a"]\ntokens_file = "t"\n', {"t": "x\n"}, "exclusive"),
        "binary": ('[auth]\n\ntokens_file = "t"\n', {}, "not UTF-8"),
        "bad": ('[auth]\n\ntokens_file = "t"\n', {"t": "ok\ns3cr3t\x7f\n"}, "line 2 of"),
    }
    for name, (text, files, what) in cases.items():
        sub = tmp_path / name
        sub.mkdir()
        path = write(sub, text, **files)
        if name == "binary":
            (sub / "t").write_bytes(b"\xff\xfe")
        (problem,) = problems_of(path)
        assert problem.startswith(f"{path.resolve()}:3: auth.tokens_file: "), problem
        assert what in problem and "s3cr3t" not in problem, problem


def test_check_reads_the_tokens_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """chatd --check refuses an unreadable tokens file (exit 78) and accepts a readable one."""
    path = write(tmp_path, '[auth]\ntokens_file = "/nonexistent/chatd-tokens"\n')
    assert cli.main(["--check", "--config", str(path)]) == 78
    assert "auth.tokens_file: cannot read" in capsys.readouterr().err
    path = write(tmp_path, '[auth]\ntokens_file = "t"\n', t="tok\n")
    assert cli.main(["--check", "--config", str(path)]) == 0


def test_metrics_token_file(tmp_path: Path) -> None:
    """One token, with comments; two is a problem; exclusive with metrics_token."""
    path = write(tmp_path, '[server]\nmetrics_token_file = "m"\n', m="# prometheus\nscrape-me\n")
    assert config.load(str(path)).server.metrics_token == "scrape-me"
    path = write(tmp_path, '[server]\nmetrics_token_file = "m"\n', m="a\nb\n")
    (problem,) = problems_of(path)
    assert ":2: server.metrics_token_file: expected one token, found 2" in problem
    path = write(tmp_path, '[server]\nmetrics_token = "s3cr3t"\nmetrics_token_file = "m"\n')
    (problem,) = problems_of(path)
    assert "server.metrics_token_file: " in problem and "exclusive" in problem


def test_secrets_are_never_quoted(tmp_path: Path) -> None:
    """Neither the config's repr nor a problem about a token shows the token."""
    cfg = config.parse('[server]\nmetrics_token = "s3cr3t-m"\n[auth]\ntokens = ["s3cr3t-t"]\n')
    assert "s3cr3t" not in repr(cfg)
    with pytest.raises(ConfigError) as err:
        config.parse('[auth]\ntokens = ["s3cr3t", 1]\n[server]\nmetrics_token = " s3cr3t"\n')
    assert err.value.problems and all("s3cr3t" not in p for p in err.value.problems)
