"""Faults of a backend, against a real chatd: one message's backend breaks, nobody else notices.

One chatd (master + 2 workers) relays to two fake Ollamas. Each test sets the same fault on both
fakes, limited by ``fault_match`` to the victim's message text, so that whichever backend the
victim's message (or its retry) gets, it breaks, while the other clients' messages, on the same
backends, the same connection pools and maybe the same worker, are served as usual. Then:

* the victim gets one ``error`` frame with the code ``docs/protocol.md`` gives that failure,
  carrying the message's ``id`` and a ``seq``: the message's final answer, replayed as such to
  a client that resumes the session;
* the clients chatting meanwhile (mid-reply when the victim's message is sent) get their
  replies whole, and everyone, the victim included, chats on afterwards;
* the fakes see no request left in flight (chatd closed what it gave up on), and the workers
  are the same processes as before (none crashed).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest

from chatd.dev.fake_ollama.main import FakeOllama, FakeOllamaThread, expected_reply, reply_tokens
from tests.support import Chatd, Client, fake_config, fake_stats, running_chatd, t, wait_for

pytestmark = pytest.mark.system

MODEL = "qwen2.5-coder:7b"
TOKENS = 6
MARK = "VICTIM"  # fault_match: only messages containing it break
BYSTANDERS = 3
# Chatd's deadlines, scaled like every time limit here; a trickled line never completes in them.
IDLE_S = t(1.0)
DEFAULT_KNOBS: dict[str, Any] = {
    "tokens": TOKENS,
    "token_ms": 20,  # replies span a while, so the bystanders are mid-reply during the fault
    "fault": None,
    "fault_after_tokens": 0,
    "fault_match": MARK,
    "fault_bytes": 5 * 1024 * 1024,
    "trickle_ms": 1000,
}


@pytest.fixture(scope="module")
def fakes() -> Iterator[list[FakeOllama]]:
    with (
        FakeOllamaThread(FakeOllama([MODEL], tokens=TOKENS)) as a,
        FakeOllamaThread(FakeOllama([MODEL], tokens=TOKENS)) as b,
    ):
        yield [a, b]


@pytest.fixture(scope="module")
def chatd(fakes: list[FakeOllama], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chatd]:
    tmp = tmp_path_factory.mktemp("chatd")
    backends = [{"url": f.url, "max_parallel": 8} for f in fakes]
    with running_chatd(
        tmp,
        fakes[0].url,
        workers=2,
        backends=backends,
        llm={"first_token_timeout": t(5.0), "idle_timeout": IDLE_S},
        limits={"messages_per_minute": 600},
    ) as d:
        yield d


@pytest.fixture(autouse=True)
def reset_fakes(fakes: list[FakeOllama]) -> None:
    for f in fakes:
        fake_config(f.url, **DEFAULT_KNOBS, reset_stats=True)


def set_fault(fakes: list[FakeOllama], **knobs: Any) -> None:
    for f in fakes:
        fake_config(f.url, **knobs)


def final(frames: list[dict[str, Any]]) -> dict[str, Any]:
    return frames[-1]


def fault_round(
    chatd: Chatd, fakes: list[FakeOllama], victim_text: str, **client_kwargs: Any
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Bystanders start their messages and get a first token; then the victim sends
    ``victim_text``. Returns the victim's ack, its final frame and its session; checks that
    every bystander got its reply whole, and that each then chats on."""
    bystanders = [Client(chatd.url) for _ in range(BYSTANDERS)]
    victim = Client(chatd.url, **client_kwargs)
    try:
        for b in bystanders:
            b.hello()
        session = victim.hello()["session"]
        for i, b in enumerate(bystanders):
            b.send({"type": "message", "id": "b1", "text": f"bystander {i} says hi"})
        for b in bystanders:  # each is mid-reply when the victim's message goes out
            b.until(lambda f: f["type"] == "token" or (f["type"] == "reply" and "seq" in f))
        victim.send({"type": "message", "id": "v1", "text": victim_text})
        frames = victim.until(
            lambda f: f.get("id") == "v1" and f["type"] in ("reply", "error") and "seq" in f,
            timeout=30,
        )
        ack = next(f for f in frames if f["type"] == "ack" and f.get("id") == "v1")
        for i, b in enumerate(bystanders):
            reply = b.until(lambda f: f["type"] in ("reply", "error") and "seq" in f)[-1]
            assert reply["type"] == "reply", reply
            assert reply["text"] == expected_reply(f"bystander {i} says hi", TOKENS)
        # After the fault: the victim's connection and the bystanders' chat on.
        for i, c in enumerate([victim, *bystanders]):
            after = final(c.ask("after", f"and then {i}"))
            assert after["type"] == "reply", after
            assert after["text"] == expected_reply(f"and then {i}", TOKENS)
        return ack, final(frames), session
    finally:
        for c in [victim, *bystanders]:
            c.close()


def assert_stored_error(chatd: Chatd, session: str, ack_seq: int, err: dict[str, Any]) -> None:
    """The error is the message's final answer: a client resuming from its ack gets it
    replayed with the same seq, before the later turn."""
    c = Client(chatd.url)
    try:
        welcome = c.hello(session, last_seq=ack_seq)
        assert welcome["resumed"] is True
        replayed = c.recv()
        assert replayed["type"] == "error" and replayed["id"] == "v1", replayed
        assert (replayed["seq"], replayed["code"]) == (err["seq"], err["code"])
    finally:
        c.close()


def idle(fake_url: str) -> bool:
    return fake_stats(fake_url)["in_flight"] == 0


def assert_unharmed(chatd: Chatd, fakes: list[FakeOllama], pids: list[int]) -> None:
    for f in fakes:  # chatd closed whatever request it gave up on
        wait_for(functools.partial(idle, f.url), 10, f"no request in flight on {f.url}")
    assert chatd.all_ready() is not None
    assert chatd.worker_pids() == pids, "a worker was replaced"
    assert "generation failed unexpectedly" not in chatd.log()  # the 'internal' path: a bug


FAULTS = [
    pytest.param("reset", 2, "llm_unavailable", True, id="reset-mid-stream"),
    # Before any token: retryable, so retried on the other backend, which resets too.
    pytest.param("reset", 0, "llm_unavailable", True, id="reset-before-first-token"),
    pytest.param("trickle", 2, "llm_timeout", True, id="trickle-one-byte-a-second"),
    pytest.param("not_json", 2, "llm_error", False, id="line-not-json"),
    pytest.param("not_object", 2, "llm_error", False, id="line-json-array"),
    pytest.param("not_json", 0, "llm_error", False, id="first-line-not-json"),
    # A chunk without message.content: refused as malformed (it was taken as an empty piece,
    # and the shortened reply stored as whole).
    pytest.param("no_message", 2, "llm_error", False, id="object-without-message"),
]


@pytest.mark.parametrize(("fault", "after", "code", "retryable"), FAULTS)
def test_a_backend_fault_ends_only_its_message(
    chatd: Chatd,
    fakes: list[FakeOllama],
    fault: str,
    after: int,
    code: str,
    retryable: bool,
) -> None:
    pids = chatd.worker_pids()
    set_fault(fakes, fault=fault, fault_after_tokens=after)
    ack, err, session = fault_round(chatd, fakes, f"{MARK} asks something")
    assert err["type"] == "error", f"no error for {fault}: {err}"
    assert (err["code"], err["retryable"]) == (code, retryable), err
    assert err["seq"] > ack["seq"]
    assert any(f.url.split("//")[1] in err["message"] for f in fakes), err["message"]
    assert_stored_error(chatd, session, ack["seq"], err)
    assert_unharmed(chatd, fakes, pids)


def test_a_5_mb_token_is_relayed_whole(chatd: Chatd, fakes: list[FakeOllama]) -> None:
    """One 5 MB token is within the relay's line limit (32 MiB): a reply like any other,
    stored and replayed whole."""
    pids = chatd.worker_pids()
    size = 5 * 1024 * 1024
    set_fault(fakes, fault="huge_token", fault_after_tokens=2, fault_bytes=size)
    text = f"{MARK} wants a big one"
    ack, reply, session = fault_round(chatd, fakes, text, max_size=None)
    toks = list(reply_tokens(text, TOKENS))
    toks[2] = "x" * size
    assert reply["type"] == "reply", reply
    assert reply["text"] == "".join(toks) and reply["done_reason"] == "stop"
    c = Client(chatd.url, max_size=None)
    try:
        c.hello(session, last_seq=ack["seq"])
        replayed = c.recv()
        assert (replayed["type"], replayed["seq"]) == ("reply", reply["seq"])
        assert replayed["text"] == reply["text"]
    finally:
        c.close()
    assert_unharmed(chatd, fakes, pids)
