"""The master's resolver of dns tables (chatd.master.discovery): what an answer does to a
table's set, one question per name per interval to one worker in turn, and what a missing
answer counts as. The workers and Services are stand-ins; time is passed in."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from chatd.config import BackendConfig, Config, LLMConfig
from chatd.master import discovery as discovery_module
from chatd.master.discovery import ANSWER_TIMEOUT, Discovery, Name
from chatd.master.workers import Workers
from chatd.proto import control as proto

URL = "http://ollama-headless:11434"


def name() -> Name:
    return Name(URL, "ollama-headless", 5.0)


def test_addresses_are_the_set_and_a_change_is_said() -> None:
    n = name()
    assert n.answer(True, ["10.0.0.6", "10.0.0.5", "10.0.0.6"], "", 0.0)
    assert n.addresses == ("10.0.0.5", "10.0.0.6") and n.due == 5.0
    assert not n.answer(True, ["10.0.0.5", "10.0.0.6"], "", 5.0)  # the same: no change
    assert n.answer(True, ["10.0.0.6"], "", 10.0)  # one gone: at once
    assert n.addresses == ("10.0.0.6",)


def test_no_address_empties_a_set_only_when_said_twice_in_a_row() -> None:
    n = name()
    n.answer(True, ["10.0.0.5"], "", 0.0)
    assert not n.answer(True, [], "NXDOMAIN", 5.0) and n.addresses == ("10.0.0.5",)
    assert not n.answer(True, ["10.0.0.5"], "", 10.0)  # a glitch: the count starts again
    assert not n.answer(True, [], "NXDOMAIN", 15.0)
    assert n.answer(True, [], "NXDOMAIN", 20.0) and n.addresses == ()


def test_a_table_that_never_had_an_address_is_empty_at_once() -> None:
    n = name()
    assert n.addresses is None
    assert n.answer(True, [], "NXDOMAIN", 0.0) and n.addresses == ()
    assert not n.answer(True, [], "NXDOMAIN", 5.0)


def test_a_failure_keeps_the_set_with_one_warning_per_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = name()
    n.answer(True, ["10.0.0.5"], "", 0.0)
    with caplog.at_level(logging.INFO, "chatd.master"):
        for t in (5.0, 10.0, 15.0):
            assert not n.answer(False, [], "SERVFAIL", t)
        assert n.addresses == ("10.0.0.5",) and n.failure == "SERVFAIL" and n.due == 20.0
        assert not n.answer(True, ["10.0.0.5"], "", 20.0)
        assert n.failure == ""
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "cannot resolve ollama-headless (http://ollama-headless:11434): SERVFAIL; keeping its "
        "1 addresses of the last answer, retrying every 5s",
        "ollama-headless (http://ollama-headless:11434) resolves again",
    ]


# -- the glue, with stand-ins --------------------------------------------------------------------


@dataclass(eq=False)
class FakeWorker:
    slot: int
    pid: int
    state: str = "ready"
    detached: bool = False
    link: object = True
    inbox: list[dict[str, Any]] = field(default_factory=list)


class FakeWorkers:
    def __init__(self, *workers: FakeWorker) -> None:
        self.by_pid = {w.pid: w for w in workers}
        self.handlers: dict[str, Callable[[Any, dict[str, Any]], None]] = {}
        self.on_exit: list[Callable[[Any], None]] = []

    helper = Workers.helper  # the real choice: it reads by_pid only

    def tell(self, worker: FakeWorker, msg: dict[str, Any]) -> bool:
        worker.inbox.append(msg)
        return True


class FakeServices:
    def __init__(self) -> None:
        self.clocks: list[Any] = []
        self.discovery: Callable[[], list[dict[str, Any]]] = list
        self.sets: list[dict[str, tuple[str, ...]]] = []

    def set_addresses(self, sets: dict[str, tuple[str, ...]]) -> None:
        self.sets.append(dict(sets))


def config(*tables: BackendConfig, nameservers: tuple[str, ...] = ()) -> Config:
    return Config(llm=LLMConfig(backends=tables, nameservers=nameservers))


DNS = BackendConfig(url=URL, discover="dns", discover_interval=1.0)


def setup(*workers: FakeWorker) -> tuple[Discovery, FakeWorkers, FakeServices]:
    fw, fs = FakeWorkers(*workers), FakeServices()
    d = Discovery(config(DNS, BackendConfig(), nameservers=("127.0.0.1:5353",)), fw, fs)  # type: ignore[arg-type]
    assert fs.clocks == [d] and fs.discovery() == d.status()
    return d, fw, fs


def answer(d: Discovery, fw: FakeWorkers, w: FakeWorker, **fields: Any) -> None:
    msg = w.inbox.pop()
    fw.handlers[proto.RESOLVED](w, {proto.T: proto.RESOLVED, "rid": msg["rid"], **fields})


def test_one_question_per_interval_to_the_ready_workers_in_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = FakeWorker(1, 101), FakeWorker(2, 102, state="starting")
    d, fw, fs = setup(a, b)
    clock = [100.0]
    monkeypatch.setattr(discovery_module.time, "monotonic", lambda: clock[0])
    assert d.timeout(100.0, 0.5) == 0.0  # due at once
    d.tick(100.0)
    (asked,) = a.inbox  # the ready one, not the starting one
    assert asked == {
        proto.T: proto.RESOLVE,
        "rid": asked["rid"],
        "host": "ollama-headless",
        "nameservers": ["127.0.0.1:5353"],
    }
    d.tick(100.1)
    assert len(a.inbox) == 1  # asked already: not twice
    answer(d, fw, a, ok=True, addresses=["10.0.0.5"])
    assert fs.sets == [{URL: ("10.0.0.5",)}]
    assert d.timeout(100.0, 5.0) == pytest.approx(1.0)  # the next one is due an interval on
    b.state = "ready"
    clock[0] = 101.0
    d.tick(101.0)
    assert len(a.inbox) + len(b.inbox) == 1  # one of them, in turn
    status = d.status()
    assert status == [
        {
            "url": URL,
            "host": "ollama-headless",
            "addresses": ["10.0.0.5"],
            "resolved_s_ago": 1.0,
            "error": "",
        }
    ]


def test_no_answer_in_time_or_an_exited_worker_is_a_failure_and_the_set_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = FakeWorker(1, 101)
    d, fw, fs = setup(a)
    clock = [0.0]
    monkeypatch.setattr(discovery_module.time, "monotonic", lambda: clock[0])
    d.tick(0.0)
    answer(d, fw, a, ok=True, addresses=["10.0.0.5"])
    clock[0] = 20.0
    d.tick(10.0)
    assert a.inbox and d.timeout(10.0, 60.0) == pytest.approx(ANSWER_TIMEOUT)
    d.tick(10.0 + ANSWER_TIMEOUT)  # late: a failure; asked again an interval on
    assert d.names[URL].failure.startswith("no answer from the worker")
    assert d.names[URL].addresses == ("10.0.0.5",) and len(fs.sets) == 1
    late = a.inbox.pop()
    fw.handlers[proto.RESOLVED](a, {proto.T: proto.RESOLVED, "rid": late["rid"], "ok": True})
    assert len(fs.sets) == 1  # a late answer is dropped
    d.tick(20.0)
    assert a.inbox
    for hook in fw.on_exit:
        hook(a)  # the worker asked exits: a failure now, and asked again at once
    assert d.names[URL].asked is None and d.names[URL].due <= 20.0 + 1.0


def test_a_reload_keeps_a_kept_tables_addresses_and_forgets_a_dropped_one() -> None:
    a = FakeWorker(1, 101)
    d, fw, fs = setup(a)
    d.tick(0.0)
    answer(d, fw, a, ok=True, addresses=["10.0.0.5"])
    other = BackendConfig(url="http://other:1", discover="dns")
    d.configure(config(DNS, other))
    assert d.sets() == {URL: ("10.0.0.5",)} and d.names[other.url].addresses is None
    assert d.nameservers == ()
    d.configure(config(other))
    assert fs.sets[-1] == {}  # the dropped table's addresses are no backends any more


def test_no_worker_to_ask_waits_instead_of_spinning() -> None:
    """All workers gone (crash-looping): the name is tried again later, and the loop may
    sleep meanwhile."""
    d, _fw, fs = setup()
    d.tick(0.0)
    assert d.names[URL].asked is None
    assert d.timeout(0.0, 5.0) == pytest.approx(discovery_module.NO_WORKER_RETRY)
    assert fs.sets == []


def test_the_helper_is_a_ready_worker_then_a_starting_one_then_a_draining_one() -> None:
    """The worker that does the master's I/O (names here, the fleet's slots too): ready ones
    in turn; one starting when none is ready; during a stop, when every worker drains, a
    draining one (its replies in progress still need the master's answers); never one
    without a link."""
    ready = [FakeWorker(1, 10), FakeWorker(2, 20)]
    starting = FakeWorker(3, 30, state="starting")
    draining = FakeWorker(4, 40, state="draining", detached=True)
    gone = FakeWorker(5, 50, link=None)
    fw = FakeWorkers(*ready, starting, draining, gone)
    assert [fw.helper(turn).pid for turn in range(4)] == [10, 20, 10, 20]  # type: ignore[union-attr]
    fw = FakeWorkers(starting, draining, gone)
    assert fw.helper(7) is starting
    fw = FakeWorkers(draining, gone)
    assert fw.helper(7) is draining
    assert FakeWorkers(gone).helper(0) is None
