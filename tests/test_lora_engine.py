"""The oracle test: our engine with adapters vs transformers + peft on the same weights (float32).

Each adapter alone, then 12 concurrent requests over 6 adapters plus the bare base model in the
same steps: logits within 1e-3 and identical greedy tokens.
"""
from __future__ import annotations

import time

import pytest
import torch

from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.sampling_params import SamplingParams
from loramux.server.bootstrap import build_engine
from tests.adapter_factory import load_peft_model, make_adapters
from tests.hf_reference import greedy_no_cache

NEW_TOKENS = 16
ADAPTERS = {
    "qv-r8": dict(kind="lora", r=8, alpha=16, targets=("q_proj", "v_proj"), seed=1, b_std=0.05),
    "all-r16": dict(kind="lora", r=16, alpha=32, targets="all-linear", seed=2, b_std=0.1),
    "rslora-r4": dict(kind="lora", r=4, alpha=8, targets=("k_proj", "o_proj", "down_proj"), rslora=True, seed=3,
                      b_std=0.05),
    "patterns": dict(kind="lora", r=8, alpha=16, targets=("q_proj", "up_proj", "gate_proj"), seed=4, b_std=0.1,
                     rank_pattern={"up_proj": 4}, alpha_pattern={"gate_proj": 4}),
    "prefix-proj": dict(kind="prefix", num_virtual_tokens=6, prefix_projection=True, seed=5),
    "prefix-plain": dict(kind="prefix", num_virtual_tokens=20, prefix_projection=False, seed=6),
}
PROMPTS = ["The capital of France is", "Write a haiku about rain.", "def square(x):", "My name is",
           "Three facts about owls:", "Once upon a time"]


@pytest.fixture(scope="module")
def adapter_dirs(base_model_dir, tmp_path_factory) -> dict:
    return make_adapters(base_model_dir, tmp_path_factory.mktemp("oracle-adapters"), ADAPTERS)


@pytest.fixture(scope="module")
def engine(base_model_dir, adapter_dirs, tmp_path_factory) -> LLMEngine:
    # Every request of the mixed test runs in the same steps: a token budget above all their prompts
    # (chunked prefill has its own tests).
    econf = EngineConfig(base_model_dir, dtype="float32", kv_cache_bytes=64 << 20, max_loras=4, max_lora_rank=16,
                         max_num_batched_tokens=1024)
    return build_engine(econf, tmp_path_factory.mktemp("oracle-data"), adapter_dirs)[0]


@pytest.fixture(scope="module")
def peft_reference(base_model_dir, adapter_dirs, tokenizer) -> dict:
    """(adapter, prompt index) -> (greedy tokens, first-step logits) from peft; adapter None = base."""
    ref = {}
    for name in [None, *adapter_dirs]:
        model = load_peft_model(base_model_dir, adapter_dirs[name]) if name else None
        if model is None:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
        model.eval()
        for i in (0, 1):
            ref[name, i] = greedy_no_cache(model, tokenizer(PROMPTS[i])["input_ids"], NEW_TOKENS)
    return ref


def _next_batch(engine: LLMEngine):
    """The next scheduled batch with work in it: adapters get ready on a background thread."""
    deadline = time.monotonic() + 60
    while not (batch := engine.scheduler.schedule()):
        assert time.monotonic() < deadline, "the adapter never got ready"
        time.sleep(0.01)
    return batch


def _params() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_alone_matches_peft(engine, peft_reference, tokenizer, name):
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    tokens, ref_logits = peft_reference[name, 0]
    seq = engine.add_request(f"alone-{name}", prompt, SamplingParams(max_tokens=1, temperature=0), name)[0]
    batch = _next_batch(engine)
    logits = engine.runner.run(batch)[0]
    engine.abort(seq.request_id)
    assert (logits - ref_logits).abs().max().item() < 1e-3
    base_tokens, _ = peft_reference[None, 0]
    assert tokens != base_tokens, "the adapter must change the output, or this test proves nothing"
    out = engine.generate([prompt], _params(), [name])[0]
    assert out.output_token_ids == tokens


def test_mixed_batch_matches_peft(engine, peft_reference, tokenizer):
    """14 requests over 6 adapters + the base model, all in the same steps."""
    names = [None, *ADAPTERS]
    jobs = [(names[k % len(names)], k % 2) for k in range(14)]
    for name in ADAPTERS:                                # all resident first: 4 slots, 4 LoRA adapters
        engine.scheduler.adapters.release(engine.scheduler.adapters.acquire(name))
    seqs = [engine.add_request(f"mix-{k}", tokenizer(PROMPTS[i])["input_ids"], _params(), name)[0]
            for k, (name, i) in enumerate(jobs)]
    engine.step()
    # 4 device slots for the 4 LoRA adapters: every request runs from the first step on, in one batch.
    assert engine.stats.last_batch_size == len(jobs)
    assert len({s.lora_slot for s in engine.scheduler.running if s.lora_slot >= 0}) == 4
    # 20 virtual tokens = one full 16-token block, shared by both running sequences of that adapter.
    plain = [s for s in engine.scheduler.running if s.adapter_id == "prefix-plain"]
    assert len(plain) == 2 and plain[0].block_table[0] == plain[1].block_table[0]
    assert plain[0].block_table[1] != plain[1].block_table[1]
    while engine.has_work:
        engine.step()
        assert engine.stats.last_batch_size == len(jobs)
    for (name, i), seq in zip(jobs, seqs):
        assert seq.output_token_ids == peft_reference[name, i][0], (name, i)


def test_requests_wait_for_a_slot_instead_of_thrashing(base_model_dir, adapter_dirs, peft_reference, tokenizer,
                                                       tmp_path):
    """One device slot, four LoRA adapters: requests queue for the slot and still come out exact."""
    loras = [n for n, c in ADAPTERS.items() if c["kind"] == "lora"]
    econf = EngineConfig(base_model_dir, dtype="float32", kv_cache_bytes=32 << 20, max_loras=1, max_lora_rank=16)
    eng, registry = build_engine(econf, tmp_path, {n: adapter_dirs[n] for n in loras})
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    seqs = [eng.add_request(n, prompt, _params(), n)[0] for n in loras]
    slots_in_use = []
    while eng.has_work:
        eng.step()
        slots_in_use.append({s.adapter_id for s in eng.scheduler.running})
    assert all(len(s) <= 1 for s in slots_in_use)
    for name, seq in zip(loras, seqs):
        assert seq.output_token_ids == peft_reference[name, 0][0]
        assert seq.lease is None                         # released when finished
    assert all(info.active_leases == 0 for info in registry.list())


@pytest.fixture(scope="module")
def chunked_engine(base_model_dir, adapter_dirs, tmp_path_factory) -> tuple[LLMEngine, object]:
    """Steps of 4 tokens for 4 sequences: every prompt is prefilled in chunks, beside other decodes."""
    econf = EngineConfig(base_model_dir, dtype="float32", kv_cache_bytes=64 << 20, max_loras=4, max_lora_rank=16,
                         max_num_seqs=4, max_num_batched_tokens=4, max_prefill_tokens=4)
    return build_engine(econf, tmp_path_factory.mktemp("chunked-data"), adapter_dirs)


def test_chunked_prefill_matches_peft(chunked_engine, peft_reference, tokenizer):
    """Every adapter kind (prefix tuning's virtual tokens written at the first chunk, LoRA slots leased
    across chunks) and the base model, 14 requests in all, prompts split over several steps."""
    engine, _ = chunked_engine
    names = [None, *ADAPTERS]
    jobs = [(names[k % len(names)], k % 2) for k in range(14)]
    prompts = [tokenizer(PROMPTS[i])["input_ids"] for _, i in jobs]
    assert all(len(p) > 4 for p in prompts)               # no prompt fits one step
    seqs = engine.generate(prompts, _params(), [name for name, _ in jobs])
    for (name, i), seq in zip(jobs, seqs):
        assert seq.output_token_ids == peft_reference[name, i][0], (name, i)
    assert engine.blocks.num_used == 0


def test_reregistered_adapter_never_gets_the_old_weights_cached_kv(chunked_engine, adapter_dirs, tokenizer):
    """The prefix cache keys KV by adapter id and weights version: the same id with new weights
    computes its prompt again (no hits) and answers as the new weights do."""
    engine, registry = chunked_engine
    prompt = tokenizer(" ".join(PROMPTS) + " " + " ".join(PROMPTS))["input_ids"]
    assert len(prompt) > 3 * 16

    def run(adapter_id: str) -> list[tuple[int, float]]:
        """Greedy tokens with their logprobs: two LoRAs may agree on tokens, never on every logprob."""
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
        return [(lp.token_id, lp.logprob) for lp in engine.generate([prompt], params, [adapter_id])[0].output_logprobs]

    registry.register("swap", adapter_dirs["qv-r8"])
    old = run("swap")
    assert run("swap") == old and engine.blocks.cache.stats["swap"].hit_tokens > 0   # the cache serves repeats
    registry.unregister("swap")
    registry.register("swap", adapter_dirs["all-r16"])
    hits = engine.blocks.cache.stats["swap"].hit_tokens
    new = run("swap")
    assert engine.blocks.cache.stats["swap"].hit_tokens == hits                       # nothing from the old weights
    registry.register("fresh", adapter_dirs["all-r16"])
    assert new == run("fresh") and new != old
