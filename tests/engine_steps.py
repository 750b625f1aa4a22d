"""Tests that look inside one engine step. Adapters get ready on a background thread
(adapters_registry/residency.py), so a test that wants every waiting request in its next step first
waits for the adapters those requests name."""
from __future__ import annotations

import torch

from loramux.engine.llm_engine import LLMEngine
from loramux.engine.sampling_params import SamplingParams
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


def first_step_logits(engine: LLMEngine, jobs: list[tuple[str | None, int]],
                      prompts: list[list[int]]) -> list[torch.Tensor]:
    """Prefill `jobs` (adapter or None, prompt index) together in one step; their last-position logits."""
    seqs = [engine.add_request(f"step-{k}-{a}-{i}", prompts[i], SamplingParams(max_tokens=1, temperature=0), a)[0]
            for k, (a, i) in enumerate(jobs)]
    batch = ready_batch(engine)
    assert len(batch.sequences) == len(jobs)
    rows = dict(zip((id(s) for s in batch.sequences), engine.runner.run(batch)))
    for seq in seqs:
        engine.abort(seq.request_id)
    return [rows[id(s)] for s in seqs]
