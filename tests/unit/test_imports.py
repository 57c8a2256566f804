"""The import contracts of chatd's role packages (``[tool.importlinter]`` in pyproject.toml).

``make test`` runs ``lint-imports`` on the tree; these tests prove that the check has teeth: the
same tool on a copy of the tree with one forbidden import added fails and names the contract.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` run on ``tree`` (its own chatd/ and pyproject.toml, nothing else)."""
    if not LINT_IMPORTS.exists():
        pytest.skip("lint-imports not installed: pip install -e '.[test]' (make test does)")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True
    )


def copy_tree(tmp: Path) -> Path:
    shutil.copytree(REPO / "chatd", tmp / "chatd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp / "pyproject.toml")
    return tmp


def add_import(module: Path, line: str) -> None:
    """Add ``line`` after the module's ``from __future__`` import."""
    text = module.read_text()
    anchor = "from __future__ import annotations\n"
    assert anchor in text, module
    module.write_text(text.replace(anchor, anchor + line + "\n", 1))


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    r = lint_imports(copy_tree(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("master/scale.py", "import chatd.worker.main", "master never imports worker"),
        ("proto/chat.py", "import asyncio", "proto is pure"),
        ("relay/wire.py", "from chatd.store import base", "relay and store never import"),
        ("dev/fake_ollama/wire.py", "import chatd.relay.wire", "dev shares no code"),
        ("client/events.py", "import chatd.proto.chat", "client imports none of the server"),
        ("worker/outbox.py", "import chatd.bench.stats", "nothing but the console scripts"),
    ],
)
def test_a_forbidden_import_breaks_the_build(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    tree = copy_tree(tmp_path)
    add_import(tree / "chatd" / module, line)
    r = lint_imports(tree)
    assert r.returncode != 0
    broken = [s for s in r.stdout.splitlines() if s.endswith("BROKEN")]
    assert len(broken) == 1 and broken[0].startswith(contract), r.stdout
