"""Every architecture we serve against transformers on the same random checkpoint (float32): greedy
tokens identical and logits close, each prompt alone, all prompts in one batch, and prefilled in
chunks; prompts are longer than the sliding windows (16) so windowed layers are really tested.

Checkpoints come from transformers' own config classes (tests/arch_checkpoints.py). Tolerance 1e-4 on
logits of magnitude ~1-10: our fused projections and paged attention sum in another order than
transformers' separate ones (float32 rounding, ~1e-6 relative), nothing more.
"""
from __future__ import annotations

import pytest
import torch

from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.sampling_params import SamplingParams
from tests.arch_checkpoints import ARCHS, NEW_TOKENS, TEXTS, write_arch_checkpoint
from tests.hf_reference import hf_greedy


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, base_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = request.param
    path = write_arch_checkpoint(arch, tmp_path_factory.mktemp(arch), base_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    assert all(len(p) > 16 for p in prompts), "prompts must be longer than the sliding window"
    with torch.no_grad():
        ref = [(hf_greedy(hf, p, NEW_TOKENS), hf(torch.tensor([p])).logits[0, -1]) for p in prompts]
    return arch, path, prompts, ref


def _engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(path, dtype="float32", quantize="none", kv_cache_bytes=4 << 20, **kw))


def _params() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=0)


def test_each_prompt_alone_matches_transformers(checkpoint):
    arch, path, prompts, ref = checkpoint
    engine = _engine(path, max_num_batched_tokens=256)
    for prompt, (tokens, _) in zip(prompts, ref):
        [seq] = engine.generate([prompt], _params())
        assert seq.output_token_ids == tokens, arch


def test_logits_match_transformers(checkpoint):
    from tests.engine_steps import first_step_logits

    _, path, prompts, ref = checkpoint
    engine = _engine(path, max_num_batched_tokens=256)
    logits = first_step_logits(engine, [(None, i) for i in range(len(prompts))], prompts)
    for got, (_, want) in zip(logits, ref):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("budget", [256, 8])   # one batch of whole prompts; chunks of 8 tokens beside decodes
def test_batch_and_chunked_prefill_match_alone(checkpoint, budget):
    arch, path, prompts, ref = checkpoint
    engine = _engine(path, max_num_batched_tokens=budget, max_num_seqs=4)
    seqs = engine.generate(prompts, _params())
    assert [s.output_token_ids for s in seqs] == [tokens for tokens, _ in ref], arch


def test_prefix_cache_hit_matches(checkpoint):
    """A second request starting from the first's cached blocks: its new tokens attend to cached KV
    through the window's mask, as a fresh prefill would."""
    arch, path, prompts, ref = checkpoint
    engine = _engine(path, max_num_batched_tokens=256, block_size=8)
    engine.generate([prompts[0]], _params())
    [seq] = engine.generate([prompts[0]], _params())
    assert engine.blocks.cache.stats[""].hit_tokens >= 16, "the prompt's first blocks come from the prefix cache"
    assert seq.output_token_ids == ref[0][0], arch


# Relative error of the first logits vs transformers' float32 ones, measured 0.008-0.02 (bf16), 0.015-0.03
# (int8), 0.16-0.38 (int4: Gaussian random weights in groups of 32 at 4 bits, no trained structure): each
# bound is about twice what was measured, so it catches a missing bias, norm or mask (errors of order 1).
RESIDENT_FORMS = {("bfloat16", "none"): 0.05, ("bfloat16", "int8"): 0.07, ("bfloat16", "int4"): 0.7}


@pytest.mark.parametrize("dtype, quantize", list(RESIDENT_FORMS))
def test_resident_forms_stay_close_to_float32(checkpoint, dtype, quantize):
    from tests.engine_steps import first_step_logits

    arch, path, prompts, ref = checkpoint
    engine = LLMEngine(EngineConfig(path, dtype=dtype, quantize=quantize, kv_cache_bytes=4 << 20,
                                    max_num_batched_tokens=256))
    [got] = first_step_logits(engine, [(None, 0)], prompts[:1])
    want = ref[0][1]
    assert float((got - want).norm() / want.norm()) < RESIDENT_FORMS[dtype, quantize], arch
