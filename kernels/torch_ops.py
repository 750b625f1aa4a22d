"""The CPU serving path of the LoRA ops: plain torch, no per-token Python loops.

Twins of ``kernels.triton_ops`` with identical signatures. Strategies (picked per call by
:func:`_pick`, from host-side facts of the mapping, never from a device sync):

* ``single``  every token uses one adapter: two plain matmuls on that slot's A and B.
* ``grouped`` tokens sorted by slot, one ``torch.nn.functional.grouped_mm`` over the *whole* stack
  with empty groups for unused slots: segmented (SGMV-like) and without copying any weights.
* ``segments`` the same grouping, one matmul per distinct adapter: for stacks whose layout the
  grouped matmul refuses (it needs 16-byte aligned strides).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.mapping import LoraMapping, as_mapping


def lora_shrink(x: torch.Tensor, A_stack: torch.Tensor, mapping: LoraMapping | torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    """t = shrink(x): each token's input through its adapter's A, times that adapter's scale.

    x (T, d_in), A_stack (S, r, d_in), scale (S,) float32  ->  t (T, r) in x.dtype::

        for i in range(T):
            s = slot[i]
            t[i] = scale[s] * x[i] @ A_stack[s].T if s >= 0 else 0
    """
    m = as_mapping(mapping)
    T, S, r = x.shape[0], A_stack.shape[0], A_stack.shape[1]
    m.check(T, S)
    if not m.any_lora:
        return x.new_zeros(T, r)
    how = _pick(m, x, A_stack)
    if how == "single":
        s = m.single_slot
        t = x @ A_stack[s].T  # (T, r)
        return t.mul_(scale[s])
    xs = x.index_select(0, m.order)  # (L, d_in) LoRA tokens, grouped by slot
    if how == "grouped":
        ts = F.grouped_mm(xs, A_stack.transpose(1, 2), offs=m.group_offsets(S))  # (L, r)
    else:
        ts = torch.empty(m.num_lora_tokens, r, dtype=x.dtype, device=x.device)
        for s, a, n in zip(m.seg_slots_host, m.seg_starts_host, m.seg_lens_host):
            torch.mm(xs[a:a + n], A_stack[s].T, out=ts[a:a + n])
    ts.mul_(scale.index_select(0, m.sorted_slots).unsqueeze(1))
    t = torch.empty(T, r, dtype=x.dtype, device=x.device) if m.all_lora else x.new_zeros(T, r)
    return t.index_copy_(0, m.order, ts)


def lora_expand(t: torch.Tensor, B_stack: torch.Tensor, mapping: LoraMapping | torch.Tensor,
                y: torch.Tensor, y_offset: int = 0) -> None:
    """y += expand(t), in place, into the column slice of a (possibly fused) projection output.

    t (T, r), B_stack (S, d_out, r), y (T, >= y_offset + d_out)::

        for i in range(T):
            s = slot[i]
            if s >= 0:
                y[i, y_offset:y_offset + d_out] += t[i] @ B_stack[s].T
    """
    m = as_mapping(mapping)
    S, d_out = B_stack.shape[0], B_stack.shape[1]
    m.check(t.shape[0], S)
    _check_out(y, t.shape[0], y_offset, d_out)
    if not m.any_lora:
        return
    y_view = y[:, y_offset:y_offset + d_out]  # (T, d_out) view: writes land in y
    how = _pick(m, t, B_stack)
    if how == "single":
        s = m.single_slot
        y_view.addmm_(t, B_stack[s].T)
        return
    ts = t.index_select(0, m.order)  # (L, r)
    if how == "grouped":
        out = F.grouped_mm(ts, B_stack.transpose(1, 2), offs=m.group_offsets(S))  # (L, d_out)
    else:
        out = torch.empty(m.num_lora_tokens, d_out, dtype=y.dtype, device=y.device)
        for s, a, n in zip(m.seg_slots_host, m.seg_starts_host, m.seg_lens_host):
            torch.mm(ts[a:a + n], B_stack[s].T, out=out[a:a + n])
    y_view.index_add_(0, m.order, out)


def _pick(m: LoraMapping, a: torch.Tensor, stack: torch.Tensor) -> str:
    if m.single_slot is not None:
        return "single"
    if _grouped_mm_ok(a) and _grouped_mm_ok(stack.transpose(1, 2)):
        return "grouped"
    return "segments"


def _grouped_mm_ok(mat: torch.Tensor) -> bool:
    """grouped_mm's layout precondition: 16-byte aligned base, one of the two inner dims contiguous
    and the other's stride a multiple of 16 bytes."""
    if mat.data_ptr() % 16:
        return False
    align = 16 // mat.element_size()
    (rows, cols), (s_rows, s_cols) = mat.shape[-2:], mat.stride()[-2:]
    if s_cols == 1 and s_rows >= max(1, cols):
        return s_rows % align == 0
    if s_rows == 1 and s_cols >= max(1, rows):
        return s_cols % align == 0
    return False


def _check_out(y: torch.Tensor, num_tokens: int, y_offset: int, d_out: int) -> None:
    if y.dim() != 2 or y.shape[0] != num_tokens or not 0 <= y_offset <= y.shape[1] - d_out:
        raise ValueError(f"y {tuple(y.shape)} cannot take {d_out} columns at offset {y_offset} "
                         f"for {num_tokens} tokens")
