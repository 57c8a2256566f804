"""``chatd-bench``: the load generator and the seed report, measured (``docs/benchmarks.md``).

Modules: :mod:`~chatd.bench.stats` (pure statistics), :mod:`~chatd.bench.load` (open-loop
load over client processes), :mod:`~chatd.bench.direct` (the same load straight to the
backend), :mod:`~chatd.bench.server` (the chatd measured), :mod:`~chatd.bench.scenarios`,
:mod:`~chatd.bench.report` (Markdown + JSON), :mod:`~chatd.bench.plots` (optional PNGs) and
:mod:`~chatd.bench.cli`.
"""
