"""Secrets out of the TOML, and JSON log lines with their ids as fields, on a real chatd.

``[auth] tokens_file`` gives the WebSocket tokens (re-read by ``chatctl reload``) and never
reaches the log; with ``[log] format = "json"`` a line about a session carries ``session`` and
``worker`` as fields, the same values the client saw in its welcome frame.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from tests.support import BIN, Chatd, Client, running_chatd, t, wait_for

pytestmark = pytest.mark.system

FIRST, SECOND = "first-T0ken-a1b2", "second-T0ken-c3d4"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama(["qwen2.5-coder:7b"], tokens=3)) as f:
        yield f


@pytest.fixture(scope="module")
def chatd(fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chatd]:
    tmp = tmp_path_factory.mktemp("tokens")
    (tmp / "tokens").write_text(f"# chat clients\n{FIRST}\n")
    with running_chatd(
        tmp,
        fake.url,
        workers=1,
        auth={"tokens_file": "tokens"},  # relative: next to the config file
        log={"format": "json"},
    ) as d:
        yield d


def json_lines(d: Chatd) -> list[dict[str, Any]]:
    out = []
    for line in d.log().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def refused(d: Chatd, token: str) -> bool:
    try:
        Client(f"{d.url}?token={token}").close()
    except InvalidStatus as exc:
        return exc.response.status_code == 401
    return False


def test_tokens_come_from_the_file_and_a_reload_reads_it_again(chatd: Chatd) -> None:
    c = Client(f"{chatd.url}?token={FIRST}")
    assert c.hello()["type"] == "welcome"
    c.close()
    assert refused(chatd, SECOND)
    (chatd.tmp / "tokens").write_text(f"{SECOND}\n")
    r = subprocess.run(
        [str(BIN / "chatctl"), "--socket", chatd.socket, "reload"],
        capture_output=True,
        text=True,
        timeout=t(60),
    )
    assert r.returncode == 0, r.stderr
    c = Client(f"{chatd.url}?token={SECOND}")
    assert c.hello()["type"] == "welcome"
    c.close()
    assert refused(chatd, FIRST)
    log = chatd.log()
    assert FIRST not in log and SECOND not in log


def test_json_lines_about_a_session_carry_it_as_a_field(chatd: Chatd) -> None:
    token = (chatd.tmp / "tokens").read_text().split()[-1]  # whichever the file holds now
    c = Client(f"{chatd.url}?token={token}")
    welcome = c.hello()
    c.close()

    def closed_line() -> dict[str, Any] | None:
        for doc in json_lines(chatd):
            if doc.get("session") == welcome["session"] and "closed" in doc["msg"]:
                return doc
        return None

    line = wait_for(closed_line, 10, "the connection closed line with its session field")
    assert line["worker"] == welcome["worker"]
    assert line["msg"].startswith("connection closed")
