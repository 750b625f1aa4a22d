"""peft LoRA adapters: config checks, key parsing, per-module rank/alpha/scale, weights.

peft computes, per adapted module, `y = base(x) + scale * B(A(x))` with
`scale = alpha / r` (or `alpha / sqrt(r)` with `use_rslora`), where r and alpha come from
`rank_pattern` / `alpha_pattern` when a pattern matches the module's name, else from `r` /
`lora_alpha`. Saved keys look like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` with A [r, d_in], B [d_out, r].
Everything that would make peft compute something else is refused here, by name.

DoRA (`use_dora`) adds, per module, `...<module>.lora_magnitude_vector` m [d_out]: peft then computes
`m / ||W + scale * B A||_row * (x W^T + scale * x A^T B^T)` (adapters_registry/dora.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramux.engine.models.spec import LORA_TARGETS, ModelSpec

from .adapter_files import TensorInfo, read_tensors
from .errors import BAD_REQUEST, AdapterError
from .peft_targets import checkpoint_modules, module_key, parse_module_key, pattern_value, targeted_modules

KEY_PREFIX = "base_model.model."

# LoraConfig options that change what the adapter computes (variants, extra trainable pieces) or
# that assume base weights other than ours. Any truthy value is refused, naming the option.
_UNSUPPORTED_OPTIONS = {
    "lora_bias": "LoRA bias terms (lora_bias) are not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "layer_replication": "layer_replication is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
}
# LoraConfig options that are harmless at inference (training knobs, init-only, bookkeeping).
_KNOWN_OPTIONS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
    "fan_in_fan_out", "bias", "use_rslora", "use_dora", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "qalora_group_size", "runtime_config", "ensure_weight_tying",
    *_UNSUPPORTED_OPTIONS,
}
# init_lora_weights values that also rewrite the *base* weights (peft redoes that on load), so the
# adapter only works on a base model we do not have.
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")


@dataclass(frozen=True)
class LoraModule:
    layer: int
    module: str
    rank: int
    alpha: float
    scale: float  # what multiplies B @ A for this module
    # A fused checkpoint projection (Phi-3's qkv_proj) adapts several of ours: each has the file's
    # A and its rows of B (and of DoRA's magnitudes), source naming the file's module.
    source: str | None = None
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class LoraManifest:
    """Everything about a LoRA adapter but its weights: checked from config + safetensors header."""
    rank: int            # the largest per-module rank
    alpha: float         # the config's lora_alpha (alpha_pattern may override per module)
    use_rslora: bool
    targets: tuple[str, ...]
    modules: tuple[LoraModule, ...]
    kind: str = "lora"
    use_dora: bool = False  # a DoRA adapter: every module also has a magnitude vector


@dataclass(frozen=True)
class LoraWeights:
    """Parsed weights on the host: per (layer, module), A [r, d_in] and B [d_out, r], file dtype.
    DoRA: also the magnitudes m [d_out] (file dtype) and, once the base weights are known, the
    factors m / ||W + scale * B A|| [d_out] float32 the slots hold (see adapters_registry.dora)."""
    manifest: LoraManifest
    A: dict[tuple[int, str], torch.Tensor]
    B: dict[tuple[int, str], torch.Tensor]
    magnitude: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    dora_factors: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for d in (self.A, self.B, self.magnitude, self.dora_factors) for t in d.values())


def weight_key(layer: int, module: str, which: str) -> str:
    """Saved name of lora_A / lora_B ("A", "B"), or of DoRA's magnitude vector ("magnitude")."""
    if which == "magnitude":
        return f"{KEY_PREFIX}{module_key(layer, module)}.lora_magnitude_vector"
    return f"{KEY_PREFIX}{module_key(layer, module)}.lora_{which}.weight"


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterError(BAD_REQUEST, f"{what} must be a positive integer, got {value!r}")
    return value


def _finite_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(BAD_REQUEST, f"{what} must be a finite number, got {value!r}")
    return float(value)


def _check_options(config: dict) -> None:
    for name, reason in _UNSUPPORTED_OPTIONS.items():
        if config.get(name):
            raise AdapterError(BAD_REQUEST, reason)
    unknown = sorted(k for k, v in config.items() if k not in _KNOWN_OPTIONS and v)
    if unknown:
        raise AdapterError(BAD_REQUEST, f"unrecognized LoRA option(s) {', '.join(unknown)} (from a newer peft?)")
    if (config.get("bias") or "none") != "none":
        raise AdapterError(BAD_REQUEST, f"bias={config['bias']!r} is not supported (only bias='none')")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterError(BAD_REQUEST, f"init_lora_weights={init!r} rewrites the base weights, which loramux "
                                        f"serves unchanged: convert it to a plain LoRA adapter first")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            raise AdapterError(BAD_REQUEST, f"{name} must be a mapping")
    # fan_in_fan_out only matters for GPT-2 style Conv1D; peft forces it off for nn.Linear, and the
    # shape checks below catch a transposed save.


def inspect_lora(config: dict, header: dict[str, TensorInfo], spec: ModelSpec, max_rank: int) -> LoraManifest:
    """Validate a LoRA adapter from its config and safetensors header (no weight data read)."""
    _check_options(config)
    r = _positive_int(config.get("r", 8), "r")
    alpha = _finite_number(config.get("lora_alpha", 8), "lora_alpha")
    rslora = bool(config.get("use_rslora", False))
    dora = bool(config.get("use_dora", False))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    modules, expected, covers = [], {}, checkpoint_modules(spec)
    for layer, name in targeted_modules(config, spec):
        key = module_key(layer, name)
        mr = _positive_int(pattern_value(rank_pattern, key, r), f"rank for {key}")
        ma = _finite_number(pattern_value(alpha_pattern, key, alpha), f"alpha for {key}")
        if mr > max_rank:
            raise AdapterError(BAD_REQUEST, f"LoRA rank {mr} (module {key}) exceeds the server's maximum "
                                            f"rank {max_rank}")
        scale = ma / math.sqrt(mr) if rslora else ma / mr
        at = 0
        for module in covers[name]:
            d_out = spec.lora_dims(module)[1]
            fused = covers[name] != (name,)
            modules.append(LoraModule(layer, module, mr, ma, scale, name if fused else None,
                                      (at, at + d_out) if fused else None))
            at += d_out
        d_in = spec.lora_dims(covers[name][0])[0]
        expected[weight_key(layer, name, "A")] = (mr, d_in)
        expected[weight_key(layer, name, "B")] = (at, mr)
        if dora:
            expected[weight_key(layer, name, "magnitude")] = (at,)
    for name, info in header.items():
        if name not in expected:
            raise AdapterError(BAD_REQUEST, _explain_unexpected(name, spec.num_layers))
        if info.shape != expected[name]:
            raise AdapterError(BAD_REQUEST, f"dimension mismatch for {name}: expected {list(expected[name])}, "
                                            f"got {list(info.shape)} (adapter made for another base model, "
                                            f"or rank differs from its config)")
    missing = sorted(set(expected) - set(header))
    magnitudes = [k for k in missing if k.endswith("lora_magnitude_vector")]
    if magnitudes:
        raise AdapterError(BAD_REQUEST, f"DoRA adapter (use_dora) without the magnitude vectors of "
                                        f"{len(magnitudes)} module(s), e.g. {magnitudes[0]}")
    if missing:
        raise AdapterError(BAD_REQUEST, f"weights missing for {len(missing)} targeted tensor(s), "
                                        f"e.g. {missing[0]} (incomplete adapter file)")
    return LoraManifest(
        rank=max(m.rank for m in modules), alpha=alpha, use_rslora=rslora,
        targets=tuple(t for t in LORA_TARGETS if any(m.module == t for m in modules)),
        modules=tuple(modules), use_dora=dora,
    )


def _explain_unexpected(name: str, num_layers: int) -> str:
    if "lora_magnitude_vector" in name:
        return f"tensor {name} is a DoRA magnitude vector, but the config does not set use_dora"
    if "lora_embedding" in name or "embed_tokens" in name or "lm_head" in name:
        return f"tensor {name} adapts the embeddings or LM head; loramux applies LoRA only to projections"
    if name.startswith(KEY_PREFIX) and ".lora_" in name:
        mod = name[len(KEY_PREFIX):].split(".lora_")[0]
        parsed = parse_module_key(mod)
        if parsed and parsed[0] >= num_layers:
            return f"tensor {name} is for layer {parsed[0]} but the base model has {num_layers} layers"
        return f"tensor {name} does not match the adapter's config or the base model's modules"
    return f"unexpected tensor {name} in a LoRA adapter (bias or modules_to_save weights are not supported)"


def load_lora(weights_path: Path, manifest: LoraManifest) -> LoraWeights:
    """Read the weights the manifest names (CPU, file dtype), refusing NaN/Inf. A DoRA adapter's
    factors need the base weights too: the registry adds them (adapters_registry.dora)."""
    parts = ("A", "B", "magnitude") if manifest.use_dora else ("A", "B")
    keys = {m: [weight_key(m.layer, m.source or m.module, p) for p in parts] for m in manifest.modules}
    tensors = read_tensors(weights_path, list(dict.fromkeys(k for names in keys.values() for k in names)))

    def rows(m: LoraModule, part: str, t: torch.Tensor) -> torch.Tensor:
        return t if m.rows is None or part == "A" else t[m.rows[0]:m.rows[1]].contiguous()

    pick = {p: {(m.layer, m.module): rows(m, p, tensors[names[i]]) for m, names in keys.items()}
            for i, p in enumerate(parts)}
    return LoraWeights(manifest, A=pick["A"], B=pick["B"], magnitude=pick.get("magnitude", {}))
