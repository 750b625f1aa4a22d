"""Argument checks shared by the twins (``torch_ops``, ``triton_ops``): the same calls fail the same
way whichever path runs, and before any kernel launch."""
from __future__ import annotations

import torch

from loramux.kernels.mapping import LoraMapping


def check_operands(a: torch.Tensor, stack: torch.Tensor, m: LoraMapping) -> None:
    """Shapes, devices and dtypes of one op call: a (T, k) against stack (S, ., k) and mapping."""
    if a.dim() != 2 or stack.dim() != 3:
        raise ValueError(f"expected a 2-D input and a 3-D stack, got {tuple(a.shape)} and {tuple(stack.shape)}")
    if a.device != stack.device or m.device != a.device:
        raise ValueError(f"input on {a.device}, stack on {stack.device}, mapping on {m.device}")
    if a.shape[1] != stack.shape[2]:
        raise ValueError(f"input {tuple(a.shape)} does not match stack {tuple(stack.shape)}")
    if stack.dtype not in (a.dtype, torch.float32):
        raise TypeError(f"stack dtype {stack.dtype} must be the input's ({a.dtype}) or float32")
    m.check(a.shape[0], stack.shape[0])


def check_output(y: torch.Tensor, t: torch.Tensor, y_offset: int, d_out: int) -> None:
    """An expand's output: d_out columns at y_offset of y, one row per token of t, t's dtype and device."""
    if y.dim() != 2 or y.shape[0] != t.shape[0] or not 0 <= y_offset <= y.shape[1] - d_out:
        raise ValueError(f"y {tuple(y.shape)} cannot take {d_out} columns at offset {y_offset} "
                         f"for {t.shape[0]} tokens")
    if y.dtype != t.dtype or y.device != t.device:
        raise TypeError(f"y is {y.dtype} on {y.device}, t is {t.dtype} on {t.device}")


def check_scale_rows(y: torch.Tensor, factors: torch.Tensor, m: LoraMapping, y_offset: int) -> None:
    """A row scaling: factors (S, d) float32 for the d columns of y (T, .) at y_offset, same device."""
    if y.dim() != 2 or factors.dim() != 2:
        raise ValueError(f"expected a 2-D y and 2-D factors, got {tuple(y.shape)} and {tuple(factors.shape)}")
    if factors.dtype != torch.float32:
        raise TypeError(f"factors must be float32, got {factors.dtype}")
    if y.device != factors.device or m.device != y.device:
        raise ValueError(f"y on {y.device}, factors on {factors.device}, mapping on {m.device}")
    if not 0 <= y_offset <= y.shape[1] - factors.shape[1]:
        raise ValueError(f"y {tuple(y.shape)} cannot take {factors.shape[1]} columns at offset {y_offset}")
    m.check(y.shape[0], factors.shape[0])
