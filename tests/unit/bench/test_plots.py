"""chatd-bench's PNG plots (matplotlib, the ``bench`` extra that ``make test`` installs):
written for a small result, valid PNG images of the expected size, not blank."""

from __future__ import annotations

import struct
from pathlib import Path

from chatd.bench import plots, realreport, scenarios
from chatd.bench.load import Record
from chatd.bench.realmodel import Msg, RealParams

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (700, 350), path  # 7 × 3.5 inches at 100 dpi
    assert len(data) > 5000, path  # axes, labels and data, not an empty canvas
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (350, 700)
    assert pixels.std() > 0.01  # not one flat colour


def test_a_load_scenario_gets_three_plots(tmp_path: Path) -> None:
    # 1 msg every 0.1 s for 3 s, answered after 5-40 ms; one lost.
    records: list[Record] = [
        (t / 10, t / 10, t / 10 + 0.001, t / 10 + 0.002, t / 10 + 0.005 + 0.001 * t, None)
        for t in range(30)
    ]
    records.append((2.95, 2.95, None, None, None, None))
    result = {"name": "low", "chatd": scenarios.summarize(records, 0.0, 3.0)}
    paths = plots.write([result], tmp_path)
    assert [p.name for p in paths] == ["low_latency.png", "low_histogram.png", "low_throughput.png"]
    for p in paths:
        _check_png(p)


def test_the_real_scenario_gets_its_queue_plot(tmp_path: Path) -> None:
    stats = {"ttft_ms": 50.0, "tokens": 11}
    msgs = [
        Msg(
            k * 0.2, "x", k * 0.2, k * 0.2 + 0.005, None, 0, k * 0.2 + 0.5, k * 0.2 + 1, None, stats
        )
        for k in range(10)
    ]
    series = [[k * 0.25, min(k, 8), 2, 2] for k in range(12)]
    load = {"messages": msgs, "series": series, "cpu_s": {}, "elapsed_s": 3.0}
    r = realreport.figures(RealParams(duration=3.0), 5.0, {}, load, None)
    paths = plots.write([r], tmp_path)
    assert [p.name for p in paths][-1] == "real_queue.png" and len(paths) == 4
    for p in paths:
        _check_png(p)
