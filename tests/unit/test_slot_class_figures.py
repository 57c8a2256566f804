"""The embed slot class in the configuration and the figures: ``max_parallel_embed``,
``chatctl status`` (``--json``: ``backends[].embed``, ``embed_queue``; the table) and
``/metrics`` (``chatd_embed_*``), with every pre-existing key and series unchanged."""

from __future__ import annotations

from typing import Any

import pytest

from chatd import config
from chatd.config import BackendConfig, Config, LLMConfig
from chatd.ctl.statusfmt import format_status
from chatd.errors import ConfigError
from chatd.master.slotgrant import Granter
from chatd.master.status import WorkerSnapshot, aggregate_status
from chatd.metrics import Retired, aggregate, render
from chatd.proto import control as proto
from tests.promtext import parse
from tests.unit.ctl.test_statusfmt import doc

A, B = "http://a:1", "http://b:2"
CFG = Config(
    llm=LLMConfig(
        backends=(
            BackendConfig(url=A, max_parallel=4, max_parallel_embed=3),
            BackendConfig(url=B, max_parallel=2),
        ),
        max_queue=7,
    )
)


# -- the configuration ------------------------------------------------------------------------


def test_max_parallel_embed_defaults_to_2_and_is_at_least_1() -> None:
    assert BackendConfig().max_parallel_embed == 2
    cfg = config.parse('[[llm.backends]]\nurl = "http://h:1"\nmax_parallel_embed = 6\n')
    (b,) = cfg.llm.backends
    assert (b.max_parallel, b.max_parallel_embed) == (4, 6)
    assert (b.capacity(proto.SLOT_CLASS_CHAT), b.capacity(proto.SLOT_CLASS_EMBED)) == (4, 6)
    for bad in ("0", "-1", '"2"'):
        with pytest.raises(ConfigError) as err:
            config.parse(f"[[llm.backends]]\nmax_parallel_embed = {bad}\n", "/x/chatd.toml")
        (problem,) = err.value.problems
        assert problem.startswith("/x/chatd.toml:2: llm.backends[0].max_parallel_embed: ")


# -- chatctl status -----------------------------------------------------------------------------


def granters() -> tuple[Granter, Granter]:
    """The master's two granters from CFG: chat idle but for one slot, embed busy."""
    chat = Granter([(A, 4), (B, 2)], max_queue=7)
    chat.acquire(101, 1, [A], 0.0)
    embed = Granter([(A, 3), (B, 2)], max_queue=7)
    for rid in range(1, 6):
        embed.acquire(101, rid, [A], 0.0, "rag")  # 3 granted, 2 waiting
    embed.report_health(A, True)
    return chat, embed


def snap(**stats: Any) -> WorkerSnapshot:
    return WorkerSnapshot(
        id=1,
        pid=101,
        generation=1,
        state="ready",
        uptime_s=1.0,
        restarts=0,
        rss_bytes=0,
        cpu_percent=0.0,
        last_heartbeat_s=0.1,
        stats={"t": "stats", **stats},
    )


def test_status_shows_the_embed_class_apart_and_the_chat_figures_unchanged() -> None:
    chat, embed = granters()
    worker = snap(
        backends=[{"url": A, "in_flight": 1, "held": 1}],
        embed_backends=[{"url": A, "in_flight": 2, "held": 3}],  # one kept leased, idle
    )
    before = aggregate_status(
        master={}, workers=[worker], cfg=CFG, restarts_total=0, slots=chat.statistics()
    )
    st = aggregate_status(
        master={},
        workers=[worker],
        cfg=CFG,
        restarts_total=0,
        slots=chat.statistics(),
        embed_slots=embed.statistics(),
    )
    # Every key of the document without classes is there, with the same value.
    assert {k: v for k, v in st.items() if k != "embed_queue"} == {
        **before,
        "backends": [
            {**b, "embed": st["backends"][i]["embed"]} for i, b in enumerate(before["backends"])
        ],
    }
    a, b = st["backends"]
    assert (a["in_flight"], a["in_use"], a["max_parallel"]) == (1, 1, 4)  # chat, as before
    assert a["embed"] == {"in_flight": 3, "in_use": 2, "leased_idle": 1, "max_parallel": 3}
    assert b["embed"] == {"in_flight": 0, "in_use": 0, "leased_idle": 0, "max_parallel": 2}
    assert st["queue"] == {"depth": 0, "max": 7}
    assert st["embed_queue"] == {
        "depth": 2,
        "max": 7,
        "keys": [{"key": "rag", "queued": 2, "in_flight": 0}],  # its 3 slots were leased
    }
    assert "embed_queue" not in before and "embed" not in before["backends"][0]


def test_status_table_has_an_embed_part_per_backend_and_an_embed_queue_line() -> None:
    backend = {
        "url": "http://o:11434",
        "api": "ollama",
        "healthy": True,
        "in_flight": 1,
        "in_use": 1,
        "leased_idle": 0,
        "max_parallel": 4,
        "embed": {"in_flight": 2, "in_use": 1, "leased_idle": 1, "max_parallel": 2},
    }
    keys = [{"key": "10.0.0.9", "queued": 40, "in_flight": 2}]
    text = format_status(
        doc(backends=[backend], embed_queue={"depth": 40, "max": 512, "keys": keys})
    )
    lines = text.splitlines()
    assert (
        "backend http://o:11434 (ollama): healthy, 1/4 in use, 0 leased (idle); "
        "embed 1/2 in use, 1 leased (idle)"
    ) in lines
    i = lines.index("queue 0/512 waiting for an LLM slot")
    assert lines[i + 1] == "embed queue 40/512 waiting for an embed slot"
    assert lines[i + 2] == "busiest embedding clients (queued/in flight): 10.0.0.9 40/2"
    # A document without the class (an older master): the lines of before, no embed line.
    old = format_status(doc())
    assert "embed" not in old


# -- /metrics -----------------------------------------------------------------------------------


def test_metrics_have_chatd_embed_series_and_the_chat_ones_unchanged() -> None:
    chat, embed = granters()
    live = [
        (
            "ready",
            {
                "backends": [{"url": A, "in_flight": 1, "held": 1}],
                "embed_backends": [{"url": A, "in_flight": 2, "held": 3}],
            },
        )
    ]
    without = render(aggregate(live, Retired(), chat.statistics(), restarts_total=0))
    data = aggregate(live, Retired(), chat.statistics(), restarts_total=0, embed=embed.statistics())
    fams = parse(render(data))
    # Every series of before classes is there, with the same help, type and samples.
    old = {n: f for n, f in parse(without).items() if not n.startswith("chatd_embed_")}
    for name, fam in old.items():
        assert fams[name] == fam, name
    new = set(fams) - set(old)
    assert new == {
        "chatd_embed_queue_depth",
        "chatd_embed_queue_max",
        "chatd_embed_key_queued",
        "chatd_embed_key_in_flight",
        "chatd_embed_backend_in_flight",
        "chatd_embed_backend_in_use",
        "chatd_embed_backend_max_parallel",
        "chatd_embed_slot_grants_total",
        "chatd_embed_slot_refusals_total",
    }
    assert fams["chatd_embed_queue_depth"].value() == 2
    assert fams["chatd_embed_queue_max"].value() == 7
    assert fams["chatd_embed_backend_in_flight"].value(backend=A) == 3
    assert fams["chatd_embed_backend_in_use"].value(backend=A) == 2  # the workers' reports
    assert fams["chatd_embed_backend_max_parallel"].value(backend=A) == 3
    assert fams["chatd_embed_backend_max_parallel"].value(backend=B) == 2
    assert fams["chatd_embed_slot_grants_total"].value() == 3
    assert fams["chatd_embed_slot_grants_total"].type == "counter"
    assert fams["chatd_embed_slot_refusals_total"].value(reason="busy") == 0
    assert fams["chatd_embed_key_queued"].value(key="rag") == 2
    assert fams["chatd_embed_key_queued"].value(key="other") == 0
    # The chat series stay the chat class's.
    assert fams["chatd_queue_depth"].value() == 0
    assert fams["chatd_backend_in_flight"].value(backend=A) == 1
    assert fams["chatd_slot_grants_total"].value() == 1


def test_metrics_render_the_embed_series_as_zero_without_figures() -> None:
    """A page from figures without the class (missing figures count 0) still parses."""
    fams = parse(render({}))
    assert fams["chatd_embed_queue_depth"].value() == 0
    assert fams["chatd_embed_slot_refusals_total"].value(reason="unavailable") == 0
    assert fams["chatd_embed_backend_in_use"].samples == []
