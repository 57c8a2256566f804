"""The Ollama- and OpenAI-compatible HTTP APIs of a worker (``/api/*``, ``/v1/*``, ``GET /``).

The front (:mod:`chatd.worker.front`) hands every plain HTTP request to the worker's
endpoints, which pass those of these APIs to :class:`chatd.worker.api.router.ApiRouter`:
it authenticates, names the client's key, counts and logs the request, and calls the
handler of :mod:`~chatd.worker.api.ollama` or :mod:`~chatd.worker.api.openai`. A
generation goes through :mod:`~chatd.worker.api.relaying` (the master's slots, round robin
across keys, failover before the first chunk); the model list, ``/api/ps``, ``/api/show``
and the version through :mod:`~chatd.worker.api.catalog`. The wire shapes are the pure cores
of :mod:`chatd.proto` (httpapi, ollama, openai, translate).
"""
