"""`loramux serve`'s app: the HTTP API (server/api.py) over this process's engine and adapter registry."""
from __future__ import annotations

import gc
import re
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from loramux.adapters_registry.registry import AdapterRegistry
from loramux.engine.prefix_cache import PrefixCache
from loramux.server.api import build_api
from loramux.server.local_backend import LocalServing, RegistryAdmin
from loramux.server.metrics import MIXTURE_LABEL, Metrics
from loramux.server.state import ServerState

_PER_REQUEST_MIXTURE = re.compile(r"mix-[0-9a-f]{16}")    # adapters_registry.MixtureRecipe.adapter_id


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # The engine's step loop is run by the host: `loramux serve` on its main thread (server/cli.py).
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
        drain_batch_sizes=lambda: _drain(engine.engine.stats.batch_sizes), keep_model=state.serves_label)
    # Zero when idle: what finished, failed, timed out or was abandoned by its client was freed.
    blocks = engine.engine.blocks
    state.metrics.gauge_from("loramux_kv_blocks_used", "KV cache blocks held by sequences",
                             lambda: blocks.num_used)
    state.metrics.gauge_from("loramux_kv_blocks_total", "KV cache blocks", lambda: blocks.num_blocks)
    state.metrics.gauge_from("loramux_kv_blocks_cached", "KV cache blocks holding a cached prompt prefix "
                             "(held by sequences or kept for reuse until a free block is needed)",
                             lambda: blocks.num_cached)
    state.metrics.gauge_from("loramux_engine_requests", "Requests the engine is serving (running or queued)",
                             lambda: engine.num_requests)
    if registry is not None:
        state.metrics.count_from("loramux_adapter_merges", "Adapter mixtures merged (per-request and saved)",
                                 lambda: registry.merges_computed)
        bind_adapter_metrics(state.metrics, registry)
    if blocks.cache is not None:
        bind_prefix_cache_metrics(state.metrics, blocks.cache, state)


def bind_adapter_metrics(metrics: Metrics, registry: AdapterRegistry) -> None:
    """The adapter slots' byte budget (how many distinct adapters one batch can mix) and the background loads."""
    stacks, residency = registry.stacks, registry.residency
    metrics.gauge_from("loramux_adapter_slots", "Adapter slots: distinct LoRA adapters one batch can mix",
                       lambda: stacks.num_slots)
    metrics.gauge_from("loramux_adapter_slot_bytes", "Bytes of one adapter slot (rank --max-lora-rank, 7 projections)",
                       lambda: stacks.nbytes // stacks.num_slots)
    metrics.gauge_from("loramux_adapter_slots_used", "Adapter slots holding an adapter",
                       lambda: sum(r > 0 for r in stacks.slot_rank))
    metrics.count_from("loramux_adapter_loads", "Adapter weights read from disk on the background thread",
                       lambda: residency.loads)
    metrics.count_from("loramux_adapter_slot_writes", "Adapters copied into a slot on the background thread",
                       lambda: residency.slot_writes)


def bind_prefix_cache_metrics(metrics: Metrics, cache: PrefixCache, state: ServerState) -> None:
    """Prefix-cache hit rate (prompt tokens served from cached KV / prompt tokens) and cached blocks, per
    model label (server/metrics.py: the base model's name, a registered adapter, every mixture as one)."""
    def label(raw: str) -> str | None:
        if not raw:
            return state.base_model_name
        if _PER_REQUEST_MIXTURE.fullmatch(raw) and (not state.serves_label(raw) or _is_mixture(state, raw)):
            return MIXTURE_LABEL             # served now or evicted since: counted under one label either way
        return raw if state.serves_label(raw) else None      # a deleted adapter: its series are gone

    def per_label(items: list[tuple[str, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for raw, value in items:
            name = label(raw)
            if name is not None:
                out[name] = out.get(name, 0.0) + value
        return out

    def stat(field: str) -> Callable[[], dict[str, float]]:
        return lambda: per_label([(raw, getattr(s, field)) for raw, s in list(cache.stats.items())])

    def hit_rate() -> dict[str, float]:
        queries, hits = stat("prompt_tokens")(), stat("hit_tokens")()
        return {name: hits.get(name, 0.0) / n if n else 0.0 for name, n in queries.items()}

    metrics.labeled_from("loramux_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", "counter",
                         stat("prompt_tokens"))
    metrics.labeled_from("loramux_prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache", "counter",
                         stat("hit_tokens"))
    metrics.labeled_from("loramux_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt "
                         "tokens, since start", "gauge", hit_rate)
    metrics.labeled_from("loramux_prefix_cache_blocks", "KV blocks holding cached content (held or evictable)",
                         "gauge", lambda: per_label(list(cache.blocks_per_label.items())))


def _is_mixture(state: ServerState, adapter_id: str) -> bool:
    try:
        return state.registry.get(adapter_id).mixture is not None
    except Exception:  # noqa: BLE001 - withdrawn since the look-up: a mixture or nothing
        return True


def _drain(items: list[int]) -> list[int]:
    out = items[:]
    del items[:len(out)]
    return out
