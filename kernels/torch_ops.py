"""The CPU serving path of the LoRA ops: plain torch, no per-token Python loops.

Twins of ``kernels.triton_ops`` with identical signatures. Strategies, picked per call by
:func:`_pick` from host-side facts only (never a device sync):

* ``single``   every token uses one adapter: two plain matmuls on that slot's A and B.
* ``grouped``  tokens sorted by slot, one ``torch.nn.functional.grouped_mm`` over the *whole*
  stack, unused slots being empty groups: segmented (SGMV-like) without copying any weights.
* ``gathered`` each token's weights gathered (``index_select``) and one batched matmul (BGMV-like).
* ``segments`` the grouping of ``grouped``, one matmul per distinct adapter: the fallback for
  layouts ``grouped_mm`` refuses (it wants 16-byte aligned strides: e.g. bf16 rank 1, d_in 100).

What measured fastest on this 2-core AVX-512 CPU without AMX (``python -m benchmarks.bench_kernels``,
numbers in ``benchmarks/results/kernels.json``, "strategies"): ``single`` whenever it applies;
``grouped`` for float32 stacks, decode and prefill alike (memory-bound: it streams each used
adapter's weights once and copies nothing); for 16-bit stacks ``gathered`` when adapters have few
tokens each (oneDNN's 16-bit GEMMs with 1-row operands cost ~50 us a call here, so 2 x 32 of them
lose to one gather plus a streaming multiply-sum) and ``grouped`` for prefill-shaped batches.
16-bit math is no faster than float32 on this CPU (the bf16 base matmul is not either), so the
stacks may be float32 while activations are bf16/fp16: the LoRA math then runs in float32 and only
``t`` and ``y`` are in the activation dtype. That is the layout we recommend for CPU serving.

Rank: adapters are zero-padded to the stack's r_max. Per-slot ranks would save the padded FLOPs,
but every strategy above wants one rank per call; pass a rank-trimmed view instead
(``A_stack[:, :r_used]``, ``B_stack[:, :, :r_used]`` with r_used the largest rank in the batch):
views are fine, nothing here needs contiguous stacks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.mapping import LoraMapping, as_mapping

# With bf16/fp16 stacks, "gathered" beats "grouped" below this many tokens per adapter.
_GATHER_16BIT_BELOW = 4


def lora_shrink(x: torch.Tensor, A_stack: torch.Tensor, mapping: LoraMapping | torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    """t = shrink(x): each token's input through its adapter's A, times that adapter's scale.

    x (T, d_in), A_stack (S, r, d_in), scale (S,) float32  ->  t (T, r) in x.dtype::

        for i in range(T):
            s = slot[i]
            t[i] = scale[s] * x[i] @ A_stack[s].T if s >= 0 else 0
    """
    m = as_mapping(mapping)
    _check(x, A_stack, m)
    return _shrink(x, A_stack, m, scale, _pick(m, x, A_stack))


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
    _check(t, B_stack, m)
    _check_out(y, t, y_offset, B_stack.shape[1])
    _expand(t, B_stack, m, y, y_offset, _pick(m, t, B_stack))


def _shrink(x: torch.Tensor, A_stack: torch.Tensor, m: LoraMapping, scale: torch.Tensor,
            how: str) -> torch.Tensor:
    T, S, r = x.shape[0], A_stack.shape[0], A_stack.shape[1]
    if not m.any_lora:
        return x.new_zeros(T, r)
    cx = x.to(A_stack.dtype)  # compute dtype = stack dtype (no-op unless stacks are float32)
    if how == "single":
        s = m.single_slot
        t = cx @ A_stack[s].T  # (T, r)
        return t.mul_(scale[s]).to(x.dtype)
    xs = cx.index_select(0, m.order)  # (L, d_in) LoRA tokens, grouped by slot
    if how == "grouped":
        ts = F.grouped_mm(xs, A_stack.transpose(1, 2), offs=m.group_offsets(S))  # (L, r)
    elif how == "gathered":
        a = A_stack.index_select(0, m.sorted_slots)  # (L, r, d_in)
        if a.dtype == torch.float32:
            ts = torch.bmm(a, xs.unsqueeze(2)).squeeze(2)  # (L, r)
        else:  # 16-bit bmm is oneDNN's slow skinny path here; multiply-and-sum streams (fp32 sums)
            ts = (a * xs.unsqueeze(1)).sum(-1)  # (L, r)
    else:
        ts = torch.empty(m.num_lora_tokens, r, dtype=xs.dtype, device=xs.device)
        for s, a, n in zip(m.seg_slots_host, m.seg_starts_host, m.seg_lens_host):
            torch.mm(xs[a:a + n], A_stack[s].T, out=ts[a:a + n])
    ts.mul_(scale.index_select(0, m.sorted_slots).unsqueeze(1))
    # Unsort back to token order in the compute dtype, then round to the activation dtype once.
    t = ts.new_empty(T, r) if m.all_lora else ts.new_zeros(T, r)
    return t.index_copy_(0, m.order, ts).to(x.dtype)


def _expand(t: torch.Tensor, B_stack: torch.Tensor, m: LoraMapping, y: torch.Tensor, y_offset: int,
            how: str) -> None:
    S, d_out = B_stack.shape[0], B_stack.shape[1]
    if not m.any_lora:
        return
    y_view = y[:, y_offset:y_offset + d_out]  # (T, d_out) view: writes land in y
    ct = t.to(B_stack.dtype)
    if how == "single":
        if ct.dtype == y.dtype:
            y_view.addmm_(ct, B_stack[m.single_slot].T)
        else:
            y_view.add_(ct @ B_stack[m.single_slot].T)
        return
    ts = ct.index_select(0, m.order)  # (L, r)
    if how == "grouped":
        out = F.grouped_mm(ts, B_stack.transpose(1, 2), offs=m.group_offsets(S))  # (L, d_out)
    elif how == "gathered":
        b = B_stack.index_select(0, m.sorted_slots)  # (L, d_out, r)
        out = torch.bmm(ts.unsqueeze(1), b.transpose(1, 2)).squeeze(1)  # (L, d_out); this layout is the fast one
    else:
        out = torch.empty(m.num_lora_tokens, d_out, dtype=ts.dtype, device=ts.device)
        for s, a, n in zip(m.seg_slots_host, m.seg_starts_host, m.seg_lens_host):
            torch.mm(ts[a:a + n], B_stack[s].T, out=out[a:a + n])
    y_view.index_add_(0, m.order, out.to(y.dtype))


def _pick(m: LoraMapping, a: torch.Tensor, stack: torch.Tensor) -> str:
    if m.single_slot is not None:
        return "single"
    if stack.dtype != torch.float32 and m.num_lora_tokens < _GATHER_16BIT_BELOW * m.num_segments:
        return "gathered"
    # The grouped matmul's left operand is a fresh index_select copy: contiguous and aligned.
    if (a.shape[1] * stack.element_size()) % 16 == 0 and _grouped_mm_ok(stack.transpose(1, 2)):
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


def _check(a: torch.Tensor, stack: torch.Tensor, m: LoraMapping) -> None:
    """Shapes, devices and dtypes of one op call: a (T, k) against stack (S, ., .) and mapping."""
    if a.dim() != 2 or stack.dim() != 3:
        raise ValueError(f"expected a 2-D input and a 3-D stack, got {tuple(a.shape)} and {tuple(stack.shape)}")
    if a.device != stack.device or m.device != a.device:
        raise ValueError(f"input on {a.device}, stack on {stack.device}, mapping on {m.device}")
    if a.shape[1] != stack.shape[2]:
        raise ValueError(f"input {tuple(a.shape)} does not match stack {tuple(stack.shape)}")
    if stack.dtype not in (a.dtype, torch.float32):
        raise TypeError(f"stack dtype {stack.dtype} must be the input's ({a.dtype}) or float32")
    m.check(a.shape[0], stack.shape[0])


def _check_out(y: torch.Tensor, t: torch.Tensor, y_offset: int, d_out: int) -> None:
    if y.dim() != 2 or y.shape[0] != t.shape[0] or not 0 <= y_offset <= y.shape[1] - d_out:
        raise ValueError(f"y {tuple(y.shape)} cannot take {d_out} columns at offset {y_offset} "
                         f"for {t.shape[0]} tokens")
    if y.dtype != t.dtype or y.device != t.device:
        raise TypeError(f"y is {y.dtype} on {y.device}, t is {t.dtype} on {t.device}")
