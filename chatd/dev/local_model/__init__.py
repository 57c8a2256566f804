"""``chatd-local-model``: a real small model (SmolLM2 in llama.cpp's server) on loopback.

:mod:`~chatd.dev.local_model.main` is the command line, :mod:`~chatd.dev.local_model.server`
runs the server in the foreground and :mod:`~chatd.dev.local_model.launch` starts it as a child
process and waits for it (``make run``, the real-model tests and ``chatd-bench run real``).
Imports nothing of the daemon.
"""
