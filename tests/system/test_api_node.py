"""The official JavaScript clients, ollama-js and the ``openai`` npm package, under node.

npm is reachable here: the packages are installed once into ``.venv/node`` (kept between
runs, like the rest of the venv) and the script ``js/clients.mjs`` runs them against a real
chatd in front of the fake Ollama.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from chatd.dev.fake_ollama.wire import reply_tokens
from tests.support import running_chatd

pytestmark = pytest.mark.system

MODEL = "qwen2.5-coder:7b"
TOKENS = 5
PACKAGES = ("ollama@0.6", "openai@6")
SCRIPT = Path(__file__).parent / "js" / "clients.mjs"


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """A directory holding the two packages (installed on first use)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed (make test installs them: scripts/ensure-debs.sh)")
    prefix = Path(sys.prefix) / "node"
    if not all((prefix / "node_modules" / p.split("@")[0]).is_dir() for p in PACKAGES):
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", *PACKAGES],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return prefix / "node_modules"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama([MODEL], tokens=TOKENS)) as f:
        yield f


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_ollama_js_and_openai_npm(
    api: str, node_modules: Path, fake: FakeOllama, tmp_path: Path
) -> None:
    backends = [{"url": fake.url, "api": api, "max_parallel": 4}]
    with running_chatd(tmp_path, fake.url, backends=backends) as d:
        script = tmp_path / "clients.mjs"  # next to a node_modules link: ESM resolves there
        script.write_text(SCRIPT.read_text())
        (tmp_path / "node_modules").symlink_to(node_modules)
        r = subprocess.run(
            ["node", str(script), d.http, MODEL], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
    want = "".join(reply_tokens("js says hi", TOKENS))
    assert MODEL in out["list"] and MODEL in out["models"]
    assert out["version"]
    assert out["chat"] == {"content": want, "done_reason": "stop"}
    assert out["chat_stream"]["content"] == want and out["chat_stream"]["chunks"] >= TOKENS
    assert out["generate"] == "".join(reply_tokens("js prompt", TOKENS))
    assert out["openai_stream"]["content"] == want
    assert out["openai_stream"]["role"] == "assistant"
    assert out["openai_stream"]["usage"]["completion_tokens"] == TOKENS
    assert out["openai"] == want
