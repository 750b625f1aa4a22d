"""DoRA adapters against transformers + peft (float32): the oracle test of tests/test_lora_engine.py.

Adapters are made by peft itself (`LoraConfig(use_dora=True)`, saved with `save_pretrained`) with
random A, B and magnitudes moved off their initial row norms. Each alone, then mixed with a plain
LoRA, a prefix adapter and the bare base model in the same steps: first-step logits within 1e-3
of peft's (LoRA's tolerance: measured ~2e-5, float32 sums in another order, while a DoRA factor
left out moves them by > 0.1) and greedy tokens identical. peft cannot batch DoRA adapters with
others (it refuses `adapter_names` with DoRA), so each request is compared with peft running it alone.
"""
from __future__ import annotations

import pytest
import torch

from loramux.adapters_registry.dora import with_dora_factors
from loramux.adapters_registry.formats import inspect_adapter, load_adapter
from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.sampling_params import SamplingParams
from loramux.server.bootstrap import build_engine
from tests.adapter_factory import load_peft_model, make_adapters, strip_dora
from tests.engine_steps import ready_batch
from tests.hf_reference import greedy_no_cache

NEW_TOKENS = 16
LOGIT_TOL = 1e-3
DORA = {
    "dora-qv-r8": dict(kind="lora", r=8, alpha=16, targets=("q_proj", "v_proj"), seed=21, b_std=0.1,
                       magnitude_std=0.05, use_dora=True),
    "dora-all-r16": dict(kind="lora", r=16, alpha=32, targets="all-linear", seed=22, b_std=0.05,
                         magnitude_std=0.05, use_dora=True),
    "dora-rslora-patterns": dict(kind="lora", r=8, alpha=8, rslora=True, seed=23, b_std=0.1, magnitude_std=0.05,
                                 targets=("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                 rank_pattern={"up_proj": 4}, alpha_pattern={"gate_proj": 4}, use_dora=True),
}
OTHERS = {
    "lora-qv": dict(kind="lora", r=8, alpha=16, targets=("q_proj", "v_proj"), seed=24, b_std=0.05),
    "prefix": dict(kind="prefix", num_virtual_tokens=6, prefix_projection=False, seed=25),
}
PROMPTS = ["The capital of France is", "Write a haiku about rain.", "def square(x):"]


@pytest.fixture(scope="module")
def adapter_dirs(base_model_dir, tmp_path_factory) -> dict:
    return make_adapters(base_model_dir, tmp_path_factory.mktemp("dora-adapters"), {**DORA, **OTHERS})


@pytest.fixture(scope="module")
def engine_and_registry(base_model_dir, adapter_dirs, tmp_path_factory):
    # Every request of the mixed test runs in the same steps: a token budget above all their prompts
    # (chunked prefill has its own tests).
    econf = EngineConfig(base_model_dir, dtype="float32", kv_cache_bytes=64 << 20, max_loras=4, max_lora_rank=16,
                         max_num_batched_tokens=1024)
    return build_engine(econf, tmp_path_factory.mktemp("dora-data"), adapter_dirs)


@pytest.fixture(scope="module")
def engine(engine_and_registry) -> LLMEngine:
    return engine_and_registry[0]


@pytest.fixture(scope="module")
def peft_reference(base_model_dir, adapter_dirs, tokenizer) -> dict:
    """(adapter, prompt index) -> (greedy tokens, first-step logits) from peft; adapter None = base."""
    from transformers import AutoModelForCausalLM

    ref = {}
    for name in [None, *adapter_dirs]:
        model = (load_peft_model(base_model_dir, adapter_dirs[name]) if name
                 else AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval())
        for i in range(len(PROMPTS) if name in (None, *DORA) else 1):
            ref[name, i] = greedy_no_cache(model, tokenizer(PROMPTS[i])["input_ids"], NEW_TOKENS)
    return ref


def _params() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("name", list(DORA))
def test_factors_are_peft_magnitude_over_weight_norm(engine, base_model_dir, adapter_dirs, name):
    """f = m / ||W + s B A|| per module and row, as peft's own DoraLinearLayer computes it (float32:
    norms of up to 1536 terms summed in another order agree to ~1e-6)."""
    manifest = inspect_adapter(adapter_dirs[name], engine.spec, max_rank=16, max_virtual_tokens=0)
    weights = with_dora_factors(load_adapter(adapter_dirs[name], manifest, engine.spec, dtype=torch.float32,
                                             device=torch.device("cpu")), engine.model, engine.spec)
    peft_model = load_peft_model(base_model_dir, adapter_dirs[name])
    modules = {n: m for n, m in peft_model.named_modules() if "default" in getattr(m, "lora_magnitude_vector", {})}
    assert len(modules) == len(weights.dora_factors) == len(manifest.modules)
    for (layer, module), f in weights.dora_factors.items():
        parent = "self_attn" if module[0] in "qkvo" else "mlp"
        peft_layer = next(m for n, m in modules.items() if n.endswith(f"layers.{layer}.{parent}.{module}"))
        dora = peft_layer.lora_magnitude_vector["default"]
        lora_weight = peft_layer.lora_B["default"].weight @ peft_layer.lora_A["default"].weight
        with torch.no_grad():
            expected = dora.weight / dora.get_weight_norm(peft_layer.base_layer.weight, lora_weight,
                                                          peft_layer.scaling["default"])
        torch.testing.assert_close(f, expected, rtol=1e-5, atol=0)
        assert (f - 1).abs().max() > 1e-3                      # a real factor, not ones


@pytest.mark.parametrize("name", list(DORA))
def test_dora_alone_matches_peft(engine, peft_reference, tokenizer, name):
    for i in range(len(PROMPTS)):
        prompt = tokenizer(PROMPTS[i])["input_ids"]
        tokens, ref_logits = peft_reference[name, i]
        seq = engine.add_request(f"alone-{name}-{i}", prompt, SamplingParams(max_tokens=1, temperature=0), name)[0]
        logits = engine.runner.run(ready_batch(engine))[0]
        engine.abort(seq.request_id)
        assert (logits - ref_logits).abs().max().item() < LOGIT_TOL, (name, i)
        assert engine.generate([prompt], _params(), [name])[0].output_token_ids == tokens, (name, i)
    assert any(peft_reference[name, i][0] != peft_reference[None, i][0] for i in range(len(PROMPTS))), \
        "the adapter must change the output, or this test proves nothing"


def test_magnitudes_matter(base_model_dir, adapter_dirs, peft_reference, tokenizer, tmp_path):
    """The same A and B without DoRA give other logits: applying the factor is what makes them match."""
    stripped = load_peft_model(base_model_dir, strip_dora(adapter_dirs["dora-all-r16"], tmp_path / "plain"))
    _, plain_logits = greedy_no_cache(stripped, tokenizer(PROMPTS[0])["input_ids"], 1)
    assert (plain_logits - peft_reference["dora-all-r16", 0][1]).abs().max().item() > 100 * LOGIT_TOL


def test_mixed_batch_matches_peft(engine, peft_reference, tokenizer):
    """DoRA, plain LoRA, prefix and base requests, all in the same steps: each as peft runs it alone."""
    jobs = [(name, i) for name in DORA for i in range(len(PROMPTS))] + [("lora-qv", 0), ("prefix", 0), (None, 0),
                                                                         (None, 1), ("lora-qv", 0), (None, 2)]
    seqs = [engine.add_request(f"mix-{k}", tokenizer(PROMPTS[i])["input_ids"], _params(), name)[0]
            for k, (name, i) in enumerate(jobs)]
    batch = ready_batch(engine)
    assert len(batch.sequences) == len(jobs)
    plan = engine.runner.prepare(batch)[1].lora
    assert plan.dora == (True, True, True, True)               # every fused projection has a DoRA module
    for seq in seqs:
        engine.abort(seq.request_id)
    seqs = [engine.add_request(f"mix2-{k}", tokenizer(PROMPTS[i])["input_ids"], _params(), name)[0]
            for k, (name, i) in enumerate(jobs)]
    while engine.has_work:
        engine.step()
        assert engine.stats.last_batch_size == len(jobs)
    for (name, i), seq in zip(jobs, seqs):
        assert seq.output_token_ids == peft_reference[name, i][0], (name, i)


def test_steps_without_dora_skip_the_scaling(engine, tokenizer):
    """Zero cost for plain LoRA: a step whose adapters have no DoRA plans no row scaling, and one
    with a DoRA adapter on q/v only scales just the fused q|k|v output."""
    for name, expected in (("lora-qv", (False,) * 4), ("dora-qv-r8", (True, False, False, False))):
        seq = engine.add_request(f"plan-{name}", tokenizer(PROMPTS[0])["input_ids"], _params(), name)[0]
        plan = engine.runner.prepare(ready_batch(engine))[1].lora
        engine.abort(seq.request_id)
        assert plan.dora == expected, name
