"""prompt_logprobs in the engine against transformers on the same weights (float32): every prompt
token's logprob, rank and top-k, in a batch where other rows generate as usual."""
from __future__ import annotations

import pytest
import torch

from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.sampling_params import SamplingParams
from tests.hf_reference import hf_greedy

PROMPTS = ["Question: What is the capital of France?\nAnswer: Paris", "def fibonacci(n):", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def engine(base_model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(base_model_dir, dtype="float32", kv_cache_bytes=64 << 20))


@torch.no_grad()
def _hf_prompt_logp(model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)      # row i predicts token i + 1


def test_prompt_logprobs_match_transformers(engine, hf_model_fp32, tokenizer):
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    scored = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=3)
    plain = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    seqs = engine.generate(prompts, [scored, plain, scored])
    for p, s in zip(prompts, seqs):
        assert s.output_token_ids == hf_greedy(hf_model_fp32, p, 6)       # sampling rows unaffected
    assert seqs[1].prompt_logprobs == []
    for p, s in (prompts[0], seqs[0]), (prompts[2], seqs[2]):
        ref = _hf_prompt_logp(hf_model_fp32, p)
        assert [e.token_id for e in s.prompt_logprobs] == p[1:]
        for i, e in enumerate(s.prompt_logprobs):
            row = ref[i]
            # float32 logits agree within 1e-3 (summation order differs from transformers'); log_softmax keeps that
            assert abs(e.logprob - float(row[p[i + 1]])) < 1e-3
            assert e.rank == int((row > row[p[i + 1]]).sum()) + 1 or abs(e.logprob - float(row.max())) < 1e-3
            assert [t for t, _ in e.top] == torch.topk(row, 3).indices.tolist()


def test_prompt_logprobs_survive_preemption(base_model_dir, tokenizer):
    """Recomputing a preempted sequence's prefill does not score its prompt twice."""
    eng = LLMEngine(EngineConfig(base_model_dir, dtype="float32", max_model_len=128, block_size=4,
                                 kv_cache_bytes=4 * 46080 * 40))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS + ["Once upon a time"]]
    seqs = eng.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, prompt_logprobs=0))
    for p, s in zip(prompts, seqs):
        assert [e.token_id for e in s.prompt_logprobs] == p[1:]
