"""What the backends offer: their models (``/api/tags``, ``/v1/models``), the loaded ones
(``/api/ps``), a model's details (``/api/show``) and the version. None of these takes a slot.

* The model list is the union over the healthy backends (an Ollama backend's ``/api/tags``
  entries as they are; an OpenAI one's ``/v1/models`` ids as entries of the same shape),
  deduplicated by ``model``, fresh for ``[api] models_cache`` seconds; after that it is still
  answered at once while one refresh runs in the background. A backend that fails is left
  out (and gives no evidence of lacking a model); when every backend fails, the last list is
  served if there is one.
* ``/api/ps``: the union of the Ollama backends' loaded models (not cached: it changes).
* ``/api/show``: asked of each healthy backend in turn, the first that has the model answers
  (an OpenAI backend listing it answers a minimal description), kept ``ttl`` seconds; when all
  say they lack it, 404 ``model 'X' not found`` (the ``ollama`` CLI then offers to pull);
  when one could not be asked, 502.
* The version: the lowest of the Ollama backends' (Open WebUI shows the lowest across its
  connections); with none, chatd's own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from chatd import __version__
from chatd.errors import UpstreamError
from chatd.proto.httpapi import ApiError
from chatd.relay.passthrough import Passthrough

log = logging.getLogger("chatd.api")

_LIST_MAX = 8 * 1024 * 1024  # a model list or a description: far below this
_SHOWN_MAX = 256  # /api/show answers kept (a few KB each)
_EMPTY_DETAILS = {
    "parent_model": "",
    "format": "",
    "family": "",
    "families": None,
    "parameter_size": "",
    "quantization_level": "",
}


def _semver(text: str) -> tuple[int, ...]:
    core = text.lstrip("v").split("-")[0].split("+")[0]
    try:
        return tuple(int(p) for p in core.split("."))
    except ValueError:
        return (0,)


def _minimal_show() -> dict[str, Any]:
    """What ``/api/show`` says of a model an OpenAI-compatible backend lists (it says no more)."""
    return {
        "modelfile": "",
        "parameters": "",
        "template": "{{ .Prompt }}",
        "details": dict(_EMPTY_DETAILS),
        "model_info": {},
        "capabilities": ["completion"],
        "modified_at": _rfc3339(time.time()),
    }


def _rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Catalog:
    """The backends' models as the APIs show them (see the module)."""

    def __init__(
        self,
        passthrough: Passthrough,
        apis: Sequence[str],
        healthy: Callable[[], Sequence[bool]],
        ttl: float,
        timeout: float,
    ) -> None:
        self._pt = passthrough
        self._apis = apis  # a view: it grows as addresses are discovered
        self._healthy = healthy
        self._ttl = ttl
        self._timeout = timeout
        self._models: list[dict[str, Any]] | None = None
        self._by_backend: dict[int, set[str]] = {}
        self._version = ""
        self._until = 0.0
        self._refresh: asyncio.Task[None] | None = None
        self._shown: dict[bytes, tuple[float, bytes]] = {}  # /api/show answers, kept ttl

    def backends(self) -> list[int]:
        """The healthy backends' indexes (all of them when none is healthy: let them say),
        retired ones (an address no longer discovered) aside."""
        healthy = self._healthy()
        live = self._pt.relay.live
        up = [i for i in live if healthy[i]]
        return up or live

    def lacks(self, backend: int, model: str) -> bool:
        """Whether a model list of less than ``ttl`` ago showed ``backend`` without ``model``
        (False when it is not known: a backend is only skipped on fresh evidence). Older
        evidence is refreshed in the background, and not used meanwhile."""
        if time.monotonic() >= self._until:
            self._kick()
            return False
        names = self._by_backend.get(backend, set())
        return bool(names) and model not in names and f"{model}:latest" not in names

    async def models(self) -> list[dict[str, Any]]:
        """The union of the model lists (Ollama's ``/api/tags`` entries): a list older than
        ``ttl`` is answered at once while it is refreshed in the background; only the first
        request waits for one."""
        if time.monotonic() >= self._until:
            task = self._kick()
            if self._models is None:
                await asyncio.shield(task)
        if self._models is None:
            raise ApiError("unavailable", "no model backend answered with its list of models")
        return self._models

    def _kick(self) -> asyncio.Task[None]:
        """The refresh under way, or a new one (one at a time, whoever waits or leaves)."""
        if self._refresh is None:
            self._refresh = task = asyncio.create_task(self._fetch())
            task.add_done_callback(self._refreshed)
        return self._refresh

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refresh = None
        if not task.cancelled() and task.exception() is not None:
            log.error("refreshing the model list failed", exc_info=task.exception())

    async def version(self) -> str:
        await self.models()
        return self._version or __version__

    async def _fetch(self) -> None:
        backends = self.backends()
        ollamas = [i for i in backends if self._apis[i] == "ollama"]
        answers = await asyncio.gather(
            *(self._list(i) for i in backends), *(self._get_version(i) for i in ollamas)
        )
        lists = answers[: len(backends)]
        versions = [v for v in answers[len(backends) :] if isinstance(v, str)]
        merged: dict[str, dict[str, Any]] = {}
        answered = False
        self._by_backend = {}  # no evidence from a backend that did not answer
        for i, entries in zip(backends, lists, strict=True):
            if not isinstance(entries, list):
                continue
            answered = True
            self._by_backend[i] = {e["model"] for e in entries}
            for e in entries:
                merged.setdefault(e["model"], e)
        known = [v for v in versions if v]
        if known:
            self._version = min(known, key=_semver)
        if answered or self._models is None:
            self._models = list(merged.values()) if answered else None
        self._until = time.monotonic() + self._ttl

    async def _get(self, backend: int, path: str) -> Any:
        """The JSON answer of ``GET path`` on a backend, or None (logged) when it fails."""
        try:
            status, body = await self._pt.call(
                backend, "GET", path, None, limit=self._timeout, max_bytes=_LIST_MAX
            )
            if status == 200:
                return orjson.loads(body)
            log.warning("GET %s on backend %d: HTTP %d", path, backend, status)
        except (UpstreamError, orjson.JSONDecodeError) as exc:
            log.warning("GET %s on backend %d failed: %s", path, backend, exc)
        return None

    async def _list(self, backend: int) -> list[dict[str, Any]] | None:
        if self._apis[backend] == "ollama":
            data = await self._get(backend, "/api/tags")
            models = data.get("models") if isinstance(data, dict) else None
            if not isinstance(models, list):
                return None
            out = []
            for m in models:
                if isinstance(m, dict) and isinstance(m.get("model") or m.get("name"), str):
                    out.append({**m, "model": m.get("model") or m["name"]})
            return out
        data = await self._get(backend, "/v1/models")
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            return None
        now = _rfc3339(time.time())
        return [
            {
                "name": e["id"],
                "model": e["id"],
                "modified_at": now,
                "size": 0,
                "digest": "",
                "details": dict(_EMPTY_DETAILS),
            }
            for e in entries
            if isinstance(e, dict) and isinstance(e.get("id"), str)
        ]

    async def _get_version(self, backend: int) -> str:
        data = await self._get(backend, "/api/version")
        version = data.get("version") if isinstance(data, dict) else None
        return version if isinstance(version, str) else ""

    async def running(self) -> list[dict[str, Any]]:
        """The union of the Ollama backends' ``/api/ps`` entries."""
        backends = [i for i in self.backends() if self._apis[i] == "ollama"]
        answers = await asyncio.gather(*(self._get(i, "/api/ps") for i in backends))
        out: list[dict[str, Any]] = []
        for data in answers:
            models = data.get("models") if isinstance(data, dict) else None
            if isinstance(models, list):
                out += [m for m in models if isinstance(m, dict)]
        return out

    async def show(self, model: str, body: dict[str, Any]) -> bytes:
        """The ``/api/show`` answer of the first backend that has ``model`` (kept ``ttl``
        seconds: the ``ollama`` CLI and Continue ask before every run). 404 when every backend
        answered that it lacks the model; 502 when one could not say (the CLI would offer to
        pull a model that is only out of reach)."""
        key = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        hit = self._shown.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        unsure = False
        for i in self.backends():
            if self._apis[i] == "ollama":
                try:
                    status, answer = await self._pt.call(
                        i, "POST", "/api/show", body, limit=self._timeout, max_bytes=_LIST_MAX
                    )
                except UpstreamError as exc:
                    log.warning("/api/show on backend %d failed: %s", i, exc.message)
                    unsure = True
                    continue
                if status == 200:
                    return self._keep(key, answer)
                if status != 404:
                    log.warning("/api/show on backend %d: HTTP %d", i, status)
                    unsure = True
                continue
            listed = await self._list(i)
            if listed is None:
                unsure = True
            elif any(e["model"] in (model, f"{model}:latest") for e in listed):
                return self._keep(key, orjson.dumps(_minimal_show()))
        if unsure:
            raise ApiError("unavailable", f"no backend could say whether it has the model {model}")
        raise ApiError("not_found", f"model '{model}' not found", param="model")

    def _keep(self, key: bytes, answer: bytes) -> bytes:
        if len(self._shown) >= _SHOWN_MAX:
            self._shown.clear()  # a crude bound: rebuilt from the next requests
        self._shown[key] = (time.monotonic() + self._ttl, answer)
        return answer
