"""GET /metrics: the whole daemon in the Prometheus text format, whichever worker answers,
to whoever sends the ``[server] metrics_token`` (here read from ``metrics_token_file``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import ollama
import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from tests.promtext import Family, parse
from tests.support import Chatd, Client, running_chatd, t, wait_for

pytestmark = pytest.mark.system

MESSAGES = 12
TOKEN = "prometheus-0f1e2d"
PROMTOOL = shutil.which("promtool")


def http_get(
    url: str, timeout: float = 5.0, token: str | None = TOKEN
) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` with ``Authorization: Bearer token`` (none when ``token`` is None);
    (status, headers, body) for any status."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=t(timeout)
        ) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(FakeOllama(["qwen2.5-coder:7b"], tokens=4)) as f:
        yield f


@pytest.fixture(scope="module")
def chatd(fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chatd]:
    tmp = tmp_path_factory.mktemp("metrics")
    (tmp / "metrics.token").write_text(f"# Prometheus scrapes with it\n{TOKEN}\n")
    with running_chatd(
        tmp,
        fake.url,
        workers=2,
        backends=[{"url": fake.url, "max_parallel": 2, "max_parallel_embed": 3}],
        llm={"max_queue": 32},
        limits={"messages_per_minute": 600},
        server={"metrics_token_file": str(tmp / "metrics.token")},
    ) as d:
        yield d


def scrape(d: Chatd) -> tuple[str, dict[str, Family]]:
    """One GET /metrics on a new connection: (the answering worker, the parsed families)."""
    status, headers, body = http_get(f"{d.http}/metrics")
    assert status == 200, body
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return headers["X-Chatd-Worker"], parse(body.decode())


def test_metrics_are_daemon_wide_whichever_worker_answers(chatd: Chatd) -> None:
    """N messages over both workers: every scrape, from either worker, says N, which is also
    the sum of the workers' messages_total in chatctl status."""
    workers_used = set()
    clients = []
    for i in range(MESSAGES):
        c = Client(chatd.url)
        workers_used.add(c.hello()["worker"])
        assert c.ask(f"m{i}", f"count me {i}")[-1]["type"] == "reply"
        clients.append(c)
    assert len(workers_used) == 2, "SO_REUSEPORT sent every connection to one worker"

    def settled() -> bool:  # the workers report every second
        st = chatd.status()
        return st is not None and sum(w["messages_total"] for w in st["workers"]) == MESSAGES

    wait_for(settled, 5, "both workers' reports")
    # Slots a worker keeps leased for its next message go back after 1-2 s unused.
    wait_for(
        lambda: scrape(chatd)[1]["chatd_backend_in_flight"].samples[0][2] == 0,
        5,
        "the leased slots given back",
    )
    st = chatd.status()
    assert st is not None
    per_worker = [w["messages_total"] for w in st["workers"]]
    backend = st["backends"][0]["url"].rstrip("/")
    assert all(n > 0 for n in per_worker), per_worker
    answered_by = set()
    for _ in range(40):
        worker, fams = scrape(chatd)
        answered_by.add(worker)
        assert fams["chatd_messages_total"].value() == MESSAGES == sum(per_worker)
        assert fams["chatd_replies_total"].value() == MESSAGES
        assert fams["chatd_connections"].value() == MESSAGES  # all still open
        latency = fams["chatd_reply_latency_seconds"]
        count = [v for n, _, v in latency.samples if n.endswith("_count")]
        assert count == [MESSAGES]
        ttft = fams["chatd_time_to_first_token_seconds"]
        assert [v for n, _, v in ttft.samples if n.endswith("_count")] == [MESSAGES]
        assert fams["chatd_errors_total"].value(code="busy") == 0
        rss = {
            labels["slot"]: v for _, labels, v in fams["chatd_worker_resident_memory_bytes"].samples
        }
        assert set(rss) == {"1", "2"} and all(v > 10 * 1024 * 1024 for v in rss.values()), rss
        assert fams["chatd_queue_depth"].value() == 0
        assert fams["chatd_queue_max"].value() == 32
        assert fams["chatd_backend_in_flight"].value(backend=backend) == 0
        assert fams["chatd_backend_in_use"].value(backend=backend) == 0
        assert fams["chatd_backend_max_parallel"].value(backend=backend) == 2
        assert fams["chatd_backend_healthy"].value(backend=backend) == 1
        assert fams["chatd_workers"].value(state="ready") == 2
        assert fams["chatd_worker_restarts_total"].value() == 0
        # One message after another: the workers reuse leased slots, few go to the master.
        assert 2 <= fams["chatd_slot_grants_total"].value() < MESSAGES
        if len(answered_by) == 2:
            break
    assert len(answered_by) == 2, f"every scrape was answered by {answered_by}"
    for c in clients:
        c.close()


def test_the_embed_slot_class_is_shown_apart(chatd: Chatd) -> None:
    """The embed class (``max_parallel_embed = 3``, a queue of its own): in ``chatctl status
    --json`` (``backends[].embed``, ``embed_queue``, the workers' ``embed_backends``) and in
    /metrics (``chatd_embed_*``); a chat message takes a chat slot, never an embed one."""
    c = Client(chatd.url)
    c.hello()
    assert c.ask("embed-1", "a chat message")[-1]["type"] == "reply"
    c.close()
    st = wait_for(chatd.all_ready, 5, "chatctl status")
    backend = st["backends"][0]
    url = backend["url"].rstrip("/")
    assert backend["max_parallel"] == 2 and backend["embed"]["max_parallel"] == 3
    assert backend["embed"]["in_flight"] == backend["embed"]["in_use"] == 0
    assert st["queue"] == st["embed_queue"] == {"depth": 0, "max": 32}
    for w in st["workers"]:
        assert [(b["in_flight"], b["held"]) for b in w["embed_backends"]] == [(0, 0)]
    fams = scrape(chatd)[1]
    assert fams["chatd_embed_backend_max_parallel"].value(backend=url) == 3
    assert fams["chatd_backend_max_parallel"].value(backend=url) == 2
    assert fams["chatd_embed_queue_max"].value() == 32
    assert fams["chatd_embed_queue_depth"].value() == 0
    assert fams["chatd_embed_slot_grants_total"].value() == 0
    assert fams["chatd_slot_grants_total"].value() >= 1


def test_counters_survive_a_worker_restart(chatd: Chatd) -> None:
    """A killed worker's counts stay in the totals (counters never go down); restarts count."""
    before = scrape(chatd)[1]["chatd_messages_total"].value()
    pid = chatd.worker_pids()[0]
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: pid not in chatd.worker_pids() and chatd.all_ready(), 10, "the worker replaced"
    )
    fams = scrape(chatd)[1]
    assert fams["chatd_worker_restarts_total"].value() == 1
    # Its last report is read after its death: it may count what it did since ``before``.
    assert fams["chatd_messages_total"].value() >= before


def test_metrics_answer_503_when_the_master_does_not_answer(chatd: Chatd) -> None:
    """The worker waits for the master's figures for 2 s at most, then answers 503."""
    assert chatd.proc is not None
    os.kill(chatd.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        status, headers, body = http_get(f"{chatd.http}/metrics", timeout=10)
        elapsed = time.monotonic() - started
    finally:
        os.kill(chatd.proc.pid, signal.SIGCONT)
    assert status == 503 and headers.get("Retry-After") == "1", body
    assert 1.5 < elapsed < t(5), elapsed
    wait_for(lambda: http_get(f"{chatd.http}/metrics")[0] == 200, 5, "/metrics back")


def test_metrics_need_the_token(chatd: Chatd) -> None:
    """With a metrics token, /metrics answers 401 and WWW-Authenticate: Bearer to a scrape
    without it or with another, on every worker; the WebSocket port stays open to clients."""
    for token in (None, "wrong", TOKEN[:-1]):
        for _ in range(4):  # new connections: both workers get some
            status, headers, body = http_get(f"{chatd.http}/metrics", token=token)
            assert status == 401, body
            assert headers["WWW-Authenticate"].startswith("Bearer")
            assert b"chatd_" not in body
    assert http_get(f"{chatd.http}/metrics")[0] == 200
    assert http_get(f"{chatd.http}/healthz", token=None)[0] == 200
    c = Client(chatd.url)
    c.hello()
    c.close()


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (make test installs it)")
def test_promtool_accepts_a_live_scrape(chatd: Chatd) -> None:
    """`promtool check metrics` finds nothing wrong with /metrics of a chatd that has chatted
    (so that the histograms and the per-backend series have samples)."""
    c = Client(chatd.url)
    c.hello()
    reply = c.ask("p1", "hello promtool")[-1]
    assert reply["type"] == "reply"
    c.close()
    # Where the message's time went, in the reply and in /metrics (chatd.worker.stages).
    stages = reply["stats"]["stages"]
    assert set(stages) == {"commit_ms", "queue_ms", "first_token_ms", "stream_ms"}
    assert all(v >= 0 for v in stages.values()) and stages["commit_ms"] > 0
    # And an API request, so that the chatd_http_* series have samples too.
    ollama.Client(host=chatd.http).chat(
        model="qwen2.5-coder:7b", messages=[{"role": "user", "content": "hello"}]
    )
    wait_for(
        lambda: scrape(chatd)[1]["chatd_reply_latency_seconds"].samples[-1][2] > 0,
        5,
        "the reply counted in /metrics",
    )

    def api_chat_counted() -> dict[str, Any] | None:
        families = scrape(chatd)[1]
        rows = families["chatd_http_requests_total"].samples
        labels = {"api": "ollama", "endpoint": "/api/chat", "code": "200"}
        return families if any(lab == labels and v >= 1 for _, lab, v in rows) else None

    families = wait_for(api_chat_counted, 5, "the API request counted in /metrics")
    counts = {
        lab["stage"]: v
        for n, lab, v in families["chatd_stage_seconds"].samples
        if n.endswith("_count")
    }
    assert counts["commit"] >= 1 and counts["store_reply"] >= 1 and counts["publish"] >= 1
    lag = families["chatd_event_loop_lag_seconds"].samples
    assert next(v for n, _, v in lag if n.endswith("_count")) > 0
    ttft = families["chatd_http_time_to_first_token_seconds"].samples
    assert any(n.endswith("_count") and lab == {"api": "ollama"} and v >= 1 for n, lab, v in ttft)
    body = http_get(f"{chatd.http}/metrics")[2]
    assert PROMTOOL is not None
    r = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=t(30)
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b""), (r, body.decode())


def test_the_store_writer_is_in_metrics(chatd: Chatd) -> None:
    """The SQLite store's writer (on by default) in /metrics: up, not restarted, its commits
    and rows at least what chatctl status showed of its reports just before (the same
    figures: it sends them to the master every second)."""

    def reported() -> dict[str, Any] | None:
        st = chatd.status()
        writer = ((st or {}).get("master") or {}).get("store_writer") or {}
        return writer if (writer.get("store") or {}).get("rows") else None

    c = Client(chatd.url)
    c.hello()
    assert c.ask("w1", "stored by the writer")[-1]["type"] == "reply"
    c.close()
    writer = wait_for(reported, 5, "the writer's figures in chatctl status")
    fams = scrape(chatd)[1]
    assert fams["chatd_store_writer_up"].value() == 1
    assert fams["chatd_store_writer_restarts_total"].value() == writer["restarts"] == 0
    assert fams["chatd_store_writer_rows_total"].value() >= writer["store"]["rows"] >= 2
    assert fams["chatd_store_writer_commits_total"].value() >= writer["store"]["commits"] >= 1
    median = fams["chatd_store_writer_commit_median_seconds"].value()
    assert 0 < median <= fams["chatd_store_writer_commit_p99_seconds"].value()
