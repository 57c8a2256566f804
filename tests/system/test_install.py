"""scripts/install.sh into a temporary root: the files it lays down, a second run that changes
nothing, --uninstall that keeps the data, --purge that does not.

The venv's dependencies come from a wheelhouse made once per test run by scripts/wheelhouse.sh
(``--wheelhouse``: pip with no index, as on an offline host); the default path takes them from
the index, the same script otherwise. The
temporary root gets a minimal /etc/passwd so that the user is created in it (useradd --root),
never on the host. Needs root (useradd --root chroots); skipped with the reason otherwise.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import system_python, t

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install.sh"
COMMANDS = ("chatd", "chatctl", "chatd-fake-ollama", "chatd-chat")  # linked in /usr/local/bin
with open(REPO / "pyproject.toml", "rb") as f:
    SCRIPTS = tuple(tomllib.load(f)["project"]["scripts"])  # every console script, in the venv
# Everything the install lays down outside the venv's lib/ and include/ (the Python packages).
EXPECTED = {
    "etc/chatd": "d 755 root root",
    "etc/chatd/chatd.toml": "f 640 root chatd",
    "etc/systemd/system/chatd.service": "f 644 root root",
    "etc/sysctl.d/60-chatd.conf": "f 644 root root",
    "opt/chatd/.chatd-install": "f",
    "opt/chatd/pyvenv.cfg": "f",
    "opt/chatd/share/doc/chatd/operations.md": "f 644 root root",
    "var/lib/chatd": "d 750 chatd chatd",
    **{f"usr/local/bin/{c}": f"l /opt/chatd/bin/{c}" for c in COMMANDS},
    **{f"opt/chatd/bin/{c}": "f 755" for c in SCRIPTS},
}


def _python() -> str:
    """The Python a host would use (tests.support.system_python), else this one (install.sh
    then warns that ProtectHome=yes would hide it)."""
    return system_python() or sys.executable


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("NOT TESTED: scripts/install.sh needs root (useradd --root); run as root")
    r = tmp_path / "root"
    (r / "etc").mkdir(parents=True)
    (r / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (r / "etc/group").write_text("root:x:0:\n")
    (r / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (r / "etc/gshadow").write_text("root:*::\n")
    yield r
    shutil.rmtree(r, ignore_errors=True)


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INSTALL), "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=t(120),
    )


def install_ok(root: Path, *args: str) -> str:
    r = install(root, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def ids(root: Path, name: str) -> tuple[int, int]:
    """(uid, gid) of ``name`` in the root's passwd."""
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise AssertionError(f"no user {name} in {root}/etc/passwd")


def describe(root: Path, rel: str) -> str:
    """``d 755 root chatd``, ``f 644 ...``, ``l TARGET``: a path as EXPECTED spells it."""
    p = root / rel
    st = p.lstat()
    if stat.S_ISLNK(st.st_mode):
        return f"l {os.readlink(p)}"
    names = {0: "root"}
    if (root / "etc/passwd").read_text().count("\nchatd:"):
        uid, gid = ids(root, "chatd")
        names |= {uid: "chatd", gid: "chatd"} if uid == gid else {uid: "chatd"}
    groups = {0: "root"} | {
        int(line.split(":")[2]): line.split(":")[0]
        for line in (root / "etc/group").read_text().splitlines()
    }
    kind = "d" if stat.S_ISDIR(st.st_mode) else "f"
    return f"{kind} {stat.S_IMODE(st.st_mode):o} {names.get(st.st_uid)} {groups.get(st.st_gid)}"


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root: type, mode, owner, link target or content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            what = f"{st.st_mode:o} {st.st_uid}:{st.st_gid}"
            if stat.S_ISLNK(st.st_mode):
                what += " -> " + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what += " " + hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(root))] = what
    return out


def dependency_scripts(root: Path) -> set[str]:
    """The console scripts of chatd's dependencies (websockets, idna...) in the venv's bin/."""
    names: set[str] = set()
    for ep in (root / "opt/chatd/lib").glob("python3*/site-packages/*.dist-info/entry_points.txt"):
        if ep.parent.name.startswith("chatd-"):
            continue
        section = ""
        for line in ep.read_text().splitlines():
            if line.startswith("["):
                section = line.strip()
            elif section == "[console_scripts]" and "=" in line:
                names.add(f"opt/chatd/bin/{line.split('=')[0].strip()}")
    return names


def installed_files(root: Path) -> set[str]:
    """The paths under root, the venv's Python packages (lib/, lib64, include/) and the
    dependencies' own console scripts aside."""
    venv_internals = ("opt/chatd/lib", "opt/chatd/include")
    theirs = dependency_scripts(root)
    return {
        rel
        for rel in snapshot(root)
        if not rel.startswith(venv_internals)
        and rel not in theirs
        and rel not in ("opt/chatd/lib64", "opt/chatd/bin/python", "opt/chatd/bin/python3")
        and not rel.startswith("opt/chatd/bin/python3.")
        and not rel.startswith("opt/chatd/bin/activate")
        and not rel.startswith("opt/chatd/bin/pip")
        and rel != "opt/chatd/bin/Activate.ps1"
        and not rel.startswith("etc/passwd")
        and not rel.startswith(("etc/group", "etc/shadow", "etc/gshadow", "etc/.pwd.lock"))
    }


def test_install_lays_down_the_files_user_and_a_working_venv(root: Path, wheelhouse: Path) -> None:
    out = install_ok(root, "--wheelhouse", str(wheelhouse), "--python", _python())
    assert "created    user chatd" in out and "installed  /opt/chatd" in out, out
    files = installed_files(root)
    dirs = {"etc", "etc/sysctl.d", "etc/systemd", "etc/systemd/system", "opt", "opt/chatd",
            "opt/chatd/bin", "opt/chatd/share", "opt/chatd/share/doc", "opt/chatd/share/doc/chatd",
            "usr", "usr/local", "usr/local/bin", "var", "var/lib"}  # fmt: skip
    assert files - dirs == set(EXPECTED), sorted(files ^ (set(EXPECTED) | dirs))
    for rel, want in EXPECTED.items():
        assert describe(root, rel).startswith(want), (rel, describe(root, rel), want)
    # The user, as the unit expects it: a system account without a login shell.
    uid, gid = ids(root, "chatd")
    assert uid < 1000
    assert f"chatd:x:{uid}:{gid}:" in (root / "etc/passwd").read_text()
    assert (root / "etc/passwd").read_text().rstrip().endswith(":/var/lib/chatd:/usr/sbin/nologin")
    # Shipped files, verbatim; the sysctl drop-in; nothing names the temporary root.
    unit = root / "etc/systemd/system/chatd.service"
    assert unit.read_bytes() == (REPO / "systemd/chatd.service").read_bytes()
    cfg = root / "etc/chatd/chatd.toml"
    assert cfg.read_bytes() == (REPO / "etc/chatd/chatd.toml").read_bytes()
    assert "net.ipv4.tcp_migrate_req = 1" in (root / "etc/sysctl.d/60-chatd.conf").read_text()
    for script in (root / "opt/chatd/bin").iterdir():
        if script.is_file() and not script.is_symlink():
            assert str(root) not in script.read_text(errors="replace"), script
    for c in COMMANDS:
        assert (root / f"opt/chatd/bin/{c}").read_text().startswith("#!/opt/chatd/bin/python3\n")
    # The venv runs chatd from this checkout (its scripts are for /opt/chatd: call them by hand).
    py = root / "opt/chatd/bin/python3"
    r = subprocess.run([py, root / "opt/chatd/bin/chatd", "--check", "--config", cfg],
                       capture_output=True, text=True, timeout=t(30))  # fmt: skip
    assert r.returncode == 0 and "configuration is valid" in r.stdout, r.stderr
    r = subprocess.run([py, "-c", "import chatd.worker.main, uvloop, chatd; print(chatd.__file__)"],
                       capture_output=True, text=True, timeout=t(30), cwd=root)  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith(str(root / "opt/chatd/lib")), r.stderr
    # Byte-compiled at install: the daemon cannot write __pycache__ under ProtectSystem=strict.
    package = Path(r.stdout.strip()).parent
    for module in ("cli", "master/arbiter", "worker/main", "worker/session"):
        folder, _, name = f"./{module}".rpartition("/")
        assert list((package / folder / "__pycache__").glob(f"{name}.cpython-*.pyc")), module


def test_second_run_changes_nothing_and_keeps_an_edited_config(
    root: Path, wheelhouse: Path
) -> None:
    install_ok(root, "--wheelhouse", str(wheelhouse), "--python", _python())
    cfg = root / "etc/chatd/chatd.toml"
    cfg.write_text(cfg.read_text().replace("workers = 0 ", "workers = 3 "))
    before = snapshot(root)
    out = install_ok(root, "--wheelhouse", str(wheelhouse), "--python", _python())
    assert snapshot(root) == before
    actions = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert actions == {"unchanged", "kept"}, out
    assert "unchanged  /opt/chatd" in out and "kept       /etc/chatd/chatd.toml" in out
    assert "workers = 3 " in cfg.read_text()


def test_uninstall_keeps_config_data_and_user_and_purge_removes_them(
    root: Path, wheelhouse: Path
) -> None:
    install_ok(root, "--wheelhouse", str(wheelhouse), "--python", _python())
    (root / "var/lib/chatd/sessions.db").write_bytes(b"sessions")
    out = install_ok(root, "--uninstall")
    for gone in ("/opt/chatd", "/etc/systemd/system/chatd.service", "/etc/sysctl.d/60-chatd.conf",
                 *(f"/usr/local/bin/{c}" for c in COMMANDS)):  # fmt: skip
        assert f"removed    {gone}\n" in out, out
        assert not (root / gone.lstrip("/")).exists() and not (root / gone.lstrip("/")).is_symlink()
    assert (root / "etc/chatd/chatd.toml").is_file()
    assert (root / "var/lib/chatd/sessions.db").read_bytes() == b"sessions"
    assert ids(root, "chatd")
    assert install(root, "--uninstall").returncode == 0  # again: nothing left to do, fine
    out = install_ok(root, "--uninstall", "--purge")
    assert not (root / "etc/chatd").exists() and not (root / "var/lib/chatd").exists()
    assert "chatd" not in (root / "etc/passwd").read_text()
    assert "chatd" not in (root / "etc/group").read_text()


def test_bad_arguments_are_refused(root: Path) -> None:
    r = install(root, "--purge")
    assert r.returncode == 1 and "--purge goes with --uninstall" in r.stderr
    r = install(root, "--frobnicate")
    assert r.returncode == 1 and "unknown argument --frobnicate" in r.stderr
    r = install(root, "--wheelhouse", str(root / "nowhere"))
    assert r.returncode == 1 and "--wheelhouse" in r.stderr and "no such directory" in r.stderr
    r = install(root, "--wheelhouse", str(root / "etc"))
    assert r.returncode == 1 and "holds no wheel" in r.stderr
    assert not (root / "opt/chatd").exists()


def test_shell_scripts_pass_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("NOT TESTED: shellcheck is not installed (apt-get install shellcheck)")
    scripts = [INSTALL, REPO / "scripts/wheelhouse.sh", REPO / "tests/system/sdharness.sh"]
    scripts.append(REPO / "scripts/build-image.sh")
    r = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
