"""The chat page in a real headless Chromium, driven over the DevTools protocol.

A person's path: open http://HOST:PORT/, type a message, press Enter, read the streamed
reply; reload the page and find the conversation again (the page resumes its session from
localStorage and the server replays the log).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread, expected_reply
from tests.support import Chatd, running_chatd, t

pytestmark = pytest.mark.system
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One Chromium tab over the DevTools protocol (just what these tests need)."""

    def __init__(self, ws_url: str) -> None:
        self.ws: ClientConnection = connect(ws_url, max_size=None, open_timeout=t(10), legacy=True)
        self.ids = count(1)
        self.events: list[dict[str, Any]] = []  # received while waiting for a call's result

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=t(20)))
            if msg.get("id") == n:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})  # type: ignore[no-any-return]
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, method: str, what: str, timeout: float = 20) -> dict[str, Any]:
        """The first event ``method`` received since :attr:`events` was last cleared."""
        deadline = time.monotonic() + t(timeout)
        while True:
            for i, msg in enumerate(self.events):
                if msg["method"] == method:
                    del self.events[: i + 1]
                    return msg.get("params", {})  # type: ignore[no-any-return]
            self.events.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"page: timed out waiting for {what}")
            try:
                msg = json.loads(self.ws.recv(timeout=left))
            except TimeoutError:
                continue
            if "method" in msg:
                self.events.append(msg)

    def reload(self) -> None:
        """Reload, and return once the *new* document has loaded: its load event has fired and
        a marker set on the old document's window is gone. Without this, checks made right
        after ``Page.reload`` could run against the old page, which already shows everything
        a resumed page must show."""
        self.js("window.__chatdOldDocument = true")
        self.events.clear()
        self.call("Page.reload")
        self.wait_event("Page.loadEventFired", "the reloaded page's load event")
        self.wait_js(
            "window.__chatdOldDocument === undefined && document.readyState === 'complete'",
            "the new document",
        )

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_js(self, expression: str, what: str, timeout: float = 15) -> Any:
        deadline = time.monotonic() + t(timeout)
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"page: timed out waiting for {what}")
            time.sleep(0.05)


@contextlib.contextmanager
def chromium(tmp: Path) -> Iterator[Page]:
    proc = subprocess.Popen(
        [
            str(CHROMIUM),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
            f"--user-data-dir={tmp / 'profile'}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        port = None
        deadline = time.monotonic() + t(30)
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                port = int(m.group(1))
        assert port is not None, "Chromium did not start its DevTools endpoint"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=t(10)) as r:
            targets = json.loads(r.read())
        page_target = next(x for x in targets if x["type"] == "page")
        page = Page(page_target["webSocketDebuggerUrl"])
        page.call("Page.enable")
        page.call("Runtime.enable")
        yield page
        page.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(t(10))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama(tokens=6, token_ms=30)) as f:
        yield f


@pytest.fixture(scope="module")
def chatd(fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chatd]:
    with running_chatd(tmp_path_factory.mktemp("page"), fake.url, workers=2) as d:
        yield d


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make test installs it)")
def test_chat_in_the_page_and_find_it_again_after_a_reload(chatd: Chatd, tmp_path: Path) -> None:
    """Type, send, watch the reply stream in; reload; the conversation is replayed."""
    text = "hello from the browser"
    expected = expected_reply(text, 6)
    with chromium(tmp_path) as page:
        page.call("Page.navigate", url=f"{chatd.http}/")
        page.wait_js(
            "document.getElementById('status').textContent.startsWith('session')", "welcome"
        )
        page.js(
            f"document.getElementById('text').value = {json.dumps(text)};"
            "document.getElementById('form').requestSubmit();"
        )
        got = page.wait_js(
            "(() => { const b = [...document.querySelectorAll('.msg.bot')]"
            ".filter(e => !e.classList.contains('streaming'));"
            " return b.length ? b[b.length - 1].firstChild.textContent : ''; })()",
            "the reply",
        )
        assert got == expected
        assert page.js("document.querySelector('.msg.user').textContent") == text
        assert not page.js("document.querySelector('.msg.user').classList.contains('pending')")
        shot = page.call("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "page.png").write_bytes(base64.b64decode(shot))

        session = page.js("localStorage.getItem('chatd.session')")
        assert session
        page.reload()
        page.wait_js(
            "document.getElementById('status').textContent.startsWith('session')", "resume"
        )
        # The same session, resumed: not a new one that happens to look alike.
        assert page.js("localStorage.getItem('chatd.session')") == session
        status = page.js("document.getElementById('status').textContent")
        assert status.startswith(f"session {session[:8]}"), status
        page.wait_js(
            "document.querySelectorAll('.msg.bot:not(.streaming)').length === 1",
            "the replayed reply",
        )
        assert page.js("document.querySelector('.msg.user').textContent") == text
        assert page.js("document.querySelector('.msg.bot').firstChild.textContent") == expected
