"""chatd-bench's bare reference relay on the wire, and short smokes of the ``max``, ``idle``
and ``closed`` scenarios against it and the own chatd. Checks frames, structure and sane
values, never timings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from websockets.asyncio.client import connect

from chatd.bench import cli, idle, longrun, maxrate, report
from chatd.bench.bare import BareRelay
from chatd.bench.server import FakeBackend, OwnChatd, fake_config
from chatd.dev.fake_ollama.wire import expected_reply

pytestmark = [pytest.mark.system]


async def _converse(url: str, text: str) -> list[dict[str, Any]]:
    """hello, one message; every frame received until the reply (or an error)."""
    frames: list[dict[str, Any]] = []
    async with connect(url, compression=None) as ws:
        await ws.send(orjson.dumps({"type": "hello"}), text=True)
        frames.append(orjson.loads(await asyncio.wait_for(ws.recv(), 10)))
        await ws.send(orjson.dumps({"type": "message", "id": "m1", "text": text}), text=True)
        while frames[-1]["type"] not in ("reply", "error"):
            frames.append(orjson.loads(await asyncio.wait_for(ws.recv(), 10)))
    return frames


def test_bare_relay_answers_hello_and_a_message_on_the_wire() -> None:
    fake = FakeBackend()
    bare = None
    try:
        fake_config(fake.url, token_ms=20)  # tokens in separate chunks: token frames
        bare = BareRelay(fake.url, workers=2)
        assert bare.url.startswith("ws://127.0.0.1:") and len(bare.pids) == 2
        assert bare.proc is not None
        started = [bare.proc.pid, *bare.pids]
        frames = asyncio.run(_converse(bare.url, "hello bare relay"))
    finally:
        if bare is not None:
            bare.stop()
        fake.stop()
    welcome, ack, *tokens, reply = frames
    assert welcome["type"] == "welcome" and welcome["resumed"] is False
    assert welcome["session"] and welcome["protocol"] == 1
    assert ack == {"type": "ack", "id": "m1", "seq": 1}
    assert tokens and all(t["type"] == "token" and t["id"] == "m1" for t in tokens)
    want = expected_reply("hello bare relay", 8)
    assert want.startswith("".join(t["text"] for t in tokens))
    assert reply["type"] == "reply" and reply["id"] == "m1" and reply["seq"] == 2
    assert reply["text"] == want and reply["done_reason"] == "stop"
    assert reply["stats"]["tokens"] == 8
    for pid in started:  # stopped: the parent and its workers are gone
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


async def _converse_twice(url: str) -> list[dict[str, Any]]:
    """hello; message m1 until its reply; m1 again (a resend) and its answer; m2 until its
    reply: every frame, the welcome first."""
    frames: list[dict[str, Any]] = []
    async with connect(url, compression=None) as ws:

        async def send(obj: dict[str, Any]) -> None:
            await ws.send(orjson.dumps(obj), text=True)

        async def one() -> dict[str, Any]:
            frames.append(orjson.loads(await asyncio.wait_for(ws.recv(), 10)))
            return frames[-1]

        async def until_reply(mid: str) -> None:
            while True:
                f = await one()
                if f["type"] in ("reply", "error") and f.get("id") == mid:
                    return

        await send({"type": "hello"})
        await one()
        await send({"type": "message", "id": "m1", "text": "first words"})
        await until_reply("m1")
        await send({"type": "message", "id": "m1", "text": "first words"})
        await one()  # the resend's ack (and nothing else, before m2's frames: checked)
        await send({"type": "message", "id": "m2", "text": "second"})
        await until_reply("m2")
    return frames


@pytest.mark.parametrize("store", ["own", "writer"])
def test_bare_relay_with_a_store_commits_before_it_answers(store: str) -> None:
    """The bare relay + store (chatd-bench's reference for chatd's promises): the session is
    in the file before the welcome, the acks and replies carry the seqs the store gave, a
    resent id is acknowledged again with its seq and not answered twice, every event is a
    row, the model gets the conversation; with "writer" its store writer is in its status and
    is stopped with it."""
    fake = FakeBackend()
    bare = None
    try:
        fake_config(fake.url, token_ms=20)
        bare = BareRelay(fake.url, workers=2, store=store)  # type: ignore[arg-type]
        status = bare.status()
        assert status is not None
        writer = status["master"].get("store_writer")
        assert (writer is not None) == (store == "writer")
        frames = asyncio.run(_converse_twice(bare.url))
        with urllib.request.urlopen(f"{fake.url}/_fake/requests", timeout=10) as r:
            sent = [body["messages"] for body in json.loads(r.read())["requests"]]
        assert bare._tmp is not None
        path = Path(bare._tmp.name) / "sessions.db"
        with contextlib.closing(sqlite3.connect(path)) as db:
            sid = frames[0]["session"]
            owner = db.execute("SELECT owner FROM sessions WHERE id = ?", (sid,)).fetchone()
            rows = db.execute(
                "SELECT seq, kind, msg_id, text FROM events WHERE session = ? ORDER BY seq",
                (sid,),
            ).fetchall()
    finally:
        if bare is not None:
            bare.stop()
        fake.stop()
    assert owner == ("",)
    said = [(f["type"], f.get("id"), f.get("seq")) for f in frames if f["type"] != "token"]
    assert said == [
        ("welcome", None, None),
        ("ack", "m1", 1),
        ("reply", "m1", 2),
        ("ack", "m1", 1),  # the resend: acknowledged again, no second answer
        ("ack", "m2", 3),
        ("reply", "m2", 4),
    ]
    replies = [f for f in frames if f["type"] == "reply"]
    assert [r["text"] for r in replies] == [
        expected_reply("first words", 8),
        expected_reply("second", 8),
    ]
    # The model got the conversation, as from chatd: m2 after m1's turn (the resend: nothing).
    assert sent == [
        [{"role": "user", "content": "first words"}],
        [
            {"role": "user", "content": "first words"},
            {"role": "assistant", "content": replies[0]["text"]},
            {"role": "user", "content": "second"},
        ],
    ]
    assert rows == [
        (1, "user", "m1", "first words"),
        (2, "reply", "m1", replies[0]["text"]),
        (3, "user", "m2", "second"),
        (4, "reply", "m2", replies[1]["text"]),
    ]
    if writer is not None:
        pid = writer["pid"]
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert not path.parent.exists()  # its directory removed


@pytest.fixture(scope="module")
def chatd() -> Iterator[OwnChatd]:
    target = OwnChatd(workers=1)
    try:
        yield target
    finally:
        target.stop()


@pytest.mark.slow
def test_max_smoke(chatd: OwnChatd) -> None:
    params = maxrate.MaxParams(
        connections=10, start=20, step=20, max_rate=40, duration=0.5, warmup=0.2, drain=2.0
    )
    r = maxrate.run_max(chatd, params, procs=1, bare_workers=1)
    assert set(r["targets"]) == {"chatd", "bare", "direct"}
    assert r["workers"] == {"chatd": 1, "bare": 1}
    for kind, t in r["targets"].items():
        assert 1 <= len(t["steps"]) <= 2, kind
        first = t["steps"][0]
        assert first["rate"] == 20.0 and first["scheduled"] >= 5
        if first["ok"]:
            assert first["answered"] == first["scheduled"] and first["why"] is None
            assert t["sustained_rate"] in (20.0, 40.0)
            lat = t["at_sustained"]["reply_ms"]
            assert 0 < lat["p50"] <= lat["p99"]
        else:  # a busy machine may miss 50 ms even at 20 msg/s: then it says why
            assert first["why"] and t["sustained_rate"] is None
        cpu = first["worker_cpu_us_per_msg"]
        assert (cpu is None) if kind == "direct" else (cpu is None or cpu >= 0)
        master = first["master_cpu_us_per_msg"]
        assert (master is None) if kind != "chatd" else (master is None or master >= 0)
        # only chatd's replies say their stages (the slowest 1 % breakdown)
        slow = first["slowest"]
        if kind != "chatd":
            assert slow is None
        elif first["answered"]:
            assert slow is not None and slow["n"] >= 1 and slow["of"] >= slow["n"]
    ratios = r["ratios"]
    assert set(ratios) == {"chatd/bare", "chatd/direct"}
    assert all(x is None or x > 0 for x in ratios.values())
    assert set(r["ratio_intervals"]) == {"chatd/bare", "chatd/direct"}
    for iv in r["ratio_intervals"].values():
        assert iv["low"] is None or iv["high"] is None or iv["low"] <= iv["high"]
    md = report.scenario_markdown(r)
    for text in (
        "### Highest sustained rate",
        "| chatd (1 worker) |",
        "| bare relay (1 worker) |",
        "| direct to the backend |",
        "- chatd / bare relay:",
    ):
        assert text in md, text


@pytest.mark.slow
def test_idle_smoke(chatd: OwnChatd) -> None:
    r = idle.run_idle(chatd, connections=50, procs=2, bare_workers=1)
    assert r["name"] == "idle" and r["workers"] == {"chatd": 1, "bare": 1}
    for kind in ("chatd", "bare"):
        t = r["targets"][kind]
        assert t["opened"] == 50 and t["failed"] == 0, t["errors_sample"]
        assert len(t["workers"]) == 1 and t["workers"][0]["rss_after_mb"] > 1
        assert isinstance(t["kb_per_conn"], float)
    assert r["targets"]["chatd"]["workers"][0]["connections"] == 50
    c, b = r["targets"]["chatd"]["kb_per_conn"], r["targets"]["bare"]["kb_per_conn"]
    assert r["difference_kb"] == pytest.approx(c - b, abs=0.011)
    md = longrun.markdown(r)
    assert "### Memory per idle connection" in md and "| bare relay (1 worker) | 50 |" in md


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.slow
def test_closed_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    """``chatd-bench run closed --json``: its own fake and chatd, then the bare relay; both
    answer every message, the ratio is there, and nothing it started is left."""
    before = _children()
    argv = ["run", "closed", "--workers", "1", "--bare-workers", "1", "--conns", "5"]
    argv += ["--duration", "1", "--procs", "1", "--json", "--no-progress", "--bare-store"]
    assert cli.main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["name"] == "closed" and r["workers"] == {"chatd": 1, "bare": 1, "stored": 1}
    assert set(r["targets"]) == {"chatd", "bare", "stored"}
    assert r["stored_writes"] == "writer"  # as the own chatd writes (its default)
    for kind, t in r["targets"].items():
        assert t["opened"] == 5, kind
        assert t["replies_per_s"] > 0 and t["replies_in_window"] > 0, kind
        assert t["errors"]["total"] == 0, (kind, t["errors"])
        assert t["sent"] > 0 and t["answered"] == t["sent"], kind
        lat = t["reply_ms"]
        assert 0 < lat["p50"] <= lat["p99"], kind
        assert t["cpu_us_per_reply"]["workers"] > 0, kind
        assert t["cpu_us_per_reply"]["backend"] > 0, kind  # the own fake's pid is known
        assert (t["cpu_us_per_reply"]["master"] is None) == (kind != "chatd"), kind
    assert r["targets"]["chatd"]["slowest"] is not None  # chatd's replies say their stages
    assert r["targets"]["bare"]["slowest"] is None
    for key in ("ratios", "ratios_stored"):
        assert r[key]["rate"] is not None and r[key]["rate"] > 0, key
        assert r[key]["worker_cpu_per_reply"] is not None, key
    assert r["goal"]["status"] in ("meets", "MISSES")
    left = _children() - before
    assert not [pid for pid in left if psutil.pid_exists(pid)]


@pytest.mark.slow
def test_closed_against_a_running_chatd(
    chatd: OwnChatd, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--url/--control-socket/--fake-url``: the bare relay still runs, on that fake; the
    table has a row per target and the ratio."""
    assert chatd.fake_url is not None
    argv = ["run", "closed", "--url", chatd.url, "--control-socket", chatd.control_socket]
    argv += ["--fake-url", chatd.fake_url, "--bare-workers", "1", "--conns", "4"]
    argv += ["--duration", "1", "--procs", "1", "--no-progress"]
    assert cli.main(argv) == 0
    md = capsys.readouterr().out
    for text in (
        "### Closed-loop rate",
        "| chatd (1 worker) |",
        "| bare relay (1 worker) |",
        "| 0 / 0 |",
        "- chatd / bare relay: closed-loop rate **",
    ):
        assert text in md, text
    assert "errors:" not in md
