"""Backends from DNS: a ``discover = "dns"`` table whose name a stub DNS server on loopback
answers (tests/dnsstub.py, ``[llm] nameservers``), in front of two fake Ollamas on 127.0.0.2
and 127.0.0.3, same port (every 127/8 address reaches ``lo`` on Linux), as two pods behind a
headless Service.

One run, as an operator would scale Ollama: one address, chat works; a second address appears
(the StatefulSet scaled up), both get requests, neither beyond its ``max_parallel``; the first
disappears while requests run on it (scaled down): those finish, it gets no new one, chatting
goes on. No reload: the same workers throughout.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread, expected_reply
from tests.dnsstub import StubDNS
from tests.support import Chatd, Client, fake_config, fake_stats, http_get, running_chatd, wait_for

pytestmark = pytest.mark.system

NAME = "ollama.chatd.test"
MAX_PARALLEL = 2
MODEL = "qwen2.5-coder:7b"


def common_port() -> int:
    """A port free on both 127.0.0.2 and 127.0.0.3."""
    for _ in range(20):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.2", 0))
            port = int(a.getsockname()[1])
            try:
                b.bind(("127.0.0.3", port))
            except OSError:
                continue
            return port
    raise AssertionError("no port free on both 127.0.0.2 and 127.0.0.3")


@pytest.fixture
def pods() -> Iterator[tuple[FakeOllama, FakeOllama]]:
    port = common_port()
    threads = [FakeOllamaThread(FakeOllama([MODEL], tokens=5)) for _ in range(2)]
    threads[0].start("127.0.0.2", port)
    try:
        threads[1].start("127.0.0.3", port)
        yield threads[0].fake, threads[1].fake
    finally:
        for thread in threads:
            thread.stop()


def backends(d: Chatd) -> list[dict[str, Any]]:
    st = d.status()
    return [] if st is None else list(st["backends"])


def urls(d: Chatd) -> list[str]:
    return [b["url"] for b in backends(d)]


def chat(d: Chatd, texts: list[str]) -> list[dict[str, Any]]:
    """Each text sent by a client of its own, all at once; each one's final frame."""

    def one(text: str) -> dict[str, Any]:
        c = Client(d.url)
        try:
            c.hello()
            return c.ask("m1", text, timeout=20)[-1]
        finally:
            c.close()

    with ThreadPoolExecutor(len(texts)) as pool:
        return list(pool.map(one, texts))


def test_addresses_come_and_go_without_a_reload(
    tmp_path: Path, pods: tuple[FakeOllama, FakeOllama]
) -> None:
    a, b = pods
    url_a, url_b = a.url, b.url  # http://127.0.0.2:PORT, http://127.0.0.3:PORT
    table = f"http://{NAME}:{a.port}"
    with StubDNS() as dns:
        dns.set(NAME, ["127.0.0.2"])
        with running_chatd(
            tmp_path,
            table,
            workers=2,
            backends=[
                {
                    "url": table,
                    "discover": "dns",
                    "discover_interval": 0.3,
                    "max_parallel": MAX_PARALLEL,
                }
            ],
            llm={"nameservers": [dns.address], "first_token_timeout": 10.0},
            limits={"messages_per_minute": 600},
        ) as d:
            pids = d.worker_pids()
            # 1. One address: it is the backend, and chat works.
            wait_for(lambda: urls(d) == [url_a], 5, f"{url_a} as the one backend")
            (row,) = backends(d)
            assert row["discovered_from"] == table and row["max_parallel"] == MAX_PARALLEL
            (final,) = chat(d, ["hello there"])
            assert final["type"] == "reply" and final["text"] == expected_reply("hello there", 5)
            assert fake_stats(url_a)["requests_total"] >= 1

            # 2. A second pod: both get requests, neither more than max_parallel at once.
            for fake in (url_a, url_b):
                fake_config(fake, token_ms=60, reset_stats=True)
            dns.set(NAME, ["127.0.0.2", "127.0.0.3"])
            wait_for(lambda: urls(d) == [url_a, url_b], 5, "both addresses as backends")
            texts = [f"question {i}" for i in range(12)]
            finals = chat(d, texts)
            assert all(f["type"] == "reply" for f in finals), finals
            stats = {u: fake_stats(u) for u in (url_a, url_b)}
            assert all(s["requests_total"] >= 2 for s in stats.values()), stats
            assert all(1 <= s["max_in_flight"] <= MAX_PARALLEL for s in stats.values()), stats
            assert sum(s["requests_total"] for s in stats.values()) == len(texts)

            # 3. The first pod goes while two requests run on it (both pods full of slow
            # replies: 2 + 2 slots, 4 requests): they finish, it gets none after, and the
            # other pod serves everything.
            for fake in (url_a, url_b):
                fake_config(fake, token_ms=400, reset_stats=True)  # ~2 s per reply
            with ThreadPoolExecutor(1) as pool:
                running = pool.submit(chat, d, [f"slow {i}" for i in range(4)])
                for fake in (url_a, url_b):
                    wait_for(lambda f=fake: fake_stats(f)["in_flight"] == 2, 5, f"2 on {fake}")
                dns.set(NAME, ["127.0.0.3"])
                wait_for(lambda: urls(d) == [url_b], 5, f"{url_a} gone from the backends")
                assert fake_stats(url_a)["in_flight"] == 2  # not cut: drained
                fake_config(url_b, token_ms=0)
                after = chat(d, [f"after {i}" for i in range(4)])
                assert all(f["type"] == "reply" for f in after), after
                slow = running.result(20)
            assert all(f["type"] == "reply" for f in slow), slow
            assert fake_stats(url_a)["requests_total"] == 2  # none after it went
            assert fake_stats(url_a)["in_flight"] == 0
            assert fake_stats(url_b)["requests_total"] == 6
            assert fake_stats(url_b)["max_in_flight"] <= MAX_PARALLEL

            # Seen by an operator: status, /metrics and the log; and no reload happened.
            assert d.worker_pids() == pids
            st = d.status()
            assert st is not None
            (disc,) = st["discovery"]
            assert disc["addresses"] == ["127.0.0.3"] and disc["error"] == ""
            status, _, body = http_get(f"{d.http}/metrics")
            assert status == 200
            assert f'chatd_backend_addresses{{table="{table}"}} 1' in body.decode()
            assert f'chatd_backend_max_parallel{{backend="{url_b}"}} {MAX_PARALLEL}' in (
                body.decode()
            )
            log = d.log()
            assert f"backend {url_b} appeared (an address of {table})" in log
            assert f"backend {url_a} disappeared (no longer an address of {table})" in log
