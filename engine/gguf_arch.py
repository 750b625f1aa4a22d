"""What a GGUF file's ``general.architecture`` means for us: its tensor names and what llama.cpp's
converter (convert_hf_to_gguf.py) did to the weights on the way in, undone as transformers' GGUF
loader (modeling_gguf_pytorch_utils.py) undoes it.

Served: llama (Llama 2; Llama 3.x, its llama3 rope read back from rope_freqs; Mistral, which llama.cpp writes as
"llama"), qwen2 (Qwen2 / 2.5: q/k/v biases), qwen3 (per-head q/k norms), phi3 (fused attn_qkv =
q|k|v rows and ffn_up = gate|up rows, as Phi-3's own qkv_proj / gate_up_proj) and gemma3 (text: four
norms a layer, q/k norms). What the converter changed:

    llama            q/k rows permuted for llama.cpp's rotary layout: un-permuted (codes and scales too)
    qwen2/qwen3/phi3 nothing (Qwen2Model, Qwen3Model, Phi3MiniModel write the HF tensors as they are)
    gemma3           every `*norm.weight` stored as 1 + w (Gemma3RMSNorm's scale): 1 is subtracted

An architecture is served when it has a row in ``ARCHS``, the HF config transformers reads from the
file is one our engine implements (engine.model_source.check_model_dir) and agrees with the file's
own metadata where transformers' reader fills a default instead (``config_disagreement``); the rest
are refused at start in one line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# GGUF tensor names of a Llama-layout decoder -> HF names (without the `model.` prefix);
# `{i}` is the layer.
LLAMA_TENSORS = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
}
QK_NORMS = {
    "blk.{i}.attn_q_norm.weight": "layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.self_attn.k_norm.weight",
}
QKV_BIASES = {f"blk.{{i}}.attn_{p}.bias": f"layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"}
# Phi-3: q|k|v in one tensor, gate|up in ffn_up (transformers' Phi3 names; the loader splits them)
PHI3_TENSORS = {k: v for k, v in LLAMA_TENSORS.items()
                if v.split(".")[-2] not in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}
PHI3_TENSORS |= {"blk.{i}.attn_qkv.weight": "layers.{i}.self_attn.qkv_proj.weight",
                 "blk.{i}.ffn_up.weight": "layers.{i}.mlp.gate_up_proj.weight"}
# Gemma 3: ffn_norm is the norm before the MLP; the norms after attention and the MLP are their own
GEMMA3_TENSORS = {**LLAMA_TENSORS, **QK_NORMS,
                  "blk.{i}.post_attention_norm.weight": "layers.{i}.post_attention_layernorm.weight",
                  "blk.{i}.ffn_norm.weight": "layers.{i}.pre_feedforward_layernorm.weight",
                  "blk.{i}.post_ffw_norm.weight": "layers.{i}.post_feedforward_layernorm.weight"}
# Rope tables stored as tensors: transformers' GGUF reader drops them and reads a default rope.
# Llama 3.x's rope_freqs is read back into its llama3 rope parameters (llama3_rope_parameters); a file
# holding any other (Phi-3 128k's longrope factors) is refused.
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
LLAMA3_ROPE_TENSOR = "rope_freqs.weight"
# Relative bound between the inverse frequencies served (transformers' llama3 function on the parameters
# read back) and llama.cpp's own (base^(-2i/d) / rope_freqs[i]): both are float32 formulas of the same
# numbers, a few ulps apart (measured <= 3e-7 on Llama 3.1 / 3.2 shapes).
LLAMA3_ROPE_RTOL = 1e-6


@dataclass(frozen=True)
class GGUFArch:
    permuted_qk: bool = False           # llama.cpp permuted q/k rows for its rotary layout (undo it)
    norm_shift: float = 0.0             # llama.cpp added this to every `*norm.weight` (subtract it)
    tensors: dict[str, str] = field(default_factory=lambda: dict(LLAMA_TENSORS))


# By the file's general.architecture. llama.cpp writes Mistral models as "llama" too (transformers
# reads those as model_type "mistral" only when general.name is exactly "mistral"); the HF config
# transformers builds from the metadata (engine.model_source) is what the engine checks and serves.
ARCHS = {
    "llama": GGUFArch(permuted_qk=True),
    "qwen2": GGUFArch(tensors={**LLAMA_TENSORS, **QKV_BIASES}),
    "qwen3": GGUFArch(tensors={**LLAMA_TENSORS, **QK_NORMS}),
    "phi3": GGUFArch(tensors=PHI3_TENSORS),
    "gemma3": GGUFArch(norm_shift=1.0, tensors=GEMMA3_TENSORS),
}
# Known to transformers' GGUF reader, not to our engine: named in the refusal.
NOT_YET = ("gemma2", "qwen2moe", "qwen3moe")


def config_disagreement(arch: str, meta: dict[str, object], config) -> str | None:
    """Where the HF config transformers built from a file (`config`) differs from what the file's
    metadata (`meta`: key without the `{arch}.` prefix -> value) says, i.e. where its reader filled in
    a config class default: that model is not the file's, and is refused. None when they agree.

    Checked: head_dim (Qwen3 reads key_length not at all: 128 always), the rotary dims
    (rope.dimension_count; Phi-3 / Phi-4-mini's partial rotary), Gemma 3's attention scale (llama.cpp
    scales by 1 / sqrt(key_length), transformers by query_pre_attn_scalar, 256 by default: the 27B
    differs) and a final logit softcap the reader drops."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if "attention.key_length" in meta and meta["attention.key_length"] != head_dim:
        return f"head_dim {meta['attention.key_length']} in the file, {head_dim} as transformers reads it"
    rope = config.rope_parameters or {}
    rope = rope.get("full_attention", rope)
    rotary = int(head_dim * rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0))
    if "rope.dimension_count" in meta and meta["rope.dimension_count"] != rotary:
        return f"{meta['rope.dimension_count']} rotary dims in the file, {rotary} as transformers reads it"
    if arch == "gemma3" and not math.isclose(config.query_pre_attn_scalar, head_dim):
        return (f"attention scale 1/sqrt({head_dim}) in llama.cpp, 1/sqrt({config.query_pre_attn_scalar}) "
                "as transformers reads the file")
    cap = meta.get("final_logit_softcapping")
    if cap is not None and cap != getattr(config, "final_logit_softcapping", None):
        return f"final logit softcapping {cap} in the file, dropped by transformers' reader"
    return None


def llama3_rope_parameters(factors: list[float], theta: float, dim: int) -> dict | None:
    """The llama3 rope parameters behind a Llama 3.x file's `rope_freqs` tensor, or None when its
    factors are not of that form.

    llama.cpp's converter writes, for each inverse frequency f_i = theta^(-2i/dim) with wavelength
    w_i = 2 pi / f_i: 1 where w_i < L / high, `factor` where w_i > L / low, else
    1 / ((1 - s) / factor + s) with s = (L / w_i - low) / (high - low) (L: original context). Only
    low / L and high / L are determined by the factors, so L is taken as 8192 (Llama 3.x's own) and
    the two bounds are read off the smooth part: a line in 1 / w_i through its points (two or more,
    as in every Llama 3.x file), else placed in the gaps between the classes. The caller checks the
    frequencies these parameters give against llama.cpp's (LLAMA3_ROPE_RTOL)."""
    import numpy as np
    import torch

    if len(factors) != dim // 2:
        return None
    f = np.asarray(factors, dtype=np.float64)
    inv = (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))).double().numpy()
    u = inv / (2 * math.pi)                                   # 1 / wavelength, decreasing in i
    factor = float(f.max())
    if factor <= 1.0 or np.any(f < 1.0 - 1e-6):
        return None
    ones, full = np.isclose(f, 1.0, rtol=1e-6), np.isclose(f, factor, rtol=1e-6)
    mid = ~(ones | full)
    s = (1.0 / f[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
    u_ones = u[ones].min() if ones.any() else u.max() * 4     # the slowest-rotating unscaled frequency
    u_full = u[full].max() if full.any() else u.min() / 4     # the fastest-rotating fully scaled one
    if mid.sum() >= 2:
        slope, icpt = np.polyfit(u[mid], s, 1)
        if slope <= 0:
            return None
        u_lo, u_hi = -icpt / slope, (1.0 - icpt) / slope
    elif mid.sum() == 1:
        u_hi = math.sqrt(u[mid][0] * u_ones)
        u_lo = (u[mid][0] - s[0] * u_hi) / (1.0 - s[0])
    else:
        u_lo, u_hi = u_full * (u_ones / u_full) ** (1 / 3), u_full * (u_ones / u_full) ** (2 / 3)
    if not 0 < u_lo < u_hi:
        return None
    context = 8192
    return {"rope_type": "llama3", "rope_theta": float(theta), "factor": factor,
            "low_freq_factor": float(u_lo * context), "high_freq_factor": float(u_hi * context),
            "original_max_position_embeddings": context}
