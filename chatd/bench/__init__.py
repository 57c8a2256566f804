"""``chatd-bench``: the load generator and the seed report, measured (``docs/benchmarks.md``).

Modules: :mod:`~chatd.bench.stats` (pure statistics), :mod:`~chatd.bench.load` (open-loop
load in one client process), :mod:`~chatd.bench.fleet` (the client processes of a run),
:mod:`~chatd.bench.direct` (the same load straight to the backend),
:mod:`~chatd.bench.server` (the chatd measured), :mod:`~chatd.bench.scenarios`,
:mod:`~chatd.bench.report` (Markdown + JSON), :mod:`~chatd.bench.plots` (optional PNGs),
:mod:`~chatd.bench.bare` (the bare reference relay) with the scenarios measured against it,
:mod:`~chatd.bench.maxrate` (``max``) and :mod:`~chatd.bench.idle` (``idle``),
:mod:`~chatd.bench.realmodel` (``real``: the real model, with :mod:`~chatd.bench.realdirect`
and :mod:`~chatd.bench.realreport`), :mod:`~chatd.bench.pyspy` (``--profile``) and
:mod:`~chatd.bench.cli`.
"""
