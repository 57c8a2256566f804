"""Every console script of pyproject.toml is installed, starts, and answers ``--version``."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


@pytest.mark.parametrize("name", SCRIPTS)
def test_version(name: str) -> None:
    script = Path(sys.executable).with_name(name)
    assert script.exists(), f"{name} is not installed: pip install -e . (make test does)"
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{name} {importlib.metadata.version('chatd')}"


def test_python_m_chatd() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "chatd", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "--check" in r.stdout, r.stderr
