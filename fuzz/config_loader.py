"""Fuzz target for the configuration loader (:func:`chatd.config.parse`), with atheris.

::

    pip install atheris        # not a dependency of chatd: a developer's tool
    python fuzz/config_loader.py -max_total_time=60 fuzz/corpus/config_loader/

Each input is a TOML document (bytes decoded as UTF-8, undecodable ones skipped). What must
hold, else the target raises and atheris reports a crash: ``parse`` returns a Config or
raises ConfigError whose every problem names the file and a key (or says "TOML syntax
error"), never another exception; and a Config that passes has a bind address and backend
URLs that parse the way a worker parses them.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from chatd.config import parse
    from chatd.config_checks import parse_bind
    from chatd.errors import ConfigError


def test_one_input(data: bytes) -> None:
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return
    try:
        cfg = parse(text, "/fuzz/chatd.toml")
    except ConfigError as exc:
        for problem in exc.problems:
            assert problem.startswith("/fuzz/chatd.toml"), problem
        return
    parse_bind(cfg.server.bind)
    for backend in cfg.llm.backends:
        assert backend.base_url.startswith(("http://", "https://")), backend.base_url


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
