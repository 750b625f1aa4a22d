"""Chunked prefill and prefix caching change what a step computes, never what comes out: in float32,
greedy tokens are identical to transformers' whatever the chunk size, with the prefix cache on or
off, cold or warm, and when requests arrive while others are mid-prompt."""
from __future__ import annotations

import gc

import pytest

from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.sampling_params import SamplingParams
from tests.hf_reference import hf_greedy

SYSTEM = ("You are a patient assistant for a public library. You answer questions about opening hours, "
          "borrowing rules and the reading room, in one or two plain sentences. Books are lent for three "
          "weeks and may be renewed twice; the reading room is quiet after six in the evening.\n\n")
QUESTIONS = ["How long can I keep a book?", "Can I renew a loan?", "When is the reading room quiet?",
             "Write one sentence about owls.", "What is two plus two?"]
NEW_TOKENS = 24
# (step budget, idle or not; enable_prefix_caching): whole prompts uncached (the reference run), then
# chunks of a few tokens (8 sequences decode alongside: 16 - 8 = 8-token chunks at the least), cached or not.
CONFIGS = [(4096, False), (16, False), (16, True), (4096, True)]


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(SYSTEM + q)["input_ids"] for q in QUESTIONS] + [tokenizer(q)["input_ids"] for q in QUESTIONS[:3]]


@pytest.fixture(scope="module")
def reference(hf_model_fp32, prompts) -> list[list[int]]:
    return [hf_greedy(hf_model_fp32, p, NEW_TOKENS) for p in prompts]


def _run(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    """Two waves: the first three requests start, the rest arrive while those are mid-prompt."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(f"w{i}", p, params)[0] for i, p in enumerate(prompts[:3])]
    engine.step()
    seqs += [engine.add_request(f"w{i}", p, params)[0] for i, p in enumerate(prompts[3:], 3)]
    while engine.has_work:
        engine.step()
    return [s.output_token_ids for s in seqs]


def test_outputs_identical_across_chunk_sizes_and_with_the_cache_on_or_off(base_model_dir, prompts, reference):
    assert len(prompts[0]) > 3 * 16, "prompts must span several chunks and cache blocks"
    outputs = {}
    for budget, caching in CONFIGS:
        engine = LLMEngine(EngineConfig(base_model_dir, dtype="float32", kv_cache_bytes=64 << 20, max_num_seqs=8,
                                        max_num_batched_tokens=budget, max_prefill_tokens=budget,
                                        enable_prefix_caching=caching))
        cold = _run(engine, prompts)
        steps = engine.stats.steps
        warm = _run(engine, prompts)
        assert engine.blocks.num_used == 0
        if caching:
            stats = engine.blocks.cache.stats[""]
            # The warm pass finds every full block of every prompt: all but the block of the last token.
            full = sum((len(p) - 1) // 16 * 16 for p in prompts)
            assert stats.hit_tokens >= full, (stats, full)
            assert engine.blocks.num_cached > 0
        if budget == 16:
            assert steps > len(prompts[0]) // 8, "the long prompts must have been prefilled in chunks"
        outputs[budget, caching] = cold, warm
        del engine
        gc.collect()
    for (budget, caching), (cold, warm) in outputs.items():
        assert cold == reference, (budget, caching)
        assert warm == reference, (budget, caching)
    assert outputs[16, True] == outputs[4096, False]        # identical with and without cache and chunks
