"""`loramux serve`'s app: the HTTP API (server/api.py) over this process's engine and adapter registry."""
from __future__ import annotations

import gc
from contextlib import asynccontextmanager

from fastapi import FastAPI

from loramux.server.api import build_api
from loramux.server.local_backend import LocalServing, RegistryAdmin
from loramux.server.state import ServerState


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.engine.start()
        # What startup built (model, tokenizer, modules) leaves the collector's scans: a request body
        # that makes many lists then costs collections over its own objects, not over the whole process.
        gc.freeze()
        yield
        state.engine.shutdown()      # drains in-flight requests before the process exits

    bind_metrics(state)
    admin = RegistryAdmin(state.registry) if state.registry is not None else None
    return build_api("loramux", LocalServing(state), admin, state.admin_key, state.max_request_bytes,
                     lifespan=lifespan)


def bind_metrics(state: ServerState) -> None:
    """Export the engine's and the registry's live state (read at scrape time) in `state.metrics`."""
    engine = state.engine
    registry = state.registry
    state.metrics.bind(
        queue_depth=lambda: engine.num_waiting,
        running=lambda: engine.num_running,
        memory={"base_weights": lambda: engine.engine.weight_bytes, "kv_cache": lambda: engine.engine.kv.nbytes,
                "adapter_slots": lambda: registry.slot_bytes if registry is not None else 0},
        drain_batch_sizes=lambda: _drain(engine.engine.stats.batch_sizes))
    # Zero when idle: what finished, failed, timed out or was abandoned by its client was freed.
    blocks = engine.engine.blocks
    state.metrics.gauge_from("loramux_kv_blocks_used", "KV cache blocks held by sequences",
                             lambda: blocks.num_used)
    state.metrics.gauge_from("loramux_kv_blocks_total", "KV cache blocks", lambda: blocks.num_blocks)
    state.metrics.gauge_from("loramux_engine_requests", "Requests the engine is serving (running or queued)",
                             lambda: engine.num_requests)
    if registry is not None:
        state.metrics.count_from("loramux_adapter_merges", "Adapter mixtures merged (per-request and saved)",
                                 lambda: registry.merges_computed)


def _drain(items: list[int]) -> list[int]:
    out = items[:]
    del items[:len(out)]
    return out
