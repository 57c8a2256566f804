"""``chatd-fake-ollama``: a faithful Ollama stand-in for tests, benchmarks and demos.

:mod:`~chatd.dev.fake_ollama.main` is the command line, :mod:`~chatd.dev.fake_ollama.server` the
aiohttp server, :mod:`~chatd.dev.fake_ollama.stream` its streamed answers and faults,
:mod:`~chatd.dev.fake_ollama.frames` Ollama's response bodies,
:mod:`~chatd.dev.fake_ollama.catalog` its models (what each is and can do, and /api/show) and
:mod:`~chatd.dev.fake_ollama.wire` the reply text, embeddings, knobs and wire details. These
modules import only one another: never the relay's parsing or framing.
"""
