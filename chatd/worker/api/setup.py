"""Building a worker's API router from its configuration, relay and slots."""

from __future__ import annotations

from chatd.config import Config
from chatd.relay.generate import Relay
from chatd.relay.passthrough import Passthrough
from chatd.worker.api.catalog import Catalog
from chatd.worker.api.common import Context
from chatd.worker.api.relaying import Relaying
from chatd.worker.api.router import ApiRouter
from chatd.worker.slots import MasterSlots

CATALOG_TIMEOUT = 10.0
"""Seconds a backend may take to answer /api/tags, /api/ps, /api/show or /api/version."""


def api_router(
    cfg: Config, relay: Relay, slots: MasterSlots, embed_slots: MasterSlots
) -> ApiRouter:
    """The router of the Ollama/OpenAI APIs over ``relay`` (started later, in the loop)."""
    apis = relay.apis  # grows as addresses are discovered (chatd.backendtable)
    passthrough = Passthrough(relay)
    catalog = Catalog(
        passthrough, apis, lambda: slots.healthy, cfg.api.models_cache, CATALOG_TIMEOUT
    )
    relaying = Relaying(passthrough, slots, embed_slots, catalog, cfg.limits.max_queued_per_key)
    return ApiRouter(Context(cfg, relaying, catalog, passthrough, apis))
