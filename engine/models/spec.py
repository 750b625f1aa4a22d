"""Shapes and per-architecture differences of a decoder base model: what the model implementation
(engine/models/llama.py) builds and what adapters are checked against.

`ModelSpec.from_config` reads an HF config.json through transformers' own config class (its defaults
and rope standardization are the spec); everything it cannot serve exactly is refused with one line
(`UnsupportedModel`). The spec itself is plain data, so another model source (a GGUF file's
metadata) can build it too.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# peft target-module names of the projections our model can apply LoRA to, in layer order.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Targets that read the same input, in LORA_TARGETS order: each group's LoRA runs one shrink.
SHRINK_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("o_proj",),
                                              ("gate_proj", "up_proj"), ("down_proj",))
# model_type -> HF architecture class served; their differences are the ModelSpec fields below.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# Rope types whose tables are fixed for every position we serve (dynamic NTK changes its tables only
# past max_position_embeddings, longrope past original_max_position_embeddings: the context is capped there).
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


class UnsupportedModel(ValueError):
    """A checkpoint config we cannot serve exactly; the message is one line naming what."""


@dataclass(frozen=True)
class Rope:
    """One rotary table: cos/sin = (cos, sin)(position * inv_freq) * attention_scaling over the first
    2 * len(inv_freq) dims of each head (the rest pass through)."""
    inv_freq: tuple[float, ...]              # float32 values, as transformers computes them
    attention_scaling: float = 1.0

    @classmethod
    def default(cls, theta: float, dim: int) -> Rope:
        import torch
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return cls(tuple(inv.tolist()))


@dataclass(frozen=True)
class ModelSpec:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int             # the longest context served exactly
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    model_type: str = "llama"
    qkv_bias: bool = False                   # q/k/v projections have a bias (Qwen2, attention_bias)
    o_bias: bool = False                     # o_proj has a bias (Llama attention_bias)
    mlp_bias: bool = False                   # gate/up/down have a bias (Llama mlp_bias)
    qk_norm: bool = False                    # per-head RMSNorm on q and k before rope (Qwen3, Gemma 3)
    norm_offset: float = 0.0                 # RMSNorm multiplies by (offset + weight): Gemma's 1 + w
    sandwich_norms: bool = False             # Gemma 3: norms after attention / before and after the MLP
    embed_scale: float = 1.0                 # embeddings multiplied by this (Gemma: sqrt(hidden_size))
    hidden_act: str = "silu"                 # gate activation: silu | gelu_tanh
    attn_scale: float = 0.0                  # softmax scale; 0: 1 / sqrt(head_dim)
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma)
    fused_checkpoint: bool = False           # checkpoint (and peft) names qkv_proj / gate_up_proj (Phi-3)
    ropes: tuple[Rope, ...] = ()             # distinct rotary tables; () = default from rope_theta
    layer_rope: tuple[int, ...] = ()         # per layer: index into ropes; () = all 0
    layer_window: tuple[int | None, ...] = field(default=())  # per layer: sliding window or None (full)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if not self.ropes:
            object.__setattr__(self, "ropes", (Rope.default(self.rope_theta, self.head_dim),))
        if not self.layer_rope:
            object.__setattr__(self, "layer_rope", (0,) * self.num_layers)
        if not self.layer_window:
            object.__setattr__(self, "layer_window", (None,) * self.num_layers)
        if not self.attn_scale:
            object.__setattr__(self, "attn_scale", 1.0 / math.sqrt(self.head_dim))
        if len(self.layer_rope) != self.num_layers or len(self.layer_window) != self.num_layers:
            raise ValueError("layer_rope and layer_window need one entry per layer")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise UnsupportedModel(f"activation {self.hidden_act!r} is not supported (silu, gelu_pytorch_tanh)")

    @property
    def windows(self) -> tuple[int, ...]:
        """The distinct sliding windows of the layers (an attention mask each)."""
        return tuple(sorted({w for w in self.layer_window if w is not None}))

    @classmethod
    def from_config(cls, config: dict) -> ModelSpec:
        from transformers import AutoConfig

        model_type = config.get("model_type")
        if model_type not in ARCHITECTURES:
            archs = config.get("architectures") or [model_type]
            raise UnsupportedModel(f"architecture {', '.join(map(str, archs))} is not supported; loramux serves "
                                   f"{', '.join(ARCHITECTURES.values())}")
        hf = AutoConfig.for_model(**config)
        return _from_hf(cls, hf, model_type)

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelSpec:
        return cls.from_config(json.loads((Path(model_dir) / "config.json").read_text()))

    def lora_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA-targetable projection."""
        d, q, kv, ff = (self.hidden_size, self.num_heads * self.head_dim,
                        self.num_kv_heads * self.head_dim, self.intermediate_size)
        return {
            "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d),
        }[module]

    def group_offsets(self, group: tuple[str, ...]) -> tuple[int, ...]:
        """Column offset of each module's output in the group's fused projection (q|k|v, gate|up)."""
        offsets, at = [], 0
        for module in group:
            offsets.append(at)
            at += self.lora_dims(module)[1]
        return tuple(offsets)


def _rope(hf, params: dict, layer_type: str | None, head_dim: int) -> tuple[Rope, int | None]:
    """The rotary table of one layer type, and the context it is exact up to (None: no cap)."""
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModel(f"rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    if rope_type == "default":
        return Rope.default(params["rope_theta"], dim), None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, None, **kwargs)
    cap = params["original_max_position_embeddings"] if rope_type == "longrope" else None
    return Rope(tuple(inv_freq.float().tolist()), float(scaling)), cap


def _from_hf(cls, hf, model_type: str) -> ModelSpec:
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    n = hf.num_hidden_layers
    gemma = model_type == "gemma3_text"
    for flag in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if getattr(hf, flag, None):
            raise UnsupportedModel(f"{model_type} with {flag}={getattr(hf, flag)!r} is not supported")
    act = (getattr(hf, "hidden_activation", None) if gemma else None) or getattr(hf, "hidden_act", "silu")
    if act not in ("silu", "gelu_pytorch_tanh"):
        raise UnsupportedModel(f"activation {act!r} is not supported (silu, gelu_pytorch_tanh)")
    # Per-layer types: Qwen2/3 and Gemma 3 say which layers slide; Mistral and Phi-3 slide everywhere
    # when sliding_window is set (transformers' own rule for each).
    window = getattr(hf, "sliding_window", None)
    types = list(getattr(hf, "layer_types", None) or ["full_attention"] * n)
    if model_type in ("mistral", "phi3"):
        types = ["sliding_attention" if window is not None else "full_attention"] * n
    if window is None:
        types = ["full_attention" if t == "sliding_attention" else t for t in types]
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UnsupportedModel(f"{model_type} layer type(s) {', '.join(unknown)} are not supported")
    layer_window = tuple(window if t == "sliding_attention" else None for t in types)

    params = hf.rope_parameters or {"rope_type": "default", "rope_theta": getattr(hf, "rope_theta", 10000.0)}
    nested = set(params) <= {"full_attention", "sliding_attention"}
    kinds = sorted(set(types)) if nested else [None]
    ropes, caps = [], []
    for kind in kinds:
        rope, cap = _rope(hf, params[kind] if kind else params, kind, head_dim)
        ropes.append(rope)
        caps.append(cap)
    layer_rope = tuple(kinds.index(t) if nested else 0 for t in types)
    max_pos = min([hf.max_position_embeddings] + [c for c in caps if c is not None])
    theta = (params[kinds[0]] if nested else params).get("rope_theta", 10000.0)
    # transformers' classes: Qwen2 has q/k/v biases always; attention_bias (q/k/v/o) where the class reads it
    bias = bool(getattr(hf, "attention_bias", False)) and model_type in ("llama", "qwen3", "gemma3_text")
    return cls(
        num_layers=n, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size, num_heads=heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads, head_dim=head_dim,
        vocab_size=hf.vocab_size, max_position_embeddings=max_pos, rms_norm_eps=hf.rms_norm_eps,
        rope_theta=float(theta), tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        model_type=model_type,
        qkv_bias=bias or model_type == "qwen2", o_bias=bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)) and model_type == "llama",
        qk_norm=model_type in ("qwen3", "gemma3_text"), norm_offset=1.0 if gemma else 0.0, sandwich_norms=gemma,
        embed_scale=hf.hidden_size ** 0.5 if gemma else 1.0,
        hidden_act="silu" if act == "silu" else "gelu_tanh",
        attn_scale=hf.query_pre_attn_scalar ** -0.5 if gemma else 0.0,
        final_logit_softcap=getattr(hf, "final_logit_softcapping", None),
        fused_checkpoint=model_type == "phi3",
        ropes=tuple(ropes), layer_rope=layer_rope, layer_window=layer_window,
    )
