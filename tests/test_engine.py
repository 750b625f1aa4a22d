"""The engine against transformers on the same weights (float32): logits and greedy tokens."""
from __future__ import annotations

import pytest
import torch

from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.sampling_params import SamplingParams
from tests.hf_reference import hf_greedy, hf_last_logits

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "List three colors:",
    "1, 2, 3, 4,",
    "Translate to French: Good morning, my friend. How are you today?",
    "The quick brown fox",
    "Water boils at a temperature of",
]


@pytest.fixture(scope="module")
def engine(base_model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(base_model_dir, dtype="float32", kv_cache_bytes=64 << 20))


def _ids(tokenizer, texts):
    return [tokenizer(t)["input_ids"] for t in texts]


def test_prefill_logits_match_transformers(engine, hf_model_fp32, tokenizer):
    prompts = _ids(tokenizer, PROMPTS[:4])
    seqs = [engine.add_request(f"l{i}", p, SamplingParams(max_tokens=1, temperature=0))[0]
            for i, p in enumerate(prompts)]
    batch = engine.scheduler.schedule()
    assert len(batch.prefills) == 4
    logits = engine.runner.run(batch)
    for i, p in enumerate(prompts):
        assert (logits[i] - hf_last_logits(hf_model_fp32, p)).abs().max().item() < 1e-3
    for s in seqs:
        engine.scheduler.finish(s, "abort")
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_decode_logits_match_transformers(engine, hf_model_fp32, tokenizer):
    """Logits at a decode step (KV read back from paged blocks) match a full HF forward."""
    p = _ids(tokenizer, PROMPTS[2:3])[0]
    seq = engine.add_request("d", p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    for _ in range(19):
        engine.step()
    batch = engine.scheduler.schedule()
    assert batch.decodes == [seq]
    logits = engine.runner.run(batch)[0]
    ref = hf_last_logits(hf_model_fp32, p + seq.output_token_ids)
    assert (logits - ref).abs().max().item() < 1e-3
    engine.abort("d")


def test_greedy_64_tokens_identical_alone(engine, hf_model_fp32, tokenizer):
    p = _ids(tokenizer, PROMPTS[1:2])[0]
    seq = engine.generate([p], SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))[0]
    assert seq.output_token_ids == hf_greedy(hf_model_fp32, p, 64)


def test_greedy_64_tokens_identical_8_concurrent(engine, hf_model_fp32, tokenizer):
    """8 prompts of different lengths, batched together by continuous batching, staggered arrivals."""
    prompts = _ids(tokenizer, PROMPTS)
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(f"c{i}", p, params)[0] for i, p in enumerate(prompts[:3])]
    engine.step()
    engine.step()                                     # the rest join a running batch
    seqs += [engine.add_request(f"c{i}", p, params)[0] for i, p in enumerate(prompts[3:], 3)]
    max_batch = 0
    while engine.has_work:
        engine.step()
        max_batch = max(max_batch, engine.stats.last_batch_size)
    assert max_batch == 8
    for p, s in zip(prompts, seqs):
        assert s.output_token_ids == hf_greedy(hf_model_fp32, p, 64), s.request_id
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_preemption_recomputes_exactly(base_model_dir, hf_model_fp32, tokenizer):
    """With too few KV blocks, sequences are preempted and recomputed; output stays exact."""
    eng = LLMEngine(EngineConfig(base_model_dir, dtype="float32", max_model_len=128, block_size=4,
                                 kv_cache_bytes=4 * 46080 * 40))
    assert eng.blocks.num_blocks == 40
    prompts = _ids(tokenizer, PROMPTS[:4])
    seqs = eng.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    for p, s in zip(prompts, seqs):
        assert s.output_token_ids == hf_greedy(hf_model_fp32, p, 40)


def test_stop_strings_and_max_tokens(engine, tokenizer):
    p = _ids(tokenizer, ["1, 2, 3, 4,"])[0]
    free = engine.generate([p], SamplingParams(max_tokens=20, temperature=0))[0]
    assert free.finish_reason == "length" and len(free.output_token_ids) == 20
    stop = free.text[6:9]
    cut = engine.generate([p], SamplingParams(max_tokens=20, temperature=0, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.find(stop)]


def test_seeded_sampling_is_reproducible(engine, tokenizer):
    p = _ids(tokenizer, ["Tell me a story about"])[0]
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    a, b = (engine.generate([p], sp)[0].output_token_ids for _ in range(2))
    c = engine.generate([p], SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True))[0]
    assert a == b
    assert c.output_token_ids != a


def test_logprobs_are_model_log_softmax(engine, hf_model_fp32, tokenizer):
    p = _ids(tokenizer, ["The capital of France is"])[0]
    seq = engine.generate([p], SamplingParams(max_tokens=1, temperature=0, logprobs=3))[0]
    ref = torch.log_softmax(hf_last_logits(hf_model_fp32, p), -1)
    lp = seq.output_logprobs[0]
    assert lp.token_id == int(ref.argmax())
    assert abs(lp.logprob - float(ref.max())) < 1e-3
    assert [t for t, _ in lp.top] == torch.topk(ref, 3).indices.tolist()


def test_context_window_is_enforced(engine):
    with pytest.raises(ValueError, match="maximum context length"):
        engine.check_prompt([1] * engine.max_model_len, 1)
    with pytest.raises(ValueError, match="empty"):
        engine.check_prompt([], 1)
