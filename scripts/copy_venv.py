"""Fill a fresh venv with chatd and its dependencies copied from another venv: no pip, no index.

``scripts/install.sh --venv-from VENV`` runs this with *VENV*'s Python (so that its
``importlib.metadata`` sees VENV's distributions)::

    VENV/bin/python copy_venv.py --checkout DIR --site-packages SP --bin BIN --final /opt/chatd
                                 [--extra local-model]

1. Every distribution chatd needs, as recorded in VENV's metadata: the closure of the
   requirements in the checkout's ``pyproject.toml`` (the extras given with ``--extra``
   included), environment markers evaluated, is copied into ``SP`` file by file from its
   ``RECORD`` (files outside site-packages, such as the dependencies' own console scripts, are
   left out).
2. chatd itself comes from the checkout, never from VENV (whose chatd is usually an editable
   install pointing at some other tree): the package, a minimal ``.dist-info``, and the
   console scripts of ``[project.scripts]`` in ``BIN``, their shebang ``FINAL/bin/python3``,
   the path the venv has on the target host (it differs from ``BIN/..`` with
   ``install.sh --root``).

Compiled extensions are copied as they are, so the target venv's Python must have the same
``major.minor`` as VENV's (install.sh checks it): cp311 wheels work with any 3.11.x.
Exit 0, or 1 with one line naming what is missing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import re
import shutil
import sys
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def _marker_evaluator() -> Callable[[str, str], bool]:
    """``evaluate(marker, extra)``: packaging's evaluation when importable (pip vendors it)."""
    marker_cls: Any = None
    for module in ("packaging.markers", "pip._vendor.packaging.markers"):
        try:
            marker_cls = importlib.import_module(module).Marker
            break
        except ImportError:
            continue
    if marker_cls is not None:

        def evaluate(marker: str, extra: str) -> bool:
            return bool(marker_cls(marker).evaluate({"extra": extra}))

        return evaluate

    def crude(marker: str, extra: str) -> bool:
        # Without packaging: honour `extra == "x"` and assume every other marker holds; a
        # distribution that is then not installed is skipped (see _closure).
        wanted = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        return not wanted or extra in wanted

    return crude


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _split(requirement: str) -> tuple[str, set[str], str]:
    """``name[extra1,extra2] >=1 ; marker`` -> (normalized name, extras, marker)."""
    spec, _, marker = requirement.partition(";")
    m = _NAME.match(spec)
    if m is None:
        raise ValueError(f"cannot parse the requirement {requirement!r}")
    extras = {_normalize(e) for e in (m.group(2) or "").split(",") if e.strip()}
    return _normalize(m.group(1)), extras, marker.strip()


def _wanted(requirements: Iterable[str], extras: set[str]) -> list[tuple[str, set[str]]]:
    """The requirements whose marker holds, for the base install and each extra asked for."""
    evaluate = _marker_evaluator()
    out = []
    for req in requirements:
        name, sub_extras, marker = _split(req)
        if not marker or any(evaluate(marker, e) for e in ("", *extras)):
            out.append((name, sub_extras))
    return out


def _closure(roots: list[tuple[str, set[str]]]) -> list[md.Distribution]:
    """Every installed distribution the roots need, each once."""
    seen: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        name, extras = todo.pop()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(
                f"copy_venv: {name} is not installed in {sys.prefix}: install chatd's "
                "dependencies there first (pip install -e .), or use install.sh without "
                "--venv-from"
            ) from None
        seen[name] = dist
        todo += _wanted(dist.requires or (), extras)
    return sorted(seen.values(), key=lambda d: _normalize(d.metadata["Name"]))


def _copy_distribution(dist: md.Distribution, site_packages: Path) -> int:
    """Copy the files of ``dist`` that live in site-packages; returns how many."""
    copied = 0
    for rel in dist.files or ():
        if rel.parts and rel.parts[0] == "..":
            continue  # console scripts and data outside site-packages: not needed
        src = Path(str(dist.locate_file(rel)))
        if not src.is_file():
            continue  # RECORD may list .pyc files that were never written
        dst = site_packages / str(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        copied += 1
    return copied


_SCRIPT = """#!{python}
# Console script of chatd, written by scripts/copy_venv.py (install.sh --venv-from).
import sys

from {module} import {func}

if __name__ == "__main__":
    sys.exit({func}())
"""


def _install_chatd(
    checkout: Path, project: dict[str, object], site_packages: Path, bin_dir: Path, final: str
) -> None:
    name, version = str(project["name"]), str(project["version"])
    shutil.copytree(
        checkout / "chatd",
        site_packages / "chatd",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        dirs_exist_ok=True,
    )
    info = site_packages / f"{name}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    deps = project.get("dependencies") or []
    assert isinstance(deps, list)
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Requires-Dist: {d}" for d in deps]
    (info / "METADATA").write_text("\n".join(metadata) + "\n")
    (info / "INSTALLER").write_text("chatd-install.sh\n")
    (info / "top_level.txt").write_text("chatd\n")
    scripts = project.get("scripts") or {}
    assert isinstance(scripts, dict)
    entry_points = ["[console_scripts]"] + [f"{k} = {v}" for k, v in sorted(scripts.items())]
    (info / "entry_points.txt").write_text("\n".join(entry_points) + "\n")
    for script, target in sorted(scripts.items()):
        module, _, func = str(target).partition(":")
        path = bin_dir / script
        path.write_text(_SCRIPT.format(python=f"{final}/bin/python3", module=module, func=func))
        path.chmod(0o755)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, required=True, help="the chatd source tree")
    parser.add_argument("--site-packages", type=Path, required=True, help="target purelib")
    parser.add_argument("--bin", type=Path, required=True, help="target venv's bin directory")
    parser.add_argument("--final", required=True, help="the venv's path on the target host")
    parser.add_argument("--extra", action="append", default=[], help="an extra of chatd")
    args = parser.parse_args(argv)
    with open(args.checkout / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    extras = {_normalize(e) for e in args.extra}
    requirements = list(project.get("dependencies") or [])
    for extra in sorted(extras):
        optional = project.get("optional-dependencies") or {}
        if extra not in optional:
            print(f"copy_venv: chatd has no extra {extra!r}", file=sys.stderr)
            return 1
        requirements += optional[extra]
    dists = _closure(_wanted(requirements, set()))
    total = sum(_copy_distribution(d, args.site_packages) for d in dists)
    _install_chatd(args.checkout, project, args.site_packages, args.bin, args.final.rstrip("/"))
    names = ", ".join(f"{d.metadata['Name']} {d.version}" for d in dists)
    print(f"copied {len(dists)} distributions ({total} files) from {sys.prefix}: {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
