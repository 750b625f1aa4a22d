"""DoRA at inference: the per-output factor each DoRA module multiplies its projection by.

peft (0.21, ``tuners/lora/dora.py`` ``DoraLinearLayer``, eval mode: no dropout) adds to the base
output ``(f - 1) * (x W^T) + f * scale * (x A^T B^T)``, so a DoRA module computes

    y = f * (x W^T + scale * x A^T B^T)        f = m / ||W + scale * B A||   (row norms, detached)

with W the base weight *dequantized* (``dequantize_module_weight``: bitsandbytes' dequantize for a
4/8-bit base), ``scale`` the module's LoRA scale (alpha / r, or alpha / sqrt(r) with rslora) and m
the adapter's ``lora_magnitude_vector`` [d_out]. ``fan_in_fan_out`` only transposes Conv1D (GPT-2)
weights; peft turns it off for the nn.Linear projections loramux serves. f depends on nothing but
the adapter and the base, so it is computed once when the adapter's weights are read, here, and
the engine multiplies each token's fused projection output by its adapter's f (1 elsewhere) after
the LoRA expand (``kernels.lora_scale_rows``).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from loramux.engine.lora_slots import BaseWeights
from loramux.engine.models.spec import SHRINK_GROUPS, ModelSpec

from .errors import BAD_REQUEST, AdapterError
from .peft_lora import LoraWeights


@torch.no_grad()
def with_dora_factors(weights: LoraWeights, base: BaseWeights, spec: ModelSpec) -> LoraWeights:
    """`weights` with its DoRA factors f [d_out] float32 per (layer, module), from the base weights as
    the engine holds them. Float32 math, as peft on a float32 model (B A, then the row norms)."""
    scales = {(m.layer, m.module): m.scale for m in weights.manifest.modules}
    factors = {}
    for layer in range(spec.num_layers):
        for g, group in enumerate(SHRINK_GROUPS):
            modules = [m for m in group if (layer, m) in weights.magnitude]
            if not modules:
                continue
            fused = base.dequantized_weight(layer, g)                       # (sum of d_out, d_in) float32
            offsets = dict(zip(group, spec.group_offsets(group)))
            for module in modules:
                key, d_out = (layer, module), spec.lora_dims(module)[1]
                delta = weights.B[key].float() @ weights.A[key].float()   # (d_out, d_in)
                w = fused[offsets[module]:offsets[module] + d_out]
                f = weights.magnitude[key].float() / torch.linalg.norm(w + scales[key] * delta, dim=1)
                if not bool(torch.isfinite(f).all()):
                    raise AdapterError(BAD_REQUEST, f"DoRA module {module} of layer {layer}: a row of "
                                                    f"W + scale * B A is zero, its magnitude cannot be applied")
                factors[key] = f
    return replace(weights, dora_factors=factors)
