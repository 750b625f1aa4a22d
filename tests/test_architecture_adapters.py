"""peft adapters on every architecture we serve, against peft itself (float32): LoRA on every
projection under the checkpoint's own names (Phi-3's fused qkv_proj / gate_up_proj expand into
slices of our fused projections), rsLoRA with rank/alpha patterns, DoRA; each alone, then all of
them and the bare base model in the same steps, prompts longer than the sliding windows.

Adapters are saved by peft (`init_lora_weights=False`, then seeded random weights: tests/adapter_factory).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loramux.engine.config import EngineConfig
from loramux.engine.sampling_params import SamplingParams
from loramux.server.bootstrap import build_engine
from tests.adapter_factory import load_peft_model, make_lora_adapter
from tests.arch_checkpoints import NEW_TOKENS, TEXTS, write_arch_checkpoint
from tests.hf_reference import hf_greedy

TRAIN_DATA = Path(__file__).parent / "data" / "codeword_train.jsonl"
# A subset of ARCHS covering every difference the adapters see: fused checkpoint names (phi3),
# biases (llama3, qwen2), q/k norms + explicit head_dim (qwen3), sandwich norms and windows (gemma3, mistral).
ADAPTER_ARCHS = ["llama3", "qwen2", "qwen3", "mistral", "phi3", "gemma3"]
ADAPTERS = {
    "all-linear": dict(r=8, alpha=16, targets="all-linear", seed=1, b_std=0.1),
    "rslora-patterns": dict(r=8, alpha=8, targets="all-linear", rslora=True, seed=2, b_std=0.1,
                            rank_pattern={"o_proj": 4}, alpha_pattern={"down_proj": 32}),
    "dora": dict(r=4, alpha=8, targets="all-linear", seed=3, b_std=0.1, use_dora=True, magnitude_std=0.1),
}


@pytest.fixture(scope="module", params=ADAPTER_ARCHS)
def served(request, base_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = request.param
    root = tmp_path_factory.mktemp(f"{arch}-adapters")
    path = write_arch_checkpoint(arch, root / "base", base_model_dir)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    dirs = {name: make_lora_adapter(path, root / name, init_lora_weights=False, **kw) for name, kw in ADAPTERS.items()}
    ref = {None: hf_greedy(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), prompts[0],
                           NEW_TOKENS)}
    logits = {}
    for name, adapter in dirs.items():
        model = load_peft_model(path, adapter)
        ref[name] = hf_greedy(model, prompts[0], NEW_TOKENS)
        with torch.no_grad():
            logits[name] = model(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    econf = EngineConfig(path, dtype="float32", quantize="none", kv_cache_bytes=8 << 20, max_loras=4,
                         max_lora_rank=8, max_num_batched_tokens=256)
    engine, registry = build_engine(econf, root / "data", dirs)
    return arch, engine, prompts[0], ref, logits, registry


def _params() -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_adapter_alone_matches_peft(served, adapter):
    from tests.engine_steps import first_step_logits

    arch, engine, prompt, ref, logits, _ = served
    assert ref[adapter] != ref[None], "the adapter must change the greedy tokens for this test to mean anything"
    [seq] = engine.generate([prompt], _params(), [adapter])
    assert seq.output_token_ids == ref[adapter], (arch, adapter)
    # tolerance: peft's separate q/k/v and LoRA matmuls sum in another order than our fused ones
    torch.testing.assert_close(first_step_logits(engine, [(adapter, 0)], [prompt])[0], logits[adapter],
                               atol=1e-4, rtol=1e-4)


def test_mixed_batch_matches_each_alone(served):
    arch, engine, prompt, ref, _, registry = served
    names = [None, *ADAPTERS, None, *ADAPTERS]
    seqs = engine.generate([prompt] * len(names), _params(), names)
    assert [s.output_token_ids for s in seqs] == [ref[n] for n in names], arch
    if arch == "phi3":                     # merges are written under unfused names: refused, not served wrong
        from loramux.adapters_registry.errors import AdapterError
        from loramux.adapters_registry.mixtures import MixtureRecipe

        with pytest.raises(AdapterError, match="mixtures are not supported"):
            registry.mixture(MixtureRecipe.create([("all-linear", 0.5), ("rslora-patterns", 0.5)]))


@torch.no_grad()
def _greedy_after_prefix(model, ids: list[int], cache) -> list[int]:
    """transformers' greedy decoding with peft's `get_prompt` KV (the virtual tokens) as its cache:
    peft 0.21's own prefix generate drops it under transformers 5."""
    virtual, tokens = cache.get_seq_length(), []
    out = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True,
                attention_mask=torch.ones(1, virtual + len(ids), dtype=torch.long))
    for _ in range(NEW_TOKENS):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([tokens[-1:]]), cache=out.cache, use_cache=True,
                    attention_mask=torch.ones(1, virtual + len(ids) + len(tokens), dtype=torch.long))
    return tokens


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "phi3", "gemma3"])
def test_prefix_tuning_matches_peft(arch, base_model_dir, tmp_path):
    """Virtual tokens count as positions inside the sliding window, as transformers' mask counts them."""
    from transformers import AutoTokenizer

    from tests.adapter_factory import make_prefix_adapter

    path = write_arch_checkpoint(arch, tmp_path / "base", base_model_dir)
    adapter, peft_model = make_prefix_adapter(path, tmp_path / "prefix", num_virtual_tokens=6, return_model=True)
    prompt = AutoTokenizer.from_pretrained(path)(TEXTS[2])["input_ids"]
    want = _greedy_after_prefix(peft_model.base_model, prompt, peft_model.get_prompt(batch_size=1))
    econf = EngineConfig(path, dtype="float32", quantize="none", kv_cache_bytes=8 << 20, max_num_batched_tokens=256)
    engine, _ = build_engine(econf, tmp_path / "data", {"prefix": adapter})
    base, with_prefix = engine.generate([prompt, prompt], _params(), [None, "prefix"])
    assert with_prefix.output_token_ids != base.output_token_ids, "the prefix must change the answer"
    assert with_prefix.output_token_ids == want, arch


@pytest.mark.parametrize("arch, method", [("llama3", "lora"), ("qwen2", "lora"), ("qwen3", "lora"), ("mistral", "lora"),
                                          ("phi3", "lora"), ("gemma3", "dora")])
def test_trainer_trains_each_architecture_and_the_engine_serves_it(arch, method, base_model_dir, tmp_path):
    """`loramux train` on a non-Llama base writes a peft folder (the architecture's own module names:
    Phi-3's fused qkv_proj) that the engine serves as peft runs it."""
    import json

    from transformers import AutoTokenizer

    from loramux.trainer.api import TrainConfig, train

    path = write_arch_checkpoint(arch, tmp_path / "base", base_model_dir)
    out = tmp_path / "trained"
    train(TrainConfig(data=TRAIN_DATA, out=out, base=path, method=method, rank=4, alpha=8, max_steps=3,
                      batch_size=4, max_seq_len=48, lr=1e-2, progress=False))
    config = json.loads((out / "adapter_config.json").read_text())
    names = {t.rsplit(".", 1)[-1] for t in config["target_modules"]}     # peft saves all-linear as full names
    assert names >= ({"qkv_proj", "gate_up_proj"} if arch == "phi3" else {"q_proj", "gate_proj"})
    prompt = AutoTokenizer.from_pretrained(path)(TEXTS[0])["input_ids"]
    want = hf_greedy(load_peft_model(path, out), prompt, NEW_TOKENS)
    econf = EngineConfig(path, dtype="float32", quantize="none", kv_cache_bytes=8 << 20, max_num_batched_tokens=256)
    engine, _ = build_engine(econf, tmp_path / "data", {"trained": out})
    [seq] = engine.generate([prompt], _params(), ["trained"])
    assert seq.output_token_ids == want, arch
