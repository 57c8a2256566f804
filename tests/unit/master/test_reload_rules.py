"""chatd.master.reload.refusals: what a reload cannot apply, found before anything changes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from chatd.config import Config, ControlConfig, ServerConfig, SessionsConfig
from chatd.master.reload import refusals, worker_count


def test_same_config_is_fine(tmp_path: Path) -> None:
    cfg = Config(sessions=SessionsConfig(store=f"sqlite://{tmp_path}/new/dir/s.db"))
    assert refusals(cfg, cfg) == []  # a directory that does not exist yet is created


def test_bind_and_control_socket_need_a_restart() -> None:
    old = Config(sessions=SessionsConfig(store="sqlite:relative.db"))
    new = dataclasses.replace(
        old,
        server=ServerConfig(bind="0.0.0.0:9000"),
        control=ControlConfig(socket="/run/other.sock"),
    )
    problems = refusals(old, new)
    assert len(problems) == 2
    assert problems[0].startswith("[server] bind changed from 0.0.0.0:8000 to 0.0.0.0:9000")
    assert "needs a restart" in problems[0] and "[control] socket changed" in problems[1]


def test_store_under_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    old = Config(sessions=SessionsConfig(store=f"sqlite://{tmp_path}/s.db"))
    new = Config(sessions=SessionsConfig(store=f"sqlite://{blocker}/sub/s.db"))
    (problem,) = refusals(old, new)
    assert problem.endswith(f"{blocker} is not a directory")


def test_worker_count() -> None:
    assert worker_count(Config(server=ServerConfig(workers=3))) == 3
    assert worker_count(Config()) >= 1  # 0 = one per CPU core
