"""Triton LoRA kernels (GPU): segmented SGMV for prefill, gathered BGMV for decode.

Twin of ``kernels.torch_ops``: the semantics, shapes and dtypes are those of the public API
(:func:`loramux.kernels.lora_shrink`, :func:`loramux.kernels.lora_expand`). Each kernel is written once as a plain
function and wrapped twice: as a compiled ``JITFunction`` for CUDA tensors, and as Triton's
``InterpretedFunction`` for CPU tensors, so tests can run the very same kernel source on this
GPU-less machine without ``TRITON_INTERPRET=1`` having been set before triton was imported (with
it set, every launch goes through the interpreter).

* SGMV (segmented gather matrix-vector, after punica): tokens are grouped by adapter (the mapping's
  ``order`` / ``seg_*`` tables); one program owns a tile of BLOCK_M tokens of one segment and does
  a ``tl.dot`` against that adapter's weights, so the weights are read once per tile, not per token.
* BGMV (batched gather matrix-vector): one program per token (x a slice of the output), the slot
  read from ``token_slots``; no grouping needed, best when each adapter has ~1 token (decode).

Hidden sizes need not be powers of two (576, 1536, 100): every ``tl.arange`` has a power-of-two
block size and loads/stores are masked. Accumulation is float32; outputs round once to the
tensor dtype. Triton's interpreter cannot do arithmetic on bfloat16 (it stores it as uint16 and
multiplies bit patterns), so loaded tiles are upcast to float32 before elementwise math, and before
``tl.dot`` when interpreting (``UPCAST``); compiled GPU code keeps 16-bit ``tl.dot`` operands.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from loramux.kernels.checks import check_operands, check_output
from loramux.kernels.mapping import LoraMapping, as_mapping

# Kernels use builtins only (tl.full, tl.reduce, tl.dot, ...), never triton's own @jit helpers
# (tl.zeros, tl.sum): those are compiled-only objects unless TRITON_INTERPRET was set before triton
# was imported, and would break the interpreted twin. ``tl.reduce`` with triton's sum combiner is
# exactly what ``tl.sum`` lowers to, and the interpreter maps it onto numpy.sum.
_SUM = tl.standard._sum_combine


def _sgmv_shrink_kernel(
    x_ptr, a_ptr, scale_ptr, t_ptr, order_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    d_in, rank,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_tt, stride_tr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    # grid (G segments, cdiv(max_seg_len, BLOCK_M)); t rows of slot -1 tokens are zeroed by the host.
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    seg_len = tl.load(seg_len_ptr + seg)
    if pid_m * BLOCK_M < seg_len:  # shorter segments leave their tail programs idle
        slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
        start = tl.load(seg_start_ptr + seg)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_len
        tok = tl.load(order_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)  # (BM,)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            k = k0 + offs_k
            mask_k = k < d_in
            xt = tl.load(x_ptr + tok[:, None] * stride_xt + k[None, :] * stride_xk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BM, BK)
            at = tl.load(a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + k[:, None] * stride_ak,
                         mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # (BK, BR) = A[slot].T tile
            if UPCAST:
                xt = xt.to(tl.float32)
                at = at.to(tl.float32)
            else:
                xt = xt.to(at.dtype)  # float32 stacks with 16-bit activations: dot in float32
            acc = tl.dot(xt, at, acc, input_precision="ieee")
        acc = acc * tl.load(scale_ptr + slot)
        tl.store(t_ptr + tok[:, None] * stride_tt + offs_r[None, :] * stride_tr,
                 acc.to(t_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


def _sgmv_expand_kernel(
    t_ptr, b_ptr, y_ptr, order_ptr, seg_slot_ptr, seg_start_ptr, seg_len_ptr,
    d_out, rank, y_offset,
    stride_tt, stride_tr, stride_bs, stride_bn, stride_br, stride_yt, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
):
    # grid (G segments, cdiv(max_seg_len, BLOCK_M), cdiv(d_out, BLOCK_N)); each y element has one owner.
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    seg_len = tl.load(seg_len_ptr + seg)
    if pid_m * BLOCK_M < seg_len:
        slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
        start = tl.load(seg_start_ptr + seg)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_len
        tok = tl.load(order_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)  # (BM,)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < d_out
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        tt = tl.load(t_ptr + tok[:, None] * stride_tt + offs_r[None, :] * stride_tr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # (BM, BR)
        bt = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # (BR, BN) = B[slot].T tile
        if UPCAST:
            tt = tt.to(tl.float32)
            bt = bt.to(tl.float32)
        else:
            tt = tt.to(bt.dtype)
        acc = tl.dot(tt, bt, input_precision="ieee", out_dtype=tl.float32)  # (BM, BN)
        y_ptrs = y_ptr + tok[:, None] * stride_yt + (y_offset + offs_n[None, :]) * stride_yn
        mask = mask_m[:, None] & mask_n[None, :]
        acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _bgmv_shrink_kernel(
    x_ptr, a_ptr, scale_ptr, t_ptr, slots_ptr,
    d_in, rank,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_tt, stride_tr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # grid (T, SPLIT_K). SPLIT_K > 1: partial sums atomically added into a zeroed float32 t.
    tok = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    slot = tl.load(slots_ptr + tok).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    t_ptrs = t_ptr + tok * stride_tt + offs_r * stride_tr
    if slot >= 0:
        offs_k = tl.arange(0, BLOCK_K)
        acc2 = tl.full((BLOCK_R, BLOCK_K), 0.0, tl.float32)  # reduced over K once, after the loop
        for k0 in range(pid_k * BLOCK_K, d_in, BLOCK_K * SPLIT_K):
            k = k0 + offs_k
            mask_k = k < d_in
            xk = tl.load(x_ptr + tok * stride_xt + k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
            ak = tl.load(a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + k[None, :] * stride_ak,
                         mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)  # (BR, BK)
            acc2 += ak * xk[None, :]
        acc = tl.reduce(acc2, 1, _SUM) * tl.load(scale_ptr + slot)  # (BR,)
        if SPLIT_K == 1:
            tl.store(t_ptrs, acc.to(t_ptr.dtype.element_ty), mask=mask_r)
        else:
            tl.atomic_add(t_ptrs, acc, mask=mask_r)
    elif SPLIT_K == 1:  # base-model token: its t row must read as 0 (split-K buffers start zeroed)
        tl.store(t_ptrs, tl.full((BLOCK_R,), 0.0, t_ptr.dtype.element_ty), mask=mask_r)


def _bgmv_expand_kernel(
    t_ptr, b_ptr, y_ptr, slots_ptr,
    d_out, rank, y_offset,
    stride_tt, stride_tr, stride_bs, stride_bn, stride_br, stride_yt, stride_yn,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # grid (T, cdiv(d_out, BLOCK_N)); slot -1 programs exit without touching memory.
    tok = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    slot = tl.load(slots_ptr + tok).to(tl.int64)
    if slot >= 0:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < d_out
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        tr = tl.load(t_ptr + tok * stride_tt + offs_r * stride_tr, mask=mask_r, other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)  # (BN, BR)
        acc = tl.reduce(bt * tr[None, :], 1, _SUM)  # (BN,)
        y_ptrs = y_ptr + tok * stride_yt + (y_offset + offs_n) * stride_yn
        acc += tl.load(y_ptrs, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


class _Kernel:
    """One kernel source, compiled for CUDA tensors and interpreted for CPU tensors."""

    def __init__(self, fn):
        self.fn = fn
        self.jit = JITFunction(fn)
        self.interp = InterpretedFunction(fn)

    def __getitem__(self, grid):
        return _Launch(self, grid)


class _Launch:
    def __init__(self, kernel: _Kernel, grid):
        self.kernel, self.grid = kernel, grid

    def __call__(self, *args, **kwargs):
        on_gpu = args[0].is_cuda and not triton.knobs.runtime.interpret
        return (self.kernel.jit if on_gpu else self.kernel.interp)[self.grid](*args, **kwargs)


sgmv_shrink_kernel = _Kernel(_sgmv_shrink_kernel)
sgmv_expand_kernel = _Kernel(_sgmv_expand_kernel)
bgmv_shrink_kernel = _Kernel(_bgmv_shrink_kernel)
bgmv_expand_kernel = _Kernel(_bgmv_expand_kernel)


def _interpreting(x: torch.Tensor) -> bool:
    return not x.is_cuda or bool(triton.knobs.runtime.interpret)


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(n))


def _upcast(x: torch.Tensor, stack: torch.Tensor) -> bool:
    return torch.bfloat16 in (x.dtype, stack.dtype) and _interpreting(x)


def sgmv_shrink(x: torch.Tensor, A_stack: torch.Tensor, mapping: LoraMapping | torch.Tensor,
                scale: torch.Tensor, *, block_m: int = 16, block_k: int | None = None) -> torch.Tensor:
    """Segmented shrink; semantics of :func:`loramux.kernels.lora_shrink`."""
    m = as_mapping(mapping)
    check_operands(x, A_stack, m)
    T, (_, r, d_in) = x.shape[0], A_stack.shape
    t = (torch.empty if m.all_lora else torch.zeros)(T, r, dtype=x.dtype, device=x.device)
    if not m.any_lora:
        return t
    # The interpreter pays per block op, not per element: big K blocks make it ~10x faster.
    block_k = block_k or _pow2(min(d_in, 256 if _interpreting(x) else 64), 16)
    grid = (m.num_segments, triton.cdiv(m.max_seg_len, block_m))
    sgmv_shrink_kernel[grid](
        x, A_stack, scale, t, m.order, m.seg_slots, m.seg_starts, m.seg_lens,
        d_in, r, *x.stride(), *A_stack.stride(), *t.stride(),
        BLOCK_M=block_m, BLOCK_R=_pow2(r, 16), BLOCK_K=block_k, UPCAST=_upcast(x, A_stack),
    )
    return t


def sgmv_expand(t: torch.Tensor, B_stack: torch.Tensor, mapping: LoraMapping | torch.Tensor,
                y: torch.Tensor, y_offset: int = 0, *, block_m: int = 16, block_n: int | None = None) -> None:
    """Segmented expand; semantics of :func:`loramux.kernels.lora_expand`."""
    m = as_mapping(mapping)
    check_operands(t, B_stack, m)
    _, d_out, r = B_stack.shape
    check_output(y, t, y_offset, d_out)
    if not m.any_lora:
        return
    block_n = block_n or _pow2(min(d_out, 256 if _interpreting(t) else 64), 16)
    grid = (m.num_segments, triton.cdiv(m.max_seg_len, block_m), triton.cdiv(d_out, block_n))
    sgmv_expand_kernel[grid](
        t, B_stack, y, m.order, m.seg_slots, m.seg_starts, m.seg_lens,
        d_out, r, y_offset, *t.stride(), *B_stack.stride(), *y.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_pow2(r, 16), UPCAST=_upcast(t, B_stack),
    )


def bgmv_shrink(x: torch.Tensor, A_stack: torch.Tensor, mapping: LoraMapping | torch.Tensor,
                scale: torch.Tensor, *, block_k: int | None = None, split_k: int = 1) -> torch.Tensor:
    """Gathered shrink; semantics of :func:`loramux.kernels.lora_shrink`. ``split_k > 1`` splits d_in over programs
    (more parallelism for few tokens) and accumulates into a float32 buffer with atomics."""
    m = as_mapping(mapping)
    check_operands(x, A_stack, m)
    T, (_, r, d_in) = x.shape[0], A_stack.shape
    if not m.any_lora:
        return x.new_zeros(T, r)
    block_k = block_k or _pow2(min(d_in, 512 if _interpreting(x) else 128), 16)
    if split_k == 1:
        t = torch.empty(T, r, dtype=x.dtype, device=x.device)
    else:
        t = torch.zeros(T, r, dtype=torch.float32, device=x.device)
    bgmv_shrink_kernel[(T, split_k)](
        x, A_stack, scale, t, m.token_slots,
        d_in, r, *x.stride(), *A_stack.stride(), *t.stride(),
        BLOCK_R=_pow2(r), BLOCK_K=block_k, SPLIT_K=split_k,
    )
    return t if split_k == 1 else t.to(x.dtype)


def bgmv_expand(t: torch.Tensor, B_stack: torch.Tensor, mapping: LoraMapping | torch.Tensor,
                y: torch.Tensor, y_offset: int = 0, *, block_n: int | None = None) -> None:
    """Gathered expand; semantics of :func:`loramux.kernels.lora_expand`."""
    m = as_mapping(mapping)
    check_operands(t, B_stack, m)
    _, d_out, r = B_stack.shape
    check_output(y, t, y_offset, d_out)
    if not m.any_lora:
        return
    block_n = block_n or _pow2(min(d_out, 1024 if _interpreting(t) else 256))
    bgmv_expand_kernel[(t.shape[0], triton.cdiv(d_out, block_n))](
        t, B_stack, y, m.token_slots,
        d_out, r, y_offset, *t.stride(), *B_stack.stride(), *y.stride(),
        BLOCK_N=block_n, BLOCK_R=_pow2(r),
    )


def lora_shrink(x: torch.Tensor, A_stack: torch.Tensor, mapping: LoraMapping | torch.Tensor,
                scale: torch.Tensor | None) -> torch.Tensor:
    """:func:`loramux.kernels.lora_shrink` in Triton: BGMV when ``mapping.decode``, else SGMV."""
    m = as_mapping(mapping)
    if scale is None:  # adapters whose scale is folded into B
        scale = torch.ones(A_stack.shape[0], dtype=torch.float32, device=x.device)
    return (bgmv_shrink if m.decode else sgmv_shrink)(x, A_stack, m, scale)


def lora_expand(t: torch.Tensor, B_stack: torch.Tensor, mapping: LoraMapping | torch.Tensor,
                y: torch.Tensor, y_offset: int = 0) -> None:
    """:func:`loramux.kernels.lora_expand` in Triton: BGMV when ``mapping.decode``, else SGMV."""
    m = as_mapping(mapping)
    (bgmv_expand if m.decode else sgmv_expand)(t, B_stack, m, y, y_offset)


def add_lora_group(y: torch.Tensor, x: torch.Tensor, A_group: torch.Tensor,
                   expands: list[tuple[torch.Tensor, int, int]], m: LoraMapping, strategy: str,
                   factors: torch.Tensor | None = None) -> None:
    """:func:`loramux.kernels.add_lora_group` on the GPU path: one shrink for the group, one expand
    per module into its column slice (``strategy`` is the CPU path's; the mapping picks SGMV/BGMV),
    then DoRA's row scaling when ``factors`` are given."""
    t = lora_shrink(x, A_group, m, None)
    G = A_group.shape[1] // expands[0][0].shape[2] if expands else 1
    for B, i, offset in expands:
        lora_expand(t[:, i::G], B, m, y, offset)
    if factors is not None:
        from loramux.kernels.triton_dora import lora_scale_rows  # imports this module: not at the top

        lora_scale_rows(y, factors, m, 0)


def pick_strategy(m: LoraMapping, stack: torch.Tensor) -> str:
    return "bgmv" if m.decode else "sgmv"
