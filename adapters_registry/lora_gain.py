"""Refuse LoRA adapters whose update can overflow the engine's dtype (issue #28: `lora_alpha: 1e308`,
or finite weights x 1e30, were served and turned every answer of theirs into NaN).

A module adds ``scale * x A^T B^T`` to a projection. Its gain, how much it can multiply the largest
entry of its input, is bounded by the row sums of absolute values, computed in float64 without
forming the (d_out, d_in) delta::

    shrink gain  max_i sum_k |A[i, k]|                       (x A^T, what the engine holds between the two)
    update gain  max_j sum_i |scale B[j, i]| sum_k |A[i, k]|  (>= the inf-norm of scale * B @ A)

Why the bound below: a layer's MLP multiplies three projections (gate and up, then down), so with
inputs below X an adapter of gain G can reach G^3 X^2 there. With X = 2^16 (hidden states of
today's models stay well below; they pass an RMSNorm before most projections) and float32's and
bfloat16's largest finite 2^128, G <= 2^32 keeps that chain finite. Trained adapters have gains
of order 1 to 10^4 (even N(0, 1) test weights on a 1536-wide projection: ~10^5).
"""
from __future__ import annotations

import torch

from .errors import BAD_REQUEST, AdapterError
from .peft_lora import LoraWeights
from .peft_targets import module_key

ACTIVATION_BOUND = 2.0 ** 16


def max_gain(dtype: torch.dtype) -> float:
    """The largest gain an adapter module may have in an engine of `dtype` (2^32 in float32 / bf16)."""
    return (torch.finfo(dtype).max / ACTIVATION_BOUND ** 2) ** (1 / 3)


def module_gains(A: torch.Tensor, B: torch.Tensor, scale: float) -> tuple[float, float]:
    """(shrink gain, update gain) of one module, A (r, d_in), B (d_out, r); inf if they overflow float64."""
    a_rows = A.double().abs().sum(1)                                        # (r,)
    update = (B.double().abs() * abs(scale)) @ a_rows                       # (d_out,)
    return float(a_rows.max()), float(update.max())


def check_gain(weights: LoraWeights, dtype: torch.dtype) -> None:
    """AdapterError(400) naming the first module whose gain exceeds max_gain(dtype)."""
    bound = max_gain(dtype)
    for m in weights.manifest.modules:
        key = (m.layer, m.module)
        shrink, update = module_gains(weights.A[key], weights.B[key], m.scale)
        for what, gain in (("scale * B @ A", update), ("A", shrink)):
            if not gain <= bound:                                           # also NaN
                raise AdapterError(BAD_REQUEST, (
                    f"module {module_key(*key)}: {what} can multiply its input by up to {gain:.3g} "
                    f"(lora_alpha {m.alpha:g}, r {m.rank}, scale {m.scale:.3g}), past the {bound:.3g} "
                    f"that {str(dtype).removeprefix('torch.')} holds without overflow: the adapter's weights "
                    f"or scale are far outside what training produces"))
