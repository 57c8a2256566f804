"""The per-client figures of the slot queue: chatctl status --json (queue.keys), the status
line of the busiest clients, and the bounded /metrics series (top 10 + "other")."""

from __future__ import annotations

from chatd.config import BackendConfig, Config, LLMConfig
from chatd.ctl.statusfmt import format_status
from chatd.master.slotgrant import Granter
from chatd.master.status import aggregate_status
from chatd.metrics import Retired, aggregate, render
from tests.promtext import parse
from tests.unit.ctl.test_statusfmt import doc

A = "http://a:1"
HASH = "0123456789abcdef0123456789abcdef"  # what a token's key looks like (session.owner_of)


def busy_granter(keys: int) -> Granter:
    """One slot held; key ``k00`` (a token's hash for k00) waits with 12 requests, ``kNN``
    with one each, and ``key_busy`` refused once."""
    g = Granter([(A, 1)], max_queue=100, max_queued_per_key=12)
    g.acquire(1, 0, [A], 0.0, "ip")
    rid = 0
    for n in range(keys):
        for _ in range(12 if n == 0 else 1):
            rid += 1
            g.acquire(1, rid, [A], 0.0, HASH if n == 0 else f"10.0.0.{n}")
    g.acquire(1, rid + 1, [A], 0.0, HASH)  # its 13th: key_busy
    return g


def test_status_lists_the_busiest_keys_only_when_there_are_some() -> None:
    cfg = Config(llm=LLMConfig(backends=(BackendConfig(url=A),)))
    st = aggregate_status(
        master={}, workers=[], cfg=cfg, restarts_total=0, slots=busy_granter(3).statistics()
    )
    assert st["queue"]["keys"] == [
        {"key": HASH, "queued": 12, "in_flight": 0},
        {"key": "10.0.0.1", "queued": 1, "in_flight": 0},
        {"key": "10.0.0.2", "queued": 1, "in_flight": 0},
    ]
    # The first grant leased (nobody waited then): it counts against no key.
    idle = Granter([(A, 1)], max_queue=4)
    st = aggregate_status(master={}, workers=[], cfg=cfg, restarts_total=0, slots=idle.statistics())
    assert "keys" not in st["queue"]


def test_status_line_of_the_busiest_clients() -> None:
    keys = [
        {"key": HASH, "queued": 12, "in_flight": 1},
        {"key": "10.0.0.7", "queued": 1, "in_flight": 0},
        {"key": "", "queued": 0, "in_flight": 1},
    ]
    text = format_status(doc(queue={"depth": 13, "max": 512, "keys": keys}))
    lines = text.splitlines()
    i = lines.index("queue 13/512 waiting for an LLM slot")
    assert lines[i + 1] == (
        "busiest clients (queued/in flight): 0123456789ab 12/1, 10.0.0.7 1/0, (none) 0/1"
    )
    # Nobody waiting (only slots in flight), or no keys at all: no line; junk is ignored.
    for queue in (
        {"depth": 0, "max": 512, "keys": [{"key": "x", "queued": 0, "in_flight": 2}]},
        {"depth": 0, "max": 512},
        {"depth": 0, "max": 512, "keys": "junk"},
    ):
        assert "busiest clients" not in format_status(doc(queue=queue))


def test_metrics_key_series_are_bounded_and_refusals_counted() -> None:
    data = aggregate([], Retired(), busy_granter(15).statistics(), restarts_total=0)
    fams = parse(render(data))
    queued = fams["chatd_key_queued"]
    assert queued.type == "gauge"
    assert len(queued.samples) == 11  # the 10 busiest, and "other"
    assert queued.value(key=HASH) == 12
    assert queued.value(key="other") == 5  # 14 light keys with one each, 9 listed
    assert fams["chatd_key_in_flight"].value(key="other") == 0
    assert len(fams["chatd_key_in_flight"].samples) == 11
    refusals = fams["chatd_slot_refusals_total"]
    assert refusals.value(reason="key_busy") == 1 and refusals.value(reason="busy") == 0
    # Nothing waiting: only "other", at 0; a malformed document still renders.
    empty = parse(render(aggregate([], Retired(), Granter([], 0).statistics(), 0)))
    assert empty["chatd_key_queued"].samples == [("chatd_key_queued", {"key": "other"}, 0)]
    junk = parse(render({"keys": [{"key": "", "queued": "x"}, 3], "keys_other": []}))
    assert junk["chatd_key_queued"].value(key="none") == 0
