"""Plain float64 per-token reference of the LoRA ops: the oracle the tests compare against.

Deliberately the most literal reading of the semantics written in the public API
(:func:`loramux.kernels.lora_shrink`, :func:`loramux.kernels.lora_expand`,
:func:`loramux.kernels.lora_scale_rows`): one token at a time,
float64 throughout, never used on a serving path. The loops run in numpy: tiny single-threaded
matvecs, immune to the thread-pool stalls that hundreds of tiny multi-threaded torch ops hit on a
busy 2-core machine. Same arguments as the ops, but it returns float64 results instead of writing
in place, so tests can see the exact values before any rounding to the working dtype.
"""
from __future__ import annotations

import numpy as np
import torch


def _slots(mapping) -> list[int]:
    slots = getattr(mapping, "token_slots", mapping)
    return [int(s) for s in torch.as_tensor(slots).tolist()]


def _f64(a: torch.Tensor) -> np.ndarray:
    # One torch op at most (16-bit -> float32 is exact), then numpy: no per-token torch calls.
    a = a.detach().cpu()
    return (a if a.dtype == torch.float64 else a.float()).numpy().astype(np.float64)


def shrink_ref(x: torch.Tensor, A_stack: torch.Tensor, mapping, scale: torch.Tensor | None) -> torch.Tensor:
    """:func:`loramux.kernels.lora_shrink`, returning t in float64."""
    x64, a64 = _f64(x), _f64(A_stack)
    s64 = np.ones(A_stack.shape[0]) if scale is None else _f64(scale)
    t = np.zeros((x.shape[0], A_stack.shape[1]))
    for i, s in enumerate(_slots(mapping)):
        if s >= 0:
            t[i] = s64[s] * (a64[s] @ x64[i])
    return torch.from_numpy(t)


def expand_ref(t: torch.Tensor, B_stack: torch.Tensor, mapping, y: torch.Tensor, y_offset: int = 0) -> torch.Tensor:
    """:func:`loramux.kernels.lora_expand`, returning the new y in float64 (y is not modified)."""
    t64, b64, out = _f64(t), _f64(B_stack), _f64(y)
    d_out = B_stack.shape[1]
    for i, s in enumerate(_slots(mapping)):
        if s >= 0:
            out[i, y_offset:y_offset + d_out] += b64[s] @ t64[i]
    return torch.from_numpy(out)


def scale_rows_ref(y: torch.Tensor, factors: torch.Tensor, mapping, y_offset: int = 0) -> torch.Tensor:
    """:func:`loramux.kernels.lora_scale_rows`, returning the new y in float64 (y is not modified)."""
    f64, out = _f64(factors), _f64(y)
    d = factors.shape[1]
    for i, s in enumerate(_slots(mapping)):
        if s >= 0:
            out[i, y_offset:y_offset + d] *= f64[s]
    return torch.from_numpy(out)
