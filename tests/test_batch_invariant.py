"""--batch-invariant (issue #28, item 10): a request's greedy tokens and their logprobs are the same
alone and batched with others, in bf16 with the int4 base (the embedded model's default mode).

9 requests over the base model and 3 adapters, prompts of 1x to 3x a sentence: together they make
prefills of more than 16 rows (where the int4 path used to switch to its dense copy), chunked
prompts beside decodes (80-token budget), decode steps of more than 8 sequences (where attention
used to leave float32), steps where every token has one adapter and mixed ones. Bit-identical
logprobs: the mode makes each row's arithmetic independent of its batch mates, so no tolerance.
(The default mode differs on these requests: benchmarks/bench_batch_invariant.py counts how often.)
"""
from __future__ import annotations

import pytest

from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.models.spec import ModelSpec
from loramux.engine.sampling_params import SamplingParams
from loramux.server.bootstrap import build_engine
from tests.adapter_factory import write_small_lora

TOPICS = ["a lighthouse keeper", "the first snow", "a lost robot", "two rival bakers", "a quiet library",
          "an old map", "the night train", "a garden on Mars", "a clockmaker's apprentice"]
ADAPTERS = [None, "a0", "a1", "a2"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def engine(base_model_dir, tmp_path_factory) -> LLMEngine:
    spec = ModelSpec.from_dir(base_model_dir)
    root = tmp_path_factory.mktemp("batch-invariant")
    paths = {f"a{i}": write_small_lora(root / f"a{i}", spec, seed=i, r=8,
                                       targets=("q_proj", "k_proj", "v_proj", "o_proj")) for i in range(3)}
    econf = EngineConfig(base_model_dir, dtype="bfloat16", quantize="int4", kv_cache_bytes=64 << 20, max_loras=3,
                         max_lora_rank=8, batch_invariant=True)
    return build_engine(econf, root / "data", paths)[0]


def test_greedy_output_does_not_depend_on_the_batch(engine, tokenizer):
    prompts = [tokenizer(f"Write a short story about {t}. " * (1 + i % 3))["input_ids"] for i, t in enumerate(TOPICS)]
    adapters = [ADAPTERS[i % len(ADAPTERS)] for i in range(len(prompts))]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=0)

    def answers(seqs) -> list[tuple[list[int], list[float]]]:
        return [(s.output_token_ids, [lp.logprob for lp in s.output_logprobs]) for s in seqs]
    alone = answers([engine.generate([p], params, [a])[0] for p, a in zip(prompts, adapters)])
    together = answers(engine.generate(prompts, params, adapters))
    assert together == alone
    one_adapter = answers(engine.generate(prompts[1::4], params, adapters[1::4]))     # every token on a0
    assert one_adapter == alone[1::4]
