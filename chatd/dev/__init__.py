"""Stand-ins a developer runs: shipped with chatd, but not part of the daemon.

:mod:`~chatd.dev.fake_ollama` (``chatd-fake-ollama``: Ollama's exact wire format, with fault
knobs) and :mod:`~chatd.dev.local_model` (``chatd-local-model``: a real small model in
llama.cpp's server). A stand-in shares no code with what it stands in for, so a shared bug
cannot hide itself: ``dev`` never imports ``master``, ``worker``, ``relay`` or ``store``, and
nothing of the daemon imports ``dev`` (only ``bench`` and the tests do).
"""
