"""One request's K/V never reaches another's answer (issue #28, items 2 and 3).

An engine with a small KV cache (blocks are reused all the time), float32, the real model:
- an adapter whose slot is made to overflow (its B scaled by 1e30 after registration, past the
  registry's checks: what a bug or a future format could let through) fails with an error finish,
  alone among the requests of its steps; the others' greedy tokens are the ones they get alone, and
  no non-finite value is left in the cache;
- NaN planted in every free block (what an overflowed request left behind before these fixes)
  changes no later answer: decode gathers whole blocks and pads, and masked rows add exact zeros.
"""
from __future__ import annotations

import pytest
import torch

from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.sampling_params import SamplingParams
from loramux.server.bootstrap import build_engine
from tests.adapter_factory import write_small_lora

PROMPTS = ["Once upon a time, in a small village by the sea,", "The capital of France is", "def square(x):"]
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def engine(base_model_dir, tmp_path_factory) -> LLMEngine:
    from loramux.engine.models.spec import ModelSpec
    spec = ModelSpec.from_dir(base_model_dir)
    src = write_small_lora(tmp_path_factory.mktemp("kv-iso") / "hot", spec, seed=7, r=4,
                           targets=("q_proj", "k_proj", "v_proj"))
    # 24 blocks of 16 tokens: three requests of ~60 tokens hold most of them, so blocks are reused.
    econf = EngineConfig(base_model_dir, dtype="float32", quantize="none", kv_cache_bytes=24 * 16 * 92160,
                         max_loras=2, max_lora_rank=8, max_model_len=256)
    return build_engine(econf, tmp_path_factory.mktemp("kv-iso-data"), {"hot": src})[0]


def _greedy() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


def _alone(engine: LLMEngine, tokenizer) -> list[list[int]]:
    return [engine.generate([tokenizer(p)["input_ids"]], _greedy())[0].output_token_ids for p in PROMPTS]


def _cache_finite(engine: LLMEngine) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in (*engine.kv.k, *engine.kv.v))


def test_overflowing_request_fails_alone_and_leaves_no_nan(engine, tokenizer):
    assert engine.kv.k[0].shape[1] // engine.blocks.block_size == engine.blocks.num_blocks + 1
    reference = _alone(engine, tokenizer)
    registry = engine.scheduler.adapters
    lease = registry.acquire("hot")
    try:
        stacks = registry.stacks
        for layer in range(len(stacks.B)):
            for m in ("q_proj", "k_proj", "v_proj"):
                stacks.B[layer][m][lease.slot].mul_(1e30)      # finite weights: q.k overflows, then K/V
        prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
        seqs = engine.generate([prompts[0], *prompts], _greedy(), [None, "hot", None, None])
    finally:
        registry.release(lease)
    hot = seqs[1]
    assert hot.finish_reason == "error" and "overflowed" in hot.error and not hot.output_token_ids
    assert [s.output_token_ids for s in (seqs[0], seqs[2], seqs[3])] == [reference[0], reference[1], reference[2]]
    assert _cache_finite(engine)
    assert engine.blocks.num_used == 0
    assert _alone(engine, tokenizer) == reference


def test_nan_left_in_free_blocks_changes_no_answer(engine, tokenizer):
    reference = _alone(engine, tokenizer)
    bs = engine.blocks.block_size
    rows = torch.tensor([b * bs + i for b in engine.blocks.free_blocks for i in range(bs)])
    for t in (*engine.kv.k, *engine.kv.v):
        t.index_fill_(1, rows, float("nan"))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    together = engine.generate(prompts, _greedy())          # decode pads the shorter contexts
    assert [s.output_token_ids for s in together] == reference
