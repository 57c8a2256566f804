"""A worker process: everything that runs only after the fork, on the worker's uvloop loop.

The worker's main (:mod:`~chatd.worker.main`), one connection's session, the replies
(generation, history cache, live handoff), the outbox, the link to the master, the HTTP
endpoints and the worker side of the LLM slots. May import ``proto``, ``relay``, ``store`` and
the shared top-level modules; never imports ``master`` (the two talk only over the link's
msgpack frames). Only ``chatd.cli`` imports it (to hand its main function to the master).
"""
