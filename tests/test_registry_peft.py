"""Real peft adapters of the embedded model: what we parse must be exactly what peft runs."""
from __future__ import annotations

import pytest
import torch

from loramux.adapters_registry.config import RegistryConfig
from loramux.adapters_registry.errors import AdapterError
from loramux.adapters_registry.registry import AdapterRegistry
from loramux.engine.models.spec import LORA_TARGETS, ModelSpec
from tests.adapter_factory import load_peft_model, make_lora_adapter, make_prefix_adapter

MAX_RANK = 16


@pytest.fixture(scope="module")
def spec(base_model_dir) -> ModelSpec:
    return ModelSpec.from_dir(base_model_dir)


@pytest.fixture(scope="module")
def registry(spec, tmp_path_factory) -> AdapterRegistry:
    # One slot: every variant below evicts the previous one, so eviction + reload is exercised too.
    cfg = RegistryConfig(data_dir=tmp_path_factory.mktemp("data"), max_loras=1, max_lora_rank=MAX_RANK,
                         max_host_adapters=2)
    return AdapterRegistry(spec, cfg, dtype=torch.float32, device=torch.device("cpu"),
                           base_model_name="SmolLM2-135M-Instruct")


def _peft_module(peft_model, layer: int, module: str):
    block = peft_model.base_model.model.model.layers[layer]
    return getattr(block.self_attn if module in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp, module)


LORA_VARIANTS = {
    "qv-r8": {"r": 8, "alpha": 16, "targets": ("q_proj", "v_proj")},
    "all7-r4": {"r": 4, "alpha": 8, "targets": LORA_TARGETS, "seed": 1},
    "rslora": {"r": 16, "alpha": 8, "targets": ("q_proj", "k_proj", "o_proj"), "rslora": True, "seed": 2,
               "rank_pattern": {"o_proj": 4}, "alpha_pattern": {"layers.0.self_attn.k_proj": 2}},
    "patterns": {"r": 8, "alpha": 16, "targets": ("q_proj", "v_proj", "down_proj"), "seed": 3,
                 "rank_pattern": {"layers.1.self_attn.q_proj": 2, "down_proj": 12},
                 "alpha_pattern": {"v_proj": 3, "model.layers.0.mlp.down_proj": 40}},
    "layers": {"r": 4, "alpha": 4, "targets": ("gate_proj", "up_proj"), "layers_to_transform": [0, 5, 29], "seed": 4},
    "regex": {"r": 2, "alpha": 5, "targets": r"model\.layers\.(3|7)\.self_attn\.(k|o)_proj", "seed": 5},
    "all-linear-excl": {"r": 2, "alpha": 2, "targets": "all-linear", "exclude_modules": ["o_proj"], "seed": 6},
}


@pytest.mark.parametrize("name", LORA_VARIANTS)
def test_lora_variant_matches_peft(name, registry, spec, base_model_dir, tmp_path):
    path = make_lora_adapter(base_model_dir, tmp_path / name, **LORA_VARIANTS[name])
    oracle = load_peft_model(base_model_dir, path)
    info = registry.register(name, path)
    lease = registry.acquire(name)
    assert lease is not None and lease.kind == "lora"
    s, st = lease.slot, registry.stacks
    gen = torch.Generator().manual_seed(0)
    adapted = 0
    for layer in range(spec.num_layers):
        for m in LORA_TARGETS:
            mod = _peft_module(oracle, layer, m)
            A, B = st.A[layer][m][s], st.B[layer][m][s]    # the slots hold scale * lora_B
            if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
                assert not A.any() and not B.any(), (layer, m)
                continue
            adapted += 1
            pa, pb = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            r = pa.shape[0]
            assert torch.equal(A[:r], pa) and not A[r:].any(), (layer, m)
            torch.testing.assert_close(B[:, :r], pb * mod.scaling["default"], rtol=1e-6, atol=0)
            assert not B[:, r:].any(), (layer, m)
            # The effective update, as the kernels compute it (zero padding included) vs peft's forward.
            x = torch.randn(3, A.shape[1], generator=gen)
            with torch.no_grad():
                theirs = mod(x) - mod.base_layer(x)
            ours = (x @ A.T) @ B.T
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)  # theirs: a difference of large outputs
            assert ours.abs().max() > 0
            if layer in (0, 1):  # the full delta too, where rank_pattern / alpha_pattern bite
                torch.testing.assert_close(B @ A, mod.get_delta_weight("default"), rtol=1e-5, atol=1e-7)
    assert adapted > 0
    assert info.rank == max(r for r in [LORA_VARIANTS[name]["r"],
                                        *(LORA_VARIANTS[name].get("rank_pattern") or {}).values()])
    registry.release(lease)


def test_lora_changes_the_output(base_model_dir, hf_model_fp32, tmp_path, tokenizer):
    """The factory's default adapter visibly changes greedy predictions (non-vacuous for the engine)."""
    path = make_lora_adapter(base_model_dir, tmp_path / "a", targets=LORA_TARGETS)
    ids = tokenizer("The capital of France is a city called", return_tensors="pt").input_ids
    with torch.no_grad():
        base = hf_model_fp32(ids).logits
        tuned = load_peft_model(base_model_dir, path)(input_ids=ids).logits
    assert (base - tuned).abs().max() > 1.0


def _cache_kv(cache, num_layers: int) -> torch.Tensor:
    """DynamicCache from peft's get_prompt(1) -> (L, 2, n_virt, heads, head_dim)."""
    return torch.stack([torch.stack([cache.layers[i].keys[0], cache.layers[i].values[0]])
                        for i in range(num_layers)]).transpose(2, 3)


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_matches_peft_get_prompt(projection, registry, spec, base_model_dir, hf_model_fp32, tmp_path):
    from transformers import DynamicCache

    n = 5 if projection else 8
    path, trained = make_prefix_adapter(base_model_dir, tmp_path / "p", num_virtual_tokens=n,
                                        prefix_projection=projection, encoder_hidden_size=32, seed=7,
                                        return_model=True)
    oracle = load_peft_model(base_model_dir, path)
    name = f"prefix-{projection}"
    info = registry.register(name, path)
    assert (info.type, info.num_virtual_tokens, info.rank, info.targets) == ("prefix", n, 0, ())
    lease = registry.acquire(name)
    kv = lease.prefix_kv
    assert lease.slot == -1 and kv.dtype == torch.float32
    assert kv.shape == (spec.num_layers, 2, n, spec.num_kv_heads, spec.head_dim)  # GQA: KV heads (3), not 9
    with torch.no_grad():
        expected = _cache_kv(oracle.get_prompt(1), spec.num_layers)
        before_save = _cache_kv(trained.get_prompt(1), spec.num_layers)
    assert torch.equal(kv, expected)
    torch.testing.assert_close(kv, before_save)  # with projection: the MLP output, as trained
    assert kv.abs().max() > 0

    # What the engine must reproduce: the prefix is raw post-RoPE K/V in front of the prompt,
    # and the prompt's positions start at n (not 0), as in peft's forward.
    ids = torch.tensor([[1, 504, 3458, 314, 4649, 314]])
    t = ids.shape[1]
    with torch.no_grad():
        want = oracle(input_ids=ids, attention_mask=torch.ones(1, t)).logits

        def ours(positions):
            cache = DynamicCache()
            for layer in range(spec.num_layers):
                cache.update(kv[layer, 0].transpose(0, 1)[None], kv[layer, 1].transpose(0, 1)[None], layer)
            return hf_model_fp32(input_ids=ids, past_key_values=cache, attention_mask=torch.ones(1, n + t),
                                 position_ids=positions[None]).logits

        torch.testing.assert_close(ours(torch.arange(n, n + t)), want, rtol=1e-4, atol=1e-4)
        assert (ours(torch.arange(t)) - want).abs().max() > 1e-3
    registry.release(lease)


# -- refusals of real peft saves -------------------------------------------------------------------
def _tiny_llama_lora(out_dir):
    """A LoRA for a Llama of another shape (hidden 64, 2 layers): random weights, no download."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(out_dir)
    return out_dir


def _ia3(base_model_dir, out_dir):
    from peft import IA3Config, get_peft_model

    from tests.adapter_factory import fresh_base_model

    model = get_peft_model(fresh_base_model(base_model_dir),
                           IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"]))
    model.save_pretrained(out_dir)
    return out_dir


def _pickle_save(base_model_dir, out_dir):
    from peft import LoraConfig, get_peft_model

    from tests.adapter_factory import fresh_base_model

    model = get_peft_model(fresh_base_model(base_model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(out_dir, safe_serialization=False)
    return out_dir


REAL_REFUSALS = {
    "embed": (lambda d, o: make_lora_adapter(d, o, r=2, targets=("embed_tokens", "q_proj")), "embed_tokens"),
    "modules_to_save": (lambda d, o: make_lora_adapter(d, o, r=2, modules_to_save=["lm_head"]), "modules_to_save"),
    "pattern-rank": (lambda d, o: make_lora_adapter(d, o, r=2, rank_pattern={"layers.3.self_attn.v_proj": 32}),
                     "rank 32 (module model.layers.3.self_attn.v_proj)"),
    "other-shape": (lambda d, o: _tiny_llama_lora(o), "dimension mismatch"),
    "ia3": (_ia3, "peft_type 'IA3'"),
    "pickle": (_pickle_save, "never unpickles"),
}


@pytest.mark.parametrize("name", REAL_REFUSALS)
def test_real_refusals(name, registry, base_model_dir, tmp_path):
    make, words = REAL_REFUSALS[name]
    path = make(base_model_dir, tmp_path / name)
    before = [i.id for i in registry.list()], sorted(p.name for p in (registry.config.data_dir / "adapters").iterdir())
    with pytest.raises(AdapterError) as e:
        registry.register(name, path)
    assert e.value.status == 400 and words in e.value.message, e.value.message
    after = [i.id for i in registry.list()], sorted(p.name for p in (registry.config.data_dir / "adapters").iterdir())
    assert after == before
