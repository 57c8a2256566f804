"""The LLM edge: one streamed generation on an Ollama or OpenAI-compatible backend.

:mod:`~chatd.relay.generate` (the :class:`~chatd.relay.generate.Relay`), a backend's state
(:mod:`~chatd.relay.backend`), the keep-alive HTTP/1.1 :mod:`~chatd.relay.pool` and its
connections (:mod:`~chatd.relay.conn`), the wire formats (:mod:`~chatd.relay.wire`: NDJSON,
SSE), the failures as the client sees them (:mod:`~chatd.relay.failures`) and the deadlines
(:mod:`~chatd.relay.deadlines`). May import only the shared top-level modules (config,
errors); never ``store`` (and ``store`` never imports it), nor ``master``. Used by the worker.
"""
