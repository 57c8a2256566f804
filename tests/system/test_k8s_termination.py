"""The kubelet plays its part: a pod's termination, step by step, against a real chatd pair.

Two chatd "pods" (A and B: two masters, two ports) share one Redis and one fake Ollama whose
replies stream for REPLY_S. The test does what the kubelet does to pod A when it is deleted
(deploy/k8s/base/deployment.yaml): runs the preStop hook (a sleep of PRESTOP_S, chatd
serving meanwhile), sends SIGTERM to the container's PID 1 (chatd's master), and would send
SIGKILL to everything left at the end of the grace period, GRACE_S after the start, computed
as the manifests' invariant (preStop + shutdown_delay + graceful_timeout + 10).

A runs with ``shutdown_delay`` = DELAY_S and ``graceful_timeout`` = GRACEFUL_S. Checked:

* during the pre-drain A answers 503 on /healthz and /readyz, 200 on /livez, and still
  serves: a new client connects and gets its message acknowledged;
* a reply in flight that fits in the drain is delivered on A, then its client gets 1001
  (going away), never 1006 (abnormal closure);
* a reply that does not fit is stopped and handed back; its client gets 1001, resumes on B
  with ``hello{session, last_seq}`` and gets it there, generated once;
* A's master exits 0 before the grace deadline (no SIGKILL needed);
* in Redis and in what the clients received: every acknowledged message answered exactly
  once, no event delivered twice.

Also: /livez fails when the master hangs (SIGSTOP), while /healthz, answered by a worker
alone, does not see it: why the liveness probe is /livez.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread
from tests.support import Chatd, Client, Reader, http_get, running_chatd, wait_for

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

TOKENS, TOKEN_MS = 35, 100  # a reply streams for REPLY_S
REPLY_S = TOKENS * TOKEN_MS / 1000
PRESTOP_S = 0.5
DELAY_S = 1.0  # [server] shutdown_delay of pod A: room for the checks made during it
GRACEFUL_S = 1.5  # [server] graceful_timeout of pod A
# m1 is sent HEAD_S before the termination starts: it ends 1 s before the drain's deadline
# (PRESTOP_S + DELAY_S + GRACEFUL_S after the start); m2, sent at SIGTERM, would end 1 s after.
HEAD_S = 1.5
GRACE_S = PRESTOP_S + DELAY_S + GRACEFUL_S + 10  # terminationGracePeriodSeconds


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllamaThread(
        FakeOllama(["qwen2.5-coder:7b"], tokens=TOKENS, token_ms=TOKEN_MS, first_token_ms=20)
    ) as f:
        yield f


def _pod(tmp: Path, name: str, backend: str, store: str) -> Chatd:
    (tmp / name).mkdir()
    return Chatd(
        tmp / name,
        backend,
        workers=2,
        env={"CHATD_TEST_LEASE": "2"},
        server={"graceful_timeout": GRACEFUL_S, "shutdown_delay": DELAY_S},
        sessions={"store": store},
    )


def _answers(frames: list[dict[str, Any]]) -> Counter[str]:
    return Counter(f["id"] for f in frames if f["type"] in ("reply", "error") and "seq" in f)


def _last_seq(frames: list[dict[str, Any]]) -> int:
    return max((f["seq"] for f in frames if "seq" in f), default=0)


def test_kubelet_terminates_a_pod_and_clients_resume_on_the_other(
    fake: FakeOllama, tmp_path: Path, start_redis: Callable[..., Any]
) -> None:
    store = start_redis("--maxmemory-policy", "noeviction").url
    a, b = _pod(tmp_path, "a", fake.url, store), _pod(tmp_path, "b", fake.url, store)
    try:
        for pod in (a, b):
            pod.start(wait_ready=False)
        for pod in (a, b):
            wait_for(pod.all_ready, 20, "every worker ready")
        # c1: a reply in flight when the termination starts; it fits in the drain.
        c1 = Client(a.url)
        s1 = c1.hello()["session"]
        got1: list[dict[str, Any]] = []
        r1 = Reader(c1, got1)
        c1.send({"type": "message", "id": "m1", "text": "long answer"})
        r1.wait(lambda f: f["type"] == "token" and f.get("id") == "m1", 10, "m1 streaming")
        time.sleep(HEAD_S)

        # The kubelet: the pod is deleted. preStop first (chatd is not told).
        t0 = time.monotonic()
        assert http_get(f"{a.http}/healthz")[0] == 200
        time.sleep(PRESTOP_S)
        assert a.proc is not None
        master = a.proc.pid  # PID 1 of the container
        os.kill(master, signal.SIGTERM)
        sigterm_at = time.monotonic()

        # The pre-drain: probes say "take me out", /livez says "alive", chat goes on. (The
        # master tells each worker: wait until both have heard it.)
        wait_for(lambda: a.log().count("the daemon stops soon") == 2, 1, "predrain told")
        status = {p: http_get(f"{a.http}/{p}")[0] for p in ("healthz", "readyz", "livez")}
        assert status == {"healthz": 503, "readyz": 503, "livez": 200}, status
        c2 = Client(a.url)
        s2 = c2.hello()["session"]
        got2: list[dict[str, Any]] = []
        r2 = Reader(c2, got2)
        c2.send({"type": "message", "id": "m2", "text": "too long for the drain"})
        r2.wait(lambda f: f["type"] == "ack" and f.get("id") == "m2", 5, "m2 acknowledged")
        assert time.monotonic() - sigterm_at < DELAY_S, "the pre-drain ended before the check"

        # The kubelet waits for the container to exit, up to the grace deadline.
        try:
            code = a.proc.wait(timeout=max(0.1, t0 + GRACE_S - time.monotonic()))
        except subprocess.TimeoutExpired:
            a.kill_all()  # the SIGKILL at the deadline
            pytest.fail(f"pod A did not exit within the grace period ({GRACE_S}s)")
        exited_after = time.monotonic() - t0
        assert code == 0, a.log()[-3000:]
        # Exit within preStop + delay + graceful_timeout (+1 s to close and hand back), far
        # from the kubelet's SIGKILL, and without the master's (its EXIT_GRACE was enough).
        assert exited_after < PRESTOP_S + DELAY_S + GRACEFUL_S + 1.0, exited_after
        assert "killed by signal" not in a.log(), a.log()[-2000:]

        code1, code2 = r1.closed(5), r2.closed(5)
        assert (code1, code2) == (1001, 1001), "clients must see going-away, not 1006"
        assert _answers(got1) == {"m1": 1}, "m1 fit in the drain: answered on A"
        assert _answers(got2) == {}, "m2 did not fit: handed over, not answered on A"

        # The clients reconnect (through the Service: to B) and resume.
        c1 = Client(b.url)
        w = c1.hello(s1, _last_seq(got1))
        assert w["type"] == "welcome" and w["resumed"], w
        r1 = Reader(c1, got1)
        c1.send({"type": "message", "id": "m3", "text": "after the move"})
        c2 = Client(b.url)
        w = c2.hello(s2, _last_seq(got2))
        assert w["type"] == "welcome" and w["resumed"], w
        r2 = Reader(c2, got2)
        final = ("reply", "error")
        r1.wait(lambda f: f["type"] in final and f.get("id") == "m3", REPLY_S + 10, "m3 on B")
        r2.wait(lambda f: f["type"] in final and f.get("id") == "m2", REPLY_S + 10, "m2 on B")
        time.sleep(0.3)  # nothing more may come
        for c, r in ((c1, r1), (c2, r2)):
            c.close()
            r.closed(5)
        b_status = b.status()
        assert b_status is not None
        taken_over = sum(w.get("takeovers_total", 0) for w in b_status["workers"])
    finally:
        for d in (a, b):
            try:
                if d.proc is not None and d.proc.poll() is None:
                    d.stop()
            finally:
                d.kill_all()

    # From the clients: each acknowledged message answered exactly once, no event twice.
    assert _answers(got1) == {"m1": 1, "m3": 1}, _answers(got1)
    assert _answers(got2) == {"m2": 1}, _answers(got2)
    for got in (got1, got2):
        seqs = [f["seq"] for f in got if "seq" in f]
        assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs), seqs
    assert all(f["type"] == "reply" for f in got1 + got2 if f["type"] in ("reply", "error"))
    assert taken_over == 1, f"B took over {taken_over} messages, expected 1 (m2)"
    # From the store: one final per user message, in both sessions.
    raw = redis.Redis.from_url(store, decode_responses=True)
    for session, ids in ((s1, ["m1", "m3"]), (s2, ["m2"])):
        entries: list[tuple[str, dict[str, str]]] = raw.xrange(f"chatd:s:{{{session}}}:log")  # type: ignore[assignment]
        log = [(f["k"], f["m"]) for _, f in entries]
        assert [m for k, m in log if k == "user"] == ids, log
        assert Counter(m for k, m in log if k != "user") == dict.fromkeys(ids, 1), log
    print(
        "\nKUBELET "
        + json.dumps(
            {
                "prestop_s": PRESTOP_S,
                "shutdown_delay_s": DELAY_S,
                "graceful_timeout_s": GRACEFUL_S,
                "grace_s": GRACE_S,
                "exited_after_s": round(exited_after, 2),
                "close_codes": [code1, code2],
                "taken_over_by_b": taken_over,
            }
        )
    )


def test_livez_sees_a_hung_master_and_healthz_does_not(fake: FakeOllama, tmp_path: Path) -> None:
    with running_chatd(tmp_path, fake.url, workers=1) as d:
        assert d.proc is not None
        assert http_get(f"{d.http}/livez")[0] == 200
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            status, _, body = http_get(f"{d.http}/livez")
            assert status == 503 and b"the master did not answer" in body, body
            assert http_get(f"{d.http}/healthz")[0] == 200  # a worker alone answers it
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        wait_for(lambda: http_get(f"{d.http}/livez")[0] == 200, 5, "/livez back to 200")
