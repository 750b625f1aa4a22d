"""What transformers' GGUF reader leaves out of the HF config it builds from a file, read back from
the file; and where it fills in a class default the file contradicts, a refusal.

transformers reads a handful of metadata keys per architecture (integrations/ggml.py) and drops the
rest: Llama 3.x's rope (the `rope_freqs` tensor), Phi-3's longrope (`rope_factors_long/short`, the
original context, the attention factor), partial rotary and sliding window, Gemma 3 4B+'s linear rope
scaling of its global layers. Served from that config alone, those models would be wrong (llama.cpp
reads all of it), so `complete_config` writes each into the config in transformers' own terms; what
is still not the file's model after that (`disagreement`) is refused.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# Relative bound between the inverse frequencies served (transformers' rope function on the
# parameters read back) and llama.cpp's own from the same tensor: float32 formulas of the same numbers,
# a few ulps apart (measured <= 3e-7 on Llama 3.1 / 3.2 shapes).
ROPE_RTOL = 1e-6
LLAMA3_CONTEXT = 8192            # llama3's original context: only ratios to it are in the file (below)


def complete_config(arch: str, meta: dict[str, object], tensors: dict[str, np.ndarray], config) -> str | None:
    """Write into `config` (transformers' reading of the file) what it dropped: `meta` is the file's
    `{arch}.*` metadata without the prefix, `tensors` its rope tables (name -> float32 array). Returns
    why the file cannot be served exactly, or None."""
    if arch == "llama" and "rope_freqs.weight" in tensors:
        problem = _llama3_rope(tensors["rope_freqs.weight"], config)
        if problem:
            return problem
    if arch == "phi3":
        head_dim = _head_dim(config)
        if "rope.dimension_count" in meta:
            config.partial_rotary_factor = int(meta["rope.dimension_count"]) / head_dim
            config.rope_parameters["partial_rotary_factor"] = config.partial_rotary_factor
        window = int(meta.get("attention.sliding_window") or 0)    # 0: none (Phi-4's converter writes it so)
        config.sliding_window = window or None
        if tensors:
            problem = _phi3_longrope(meta, tensors, config)
            if problem:
                return problem
    if arch == "gemma3" and meta.get("rope.scaling.type", "none") == "linear":
        # llama.cpp scales the global layers only (its sliding layers: base 10000, scale 1), as transformers
        # applies a Gemma 3 checkpoint's rope_scaling to its full_attention layers
        factor = float(meta["rope.scaling.factor"])
        config.rope_parameters["full_attention"] = {**config.rope_parameters["full_attention"],
                                                    "rope_type": "linear", "factor": factor}
    return disagreement(arch, meta, config)


def disagreement(arch: str, meta: dict[str, object], config) -> str | None:
    """Where the completed config still differs from the file's metadata, i.e. where transformers'
    reader filled in a config class default: that model is not the file's. None when they agree.

    Checked: head_dim (Qwen3 reads key_length not at all: 128 always), the rotary dims
    (rope.dimension_count), Gemma 3's attention scale (llama.cpp scales by 1 / sqrt(key_length),
    transformers by query_pre_attn_scalar, 256 by default: the 27B differs) and a final logit softcap
    the reader drops."""
    head_dim = _head_dim(config)
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


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """theta^(-2i/dim) in float32 (engine.models.spec.Rope.default: as llama.cpp's converter and
    transformers compute it), as float64."""
    from loramux.engine.models.spec import Rope

    return torch.tensor(Rope.default(theta, dim).inv_freq, dtype=torch.float64)


def _check_rope(rope_type: str, config, want: torch.Tensor, attention: float, name: str) -> str | None:
    """The frequencies and attention factor transformers computes from the completed config == llama.cpp's."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    if inv.shape != want.shape or not torch.allclose(inv.double(), want, rtol=ROPE_RTOL, atol=0):
        return f"its {name} does not match {rope_type} rope scaling within {ROPE_RTOL}"
    if not math.isclose(scale, attention, rel_tol=ROPE_RTOL):
        return f"its rope attention factor {attention} is not {rope_type}'s {scale}"
    return None


def _llama3_rope(factors: np.ndarray, config) -> str | None:
    theta, dim = config.rope_parameters["rope_theta"], _head_dim(config)
    params = llama3_rope_parameters(factors.tolist(), theta, dim)
    if params is None:
        return f"its rope_freqs.weight ({factors.size} factors) is not Llama 3.x's llama3 rope scaling"
    config.rope_parameters = params
    return _check_rope("llama3", config, _default_inv_freq(theta, dim) / torch.from_numpy(factors).double(),
                       1.0, "rope_freqs.weight")


def _phi3_longrope(meta: dict[str, object], tensors: dict[str, np.ndarray], config) -> str | None:
    """Phi-3 128k / Phi-4-mini: longrope with the file's factors, original context and attention factor.
    The context served stops at the original one (engine.models.spec), where the short factors hold."""
    short, long = tensors.get("rope_factors_short.weight"), tensors.get("rope_factors_long.weight")
    original, attention = meta.get("rope.scaling.original_context_length"), meta.get("rope.scaling.attn_factor")
    if short is None or long is None or original is None or attention is None:   # the converter writes all four
        return ("its longrope needs rope_factors_short.weight, rope_factors_long.weight, "
                "rope.scaling.original_context_length and rope.scaling.attn_factor")
    config.rope_parameters = {**config.rope_parameters, "rope_type": "longrope", "short_factor": short.tolist(),
                              "long_factor": long.tolist(), "original_max_position_embeddings": int(original),
                              "attention_factor": float(attention)}
    dim = int(_head_dim(config) * config.rope_parameters.get("partial_rotary_factor", 1.0))
    want = _default_inv_freq(config.rope_parameters["rope_theta"], dim) / torch.from_numpy(short).double()
    return _check_rope("longrope", config, want, float(attention), "rope_factors_short.weight")


def llama3_rope_parameters(factors: list[float], theta: float, dim: int) -> dict | None:
    """The llama3 rope parameters behind a Llama 3.x file's `rope_freqs` tensor, or None when its
    factors are not of that form.

    llama.cpp's converter writes, for each inverse frequency f_i = theta^(-2i/dim) with wavelength
    w_i = 2 pi / f_i: 1 where w_i < L / high, `factor` where w_i > L / low, else
    1 / ((1 - s) / factor + s) with s = (L / w_i - low) / (high - low) (L: original context). Only
    low / L and high / L are determined by the factors, so L is taken as LLAMA3_CONTEXT and
    the two bounds are read off the smooth part: a line in 1 / w_i through its points (two or more,
    as in every Llama 3.x file), else placed in the gaps between the classes. The caller checks the
    frequencies these parameters give against llama.cpp's (ROPE_RTOL)."""
    if len(factors) != dim // 2:
        return None
    f = np.asarray(factors, dtype=np.float64)
    inv = _default_inv_freq(theta, dim).numpy()
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
    return {"rope_type": "llama3", "rope_theta": float(theta), "factor": factor,
            "low_freq_factor": float(u_lo * LLAMA3_CONTEXT), "high_freq_factor": float(u_hi * LLAMA3_CONTEXT),
            "original_max_position_embeddings": LLAMA3_CONTEXT}
