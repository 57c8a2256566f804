"""Where a message's time goes (chatd.worker.stages) and how /metrics shows it
(chatd.metrics_stages), judged by tests.promtext's own parser."""

from __future__ import annotations

import asyncio
import gc
import time

from chatd.master.slotgrant import Granter
from chatd.metrics import Retired, aggregate, render
from chatd.worker.stages import STAGES, StageClock, Stages
from tests.promtext import parse


def test_a_replied_message_gets_its_four_stages() -> None:
    stages = Stages()
    clock = StageClock(received=10.0)
    clock.committed, clock.granted = 10.002, 10.502
    got = stages.reply_stages(clock, ttft_ms=30.0, total_ms=130.0)
    assert got == {"commit_ms": 2.0, "queue_ms": 500.0, "first_token_ms": 30.0, "stream_ms": 100.0}
    assert [stages.histograms[s].count for s in STAGES] == [1, 1, 1, 1, 0, 0]
    stages.observe("publish", -1.0)  # a clock that went back counts as 0, not negative
    assert stages.histograms["publish"].total_ms == 0.0


def test_the_loop_lag_and_gc_pauses_are_measured() -> None:
    stages = Stages()

    async def main() -> None:
        watcher = asyncio.create_task(stages.watch_loop())
        await asyncio.sleep(0.15)
        time.sleep(0.15)  # noqa: ASYNC251 - on purpose: blocked past a tick, that tick is late
        await asyncio.sleep(0.15)
        watcher.cancel()

    asyncio.run(main())
    assert stages.loop_lag.count >= 1
    assert stages.loop_lag.percentile(100) >= 30.0  # late by about 100 ms
    stages.watch_gc()
    try:
        gc.collect()
    finally:
        stages.unwatch_gc()
    assert stages.gc_pause.count >= 1


def test_stages_in_metrics_summed_and_kept() -> None:
    a, b = Stages(), Stages()
    clock = StageClock(0.0)
    a.reply_stages(clock, 1.0, 3.0)
    b.reply_stages(clock, 2.0, 4.0)
    b.loop_lag.observe(0.3)
    retired = Retired()
    retired.fold({"stages": b.report()})
    data = aggregate(
        [("ready", {"stages": a.report()}), ("ready", {"stages": "junk"})],
        retired,
        Granter([("http://a:1", 1)], max_queue=1).statistics(),
        0,
    )
    fams = parse(render(data))
    counts = {
        lab["stage"]: v for n, lab, v in fams["chatd_stage_seconds"].samples if n.endswith("_count")
    }
    want = {"commit": 2, "queue": 2, "first_token": 2, "stream": 2, "store_reply": 0}
    assert counts == {**want, "publish": 0}
    lag = fams["chatd_event_loop_lag_seconds"].samples
    assert [v for n, _, v in lag if n.endswith("_count")] == [1]
    le = {lab["le"]: v for n, lab, v in lag if n.endswith("_bucket")}
    assert le["0.00025"] == 0 and le["0.0005"] == 1  # 0.3 ms: the fine bounds exist
    assert "chatd_gc_pause_seconds" in fams
