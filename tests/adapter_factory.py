"""Adapters for tests: real peft-saved ones made from the embedded model, and tiny synthetic ones.

Real adapters (`make_lora_adapter`, `make_prefix_adapter`) go through peft itself
(`get_peft_model` + `save_pretrained`), so the files are exactly what users will bring. Their
weights are random and non-zero (seeded): peft initializes lora_B to zero, which would make every
LoRA a no-op and every comparison vacuous. `load_peft_model` gives the oracle: peft's own
`PeftModel.from_pretrained` on a fresh copy of the base model.

Synthetic adapters (`write_lora_files`, `write_prefix_files`) need neither peft nor the model:
they write the two files for any ModelSpec, for fast unit tests of the registry.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import save_file

from loramux.engine.models.spec import LORA_TARGETS, ModelSpec

# A model shape small enough that the registry's unit tests allocate almost nothing.
TINY_SPEC = ModelSpec(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                      head_dim=16, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False)

_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


# -- real peft adapters --------------------------------------------------------------------------
@lru_cache(maxsize=2)
def _cached_base_model(base_model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()


def fresh_base_model(base_model_dir: Path):
    """A private copy of the base model's module tree (peft wraps modules in place, so never share
    one) whose weight tensors are shared with the cached model: peft's LoRA and prefix tuning
    leave base weights untouched, and copying 0.5 GB per adapter would dominate test time."""
    model = _cached_base_model(str(base_model_dir))
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo=shared)


def _save(peft_model, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)  # safetensors by default
    return out_dir


def make_lora_adapter(base_model_dir: Path, out_dir: Path, *, r: int = 8, alpha: float = 16,
                      targets: Sequence[str] | str = ("q_proj", "v_proj"), rslora: bool = False,
                      rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                      layers_to_transform: list[int] | None = None, seed: int = 0, b_std: float = 0.02,
                      magnitude_std: float = 0.0, **lora_kwargs) -> Path:
    """Save a peft LoRA adapter of the embedded model with seeded random A and non-zero B.

    A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (peft's Kaiming-style scale), B ~ N(0, b_std): enough to
    change greedy tokens, small enough to stay a plausible fine-tune. Extra kwargs go to LoraConfig
    (`use_dora=True`: peft sets each magnitude vector to the base weight's row norms, and
    `magnitude_std` then scales its entries by 1 + N(0, magnitude_std), as training moves them).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets) if not isinstance(targets, str)
                        else targets, use_rslora=rslora, rank_pattern=rank_pattern or {},
                        alpha_pattern=alpha_pattern or {}, layers_to_transform=layers_to_transform,
                        lora_dropout=0.0, task_type="CAUSAL_LM", **lora_kwargs)
    torch.manual_seed(seed)
    model = get_peft_model(fresh_base_model(base_model_dir), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(p.shape[1])
                p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)
            elif ".lora_magnitude_vector." in name and magnitude_std:
                p.mul_(1 + torch.randn(p.shape, generator=gen) * magnitude_std)
    return _save(model, out_dir)


def strip_dora(dora_dir: Path, out_dir: Path) -> Path:
    """The plain LoRA adapter with a DoRA adapter's A and B (use_dora off, magnitudes dropped)."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(dora_dir) / "adapter_config.json").read_text())
    (out_dir / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    tensors = load_file(str(Path(dora_dir) / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "lora_magnitude_vector" not in k},
              str(out_dir / "adapter_model.safetensors"))
    return out_dir


def make_prefix_adapter(base_model_dir: Path, out_dir: Path, *, num_virtual_tokens: int = 8,
                        prefix_projection: bool = False, encoder_hidden_size: int | None = None,
                        seed: int = 0, std: float = 1.0, return_model: bool = False):
    """Save a peft prefix-tuning adapter with seeded random (non-zero) prompt embeddings.

    With `prefix_projection` peft saves the MLP's output, not the embedding. `return_model=True` also returns the in-memory PeftModel (for comparing `get_prompt`).
    """
    from peft import PrefixTuningConfig, get_peft_model

    kwargs = {"encoder_hidden_size": encoder_hidden_size} if encoder_hidden_size else {}
    config = PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, prefix_projection=prefix_projection,
                                task_type="CAUSAL_LM", **kwargs)
    torch.manual_seed(seed)
    model = get_peft_model(fresh_base_model(base_model_dir), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the MLP (if any) keeps peft's seeded default init: random, non-zero
        for emb in model.prompt_encoder.values():
            emb.embedding.weight.copy_(torch.randn(emb.embedding.weight.shape, generator=gen) * std)
    path = _save(model, out_dir)
    return (path, model.eval()) if return_model else path


def load_peft_model(base_model_dir: Path, adapter_dir: Path):
    """The oracle: peft's PeftModel.from_pretrained on a fresh copy of the base model (eval)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(fresh_base_model(base_model_dir), str(adapter_dir)).eval()


# -- synthetic adapters (no peft, no model) ------------------------------------------------------
def _lora_key(layer: int, module: str, which: str) -> str:
    return f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}.lora_{which}.weight"


def _magnitude_key(layer: int, module: str) -> str:
    return f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}.lora_magnitude_vector"


def tiny_base(spec: ModelSpec = TINY_SPEC, seed: int = 0):
    """A LlamaModel of `spec` with random dense projections: the base weights a registry's DoRA
    factors are computed from, for unit tests without the real model."""
    from loramux.engine.linear import DenseLinear
    from loramux.engine.models.llama import PROJECTIONS, LlamaModel
    from loramux.engine.models.spec import SHRINK_GROUPS

    gen = torch.Generator().manual_seed(seed)
    model = LlamaModel(spec, max_positions=16)
    for layer in model.layers:
        for attr, group in zip(PROJECTIONS, SHRINK_GROUPS):
            d_in = spec.lora_dims(group[0])[0]
            d_out = sum(spec.lora_dims(m)[1] for m in group)
            setattr(layer, attr, DenseLinear(torch.randn(d_out, d_in, generator=gen) * d_in ** -0.5))
    return model


def write_lora_files(out_dir: Path, spec: ModelSpec = TINY_SPEC, *, r: int = 4, alpha: float = 8,
                     targets: Iterable[str] = ("q_proj", "v_proj"), rslora: bool = False, seed: int = 0,
                     dtype: torch.dtype = torch.float32, config: dict | None = None,
                     tensors: dict[str, torch.Tensor] | None = None, drop: Iterable[str] = (),
                     init: str = "unit", dora: bool = False) -> Path:
    """A peft-format LoRA folder for `spec`, every layer adapted. `config` entries override
    adapter_config.json, `tensors` add/replace tensors, `drop` removes tensors by key. `init`:
    "unit" draws N(0, 1) weights; "served" scales them (A by 1/sqrt(d_in), B by 0.3) so that a
    real model's answers change without turning to noise. `dora`: a DoRA adapter, magnitudes
    U(0.5, 1.5) (a real one's are row norms of the base weight it was trained on)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = list(targets)
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(spec.num_layers):
        for m in (t for t in targets if t in LORA_TARGETS):  # other names: config only
            d_in, d_out = spec.lora_dims(m)
            a_std, b_std = (d_in ** -0.5, 0.3) if init == "served" else (1.0, 1.0)
            weights[_lora_key(layer, m, "A")] = (torch.randn(r, d_in, generator=gen) * a_std).to(dtype)
            weights[_lora_key(layer, m, "B")] = (torch.randn(d_out, r, generator=gen) * b_std).to(dtype)
            if dora:
                weights[_magnitude_key(layer, m)] = (0.5 + torch.rand(d_out, generator=gen)).to(dtype)
    weights.update(tensors or {})
    for key in drop:
        weights.pop(key)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "target_modules": targets,
           "bias": "none", "use_rslora": rslora, "use_dora": dora, "modules_to_save": None,
           "rank_pattern": {}, "alpha_pattern": {}, "lora_dropout": 0.0, "fan_in_fan_out": False,
           "inference_mode": True, **(config or {})}
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(weights, str(out_dir / "adapter_model.safetensors"))
    return out_dir


def write_small_lora(out_dir: Path, spec: ModelSpec, seed: int, r: int = 2,
                     targets: Iterable[str] = ("q_proj", "v_proj")) -> Path:
    """A LoRA for serving tests and benchmarks on the real model: alpha = 2r, "served" weights."""
    return write_lora_files(out_dir, spec, r=r, alpha=2 * r, targets=targets, seed=seed, init="served")


def write_prefix_files(out_dir: Path, spec: ModelSpec = TINY_SPEC, *, num_virtual_tokens: int = 4,
                       seed: int = 0, config: dict | None = None) -> Path:
    """A peft-format prefix-tuning folder for `spec` (GQA-sized as peft does)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    token_dim = spec.num_kv_heads * spec.head_dim
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(num_virtual_tokens, spec.num_layers * 2 * token_dim, generator=gen)
    cfg = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": num_virtual_tokens,
           "num_layers": spec.num_layers, "num_attention_heads": spec.num_kv_heads, "token_dim": token_dim,
           "encoder_hidden_size": token_dim, "num_transformer_submodules": 1, "prefix_projection": False,
           "inference_mode": True, **(config or {})}
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({"prompt_embeddings": emb}, str(out_dir / "adapter_model.safetensors"))
    return out_dir


def make_adapters(base_model_dir: Path, root: Path, specs: dict[str, dict]) -> dict[str, Path]:
    """Several real peft adapters at once: name -> {"kind": "lora" | "prefix", **maker kwargs}."""
    dirs = {}
    for name, spec in specs.items():
        spec = dict(spec)
        make = make_lora_adapter if spec.pop("kind") == "lora" else make_prefix_adapter
        dirs[name] = make(base_model_dir, root / name, **spec)
    return dirs
