"""Layering rules, checked by reading the imports of the source files (no import executed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "chatd"
IMPURE = {
    "asyncio",
    "socket",
    "os",
    "selectors",
    "aiohttp",
    "uvloop",
    "websockets",
    "threading",
    "subprocess",
    "signal",
    "sqlite3",
}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module the file imports."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "proto").glob("*.py")), ids=lambda p: p.name)
def test_proto_is_pure(path: Path) -> None:
    """chatd/proto/ does no I/O: no asyncio, sockets, os, aiohttp, threads, signals."""
    assert imported_modules(path) & IMPURE == set()


def test_proto_imports_only_pure_chatd_modules() -> None:
    """Within chatd, proto/ may only use errors and itself."""
    for path in (ROOT / "proto").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chatd"):
                assert node.module in {"chatd.errors"} or node.module.startswith("chatd.proto"), (
                    f"{path.name} imports {node.module}"
                )


def test_master_has_no_event_loop() -> None:
    """The forking master is single-threaded and creates no event loop."""
    names = imported_modules(ROOT / "master.py")
    assert {"asyncio", "uvloop", "threading"} & names == set()


def test_fake_ollama_shares_no_code_with_the_relay() -> None:
    """A stand-in shares no code with what it stands in for (a shared bug would hide itself):
    within chatd, the fake's modules (fake_ollama*.py) import only one another."""
    paths = sorted(ROOT.glob("fake_ollama*.py"))
    assert ROOT / "fake_ollama.py" in paths
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: within chatd
                    base = f"chatd.{base}".rstrip(".")
                names = [f"{base}.{a.name}" if base == "chatd" else base for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                fake = len(parts) > 1 and parts[1].startswith("fake_ollama")
                assert parts[0] != "chatd" or fake, f"{path.name} imports {name}"
