"""Fleet-wide LLM slots (issue #14 point 1): two hosts, one Redis, one backend's cap for both.

Host A and host B are two chatd masters (2 workers each) on one Redis store, in front of one
fake Ollama listed with ``max_parallel = 4`` on both. Without fleet slots each master would
grant 4 and the fake would see 8 at once; with them the hosts share the 4 through Redis
(:mod:`chatd.master.fleet`, :mod:`chatd.store.redis_slots`). The fake's ``max_in_flight``
(``/_fake/stats``) is the proof, as in tests/system/test_slots.py for one host.

* 40 clients, 20 per host, send at once, twice: every message is answered, the fake's
  ``max_in_flight`` is exactly 4 (reached, never passed), both hosts' requests ran, and
  ``chatctl status`` shows the fleet's figures (2 hosts; the text line too), and so does
  ``/metrics`` (``chatd_fleet_*``, accepted by promtool).
* Both hosts under steady load; host A's whole process group is SIGKILLed: the fake never
  sees more than 4, and host B alone gets all 4 and reaches 4 in flight (A's slots come back
  when its lease lapses in Redis, 2 s, then at B's next sync). The delay is printed
  (``pytest -s``) and is a figure of docs/benchmarks.md, not an assertion here: that a host
  that stops renewing loses its slots at the TTL is checked without a machine's speed in
  tests/component/store/test_redis_slots.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread, expected_reply
from chatd.master.fleetpools import TTL
from tests.promtext import parse
from tests.support import (
    Chatd,
    Client,
    chatctl,
    fake_config,
    fake_stats,
    http_get,
    t,
    two_hosts,
    wait_for,
)

pytestmark = [pytest.mark.system, pytest.mark.timeout(150)]

PROMTOOL = shutil.which("promtool")
MAX_PARALLEL = 4
CLIENTS = 40
TOKENS = 8
TOKEN_MS = 40  # a reply takes ~0.3 s: 80 of them, 4 at a time, ~6 s


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(
        FakeOllama(["qwen2.5-coder:7b"], tokens=TOKENS, token_ms=TOKEN_MS, first_token_ms=0)
    ) as f:
        yield f


def hosts(tmp: Path, fake: FakeOllama, store: str) -> Any:
    """Hosts a and b on ``store``, each listing the fake with MAX_PARALLEL slots. The store
    is a Redis of the test's own: on the run's shared one, the hosts' sweeps would claim the
    lapsed messages other tests left there and generate them on this fake (seen: 467
    requests for 80)."""
    return two_hosts(
        tmp,
        fake.url,
        workers=2,
        backends=[{"url": fake.url, "max_parallel": MAX_PARALLEL}],
        sessions={"store": store},
        llm={"max_queue": 256, "first_token_timeout": 30.0, "idle_timeout": 30.0},
        limits={"messages_per_minute": 6000},
    )


def fleet_row(d: Chatd) -> dict[str, Any]:
    st = d.status()
    assert st is not None
    return {**st["backends"][0].get("fleet", {}), "master_fleet": st.get("fleet")}


def chat(d: Chatd, i: int, rounds: int, barrier: threading.Barrier) -> list[str]:
    """One client: hello, then ``rounds`` messages, all clients sending each round at once;
    returns the reply texts."""
    c = Client(d.url)
    try:
        c.hello()
        texts = []
        for r in range(rounds):
            barrier.wait(t(60))
            frames = c.ask(f"m{i}-{r}", f"question {i} round {r}", timeout=60)
            assert frames[-1]["type"] == "reply", frames[-1]
            texts.append(frames[-1]["text"])
        return texts
    finally:
        c.close()


def test_two_hosts_share_one_backends_cap(
    tmp_path: Path, fake: FakeOllama, start_redis: Callable[..., Any]
) -> None:
    with hosts(tmp_path, fake, start_redis().url) as (a, b):
        wait_for(lambda: fleet_row(a).get("hosts") == 2, 10, "host A sees both hosts")
        fake_config(fake.url, reset_stats=True)
        barrier = threading.Barrier(CLIENTS)
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(chat, a if i % 2 else b, i, 2, barrier) for i in range(CLIENTS)]
            replies = [f.result() for f in futures]
        for i, texts in enumerate(replies):
            assert texts == [expected_reply(f"question {i} round {r}", TOKENS) for r in (0, 1)]
        stats = fake_stats(fake.url)
        assert stats["requests_total"] == 2 * CLIENTS
        assert stats["max_in_flight"] == MAX_PARALLEL, stats  # one host would allow 4, two 8
        for d in (a, b):
            st = d.status()
            assert st is not None
            assert st["totals"]["messages_total"] == CLIENTS, "each host served its 20 clients"
            row = st["backends"][0]
            assert row["fleet"]["hosts"] == 2, row
            assert row["fleet"]["here_held"] <= MAX_PARALLEL
            assert st["fleet"]["error"] == "" and st["fleet"]["ttl_s"] == TTL
            assert "embed" not in row or row["embed"]["fleet"]["hosts"] == 2
        text = chatctl(a, "status").stdout
        assert "(fleet: " in text and "over 2 hosts" in text, text
        assert "LLM slots shared with the other hosts of the Redis store" in text, text
        body = http_get(f"{b.http}/metrics")[2]
        families = parse(body.decode())
        labels = {"backend": fake.url.rstrip("/"), "class": "chat"}
        assert (labels, 2.0) in [(lab, v) for _, lab, v in families["chatd_fleet_hosts"].samples]
        held = [v for _, lab, v in families["chatd_fleet_slots_held"].samples if lab == labels]
        assert held and 1 <= held[0] <= MAX_PARALLEL, held
        assert families["chatd_fleet_renewal_failing"].samples[0][2] == 0
        if PROMTOOL is not None:
            r = subprocess.run(
                [PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=t(30)
            )
            assert (r.returncode, r.stdout, r.stderr) == (0, b"", b""), r


class Load:
    """Clients that keep asking, each in its thread, until stopped or their host dies."""

    def __init__(self, d: Chatd, count: int, tag: str) -> None:
        self.stop = threading.Event()
        self.answered = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(d, f"{tag}{i}"), daemon=True)
            for i in range(count)
        ]
        for th in self._threads:
            th.start()

    def _run(self, d: Chatd, name: str) -> None:
        n = 0
        try:
            c = Client(d.url)
            c.hello()
            while not self.stop.is_set():
                n += 1
                frames = c.ask(f"{name}-{n}", f"{name} asks {n}", timeout=60)
                with self._lock:
                    self.answered += frames[-1]["type"] == "reply"
        except Exception:
            with self._lock:
                self.failed += 1
        else:
            c.close()

    def join(self) -> None:
        self.stop.set()
        for th in self._threads:
            th.join(t(70))


def test_a_dead_hosts_slots_come_back_within_the_lease(
    tmp_path: Path, fake: FakeOllama, start_redis: Callable[..., Any]
) -> None:
    with hosts(tmp_path, fake, start_redis().url) as (a, b):
        wait_for(lambda: fleet_row(b).get("hosts") == 2, 10, "host B sees both hosts")
        fake_config(fake.url, reset_stats=True)
        on_a, on_b = Load(a, 12, "a"), Load(b, 12, "b")
        try:
            # Both hosts hold slots: B's share is what it holds.
            wait_for(lambda: 0 < fleet_row(b).get("here_held", 0) < MAX_PARALLEL, 20, "B shares")
            wait_for(lambda: on_a.answered >= 5 and on_b.answered >= 5, 30, "both hosts answer")
            assert a.proc is not None
            os.killpg(a.proc.pid, signal.SIGKILL)  # the whole host: master and workers
            killed = time.monotonic()
            a.proc.wait()
            # B alone: the fake sees 4 of B's requests at once once A's lease lapsed.
            wait_for(lambda: fleet_row(b).get("here_allowed") == MAX_PARALLEL, 10, "B gets all 4")
            took = time.monotonic() - killed
            wait_for(lambda: fake_stats(fake.url)["in_flight"] == MAX_PARALLEL, 10, "4 in flight")
            print(f"\nhost A SIGKILLed: host B may use all {MAX_PARALLEL} slots {took:.2f}s later")
            answered = on_b.answered
            wait_for(lambda: on_b.answered >= answered + 8, 20, "B goes on answering")
        finally:
            on_a.join()
            on_b.join()
        stats = fake_stats(fake.url)
        assert stats["max_in_flight"] == MAX_PARALLEL, stats  # reached, never passed
        assert on_b.failed == 0, "a client of the live host failed"
        row = fleet_row(b)
        wait_for(lambda: fleet_row(b).get("hosts") == 1, 5, "A is gone from the pool")
        assert row["master_fleet"]["error"] == ""
