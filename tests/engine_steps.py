"""Tests that look inside one engine step. Adapters get ready on a background thread
(adapters_registry/residency.py), so a test that wants every waiting request in its next step first
waits for the adapters those requests name."""
from __future__ import annotations

from loramux.engine.llm_engine import LLMEngine
from loramux.engine.scheduler import ScheduledBatch


def ready_batch(engine: LLMEngine) -> ScheduledBatch:
    """The next scheduled batch, once every waiting request's adapter is loaded (in a slot, or its
    prefix KV in host memory)."""
    registry = engine.scheduler.adapters
    for name in {s.adapter_id for s in engine.scheduler.waiting if s.adapter_id is not None}:
        lease = registry.acquire(name)
        assert lease is not None, f"no free slot for {name!r}"
        registry.release(lease)
    return engine.scheduler.schedule()
