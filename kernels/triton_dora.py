"""Triton kernel of the DoRA row scaling (GPU): :func:`loramux.kernels.lora_scale_rows`.

Twin of ``kernels.torch_ops.lora_scale_rows``, under ``kernels.triton_ops``' conventions: one kernel
source, compiled for CUDA tensors and interpreted for CPU tensors (tests run it on this GPU-less
machine), masked blocks for any width, float32 math and one rounding to y's dtype.

Elementwise and memory-bound, so one gathered form serves prefill and decode alike: one program
per (token, block of columns) reads its token's slot and, for an adapter token, multiplies that
block of y by the slot's factors (a row of S x d floats, cached across the tokens sharing it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from loramux.kernels.checks import check_scale_rows
from loramux.kernels.mapping import LoraMapping, as_mapping
from loramux.kernels.triton_ops import _interpreting, _Kernel, _pow2


def _scale_rows_kernel(
    y_ptr, f_ptr, slots_ptr,
    d, y_offset,
    stride_yt, stride_yn, stride_fs, stride_fn,
    BLOCK_N: tl.constexpr,
):
    # grid (T, cdiv(d, BLOCK_N)); slot -1 programs exit without touching memory.
    tok = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    slot = tl.load(slots_ptr + tok).to(tl.int64)
    if slot >= 0:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < d
        f = tl.load(f_ptr + slot * stride_fs + offs_n * stride_fn, mask=mask_n, other=1.0)  # (BN,) float32
        y_ptrs = y_ptr + tok * stride_yt + (y_offset + offs_n) * stride_yn
        yv = tl.load(y_ptrs, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (yv * f).to(y_ptr.dtype.element_ty), mask=mask_n)


scale_rows_kernel = _Kernel(_scale_rows_kernel)


def lora_scale_rows(y: torch.Tensor, factors: torch.Tensor, mapping: LoraMapping | torch.Tensor,
                    y_offset: int = 0, *, block_n: int | None = None) -> None:
    """:func:`loramux.kernels.lora_scale_rows` in Triton."""
    m = as_mapping(mapping)
    check_scale_rows(y, factors, m, y_offset)
    if not m.any_lora:
        return
    d = factors.shape[1]
    block_n = block_n or _pow2(min(d, 4096 if _interpreting(y) else 1024))
    scale_rows_kernel[(y.shape[0], triton.cdiv(d, block_n))](
        y, factors, m.token_slots, d, y_offset, *y.stride(), *factors.stride(), BLOCK_N=block_n,
    )
