"""The CPU serving path of the LoRA ops: plain torch, no per-token Python loops.

Twin of ``kernels.triton_ops``: semantics, shapes and dtypes are the public API's
(:func:`loramux.kernels.lora_shrink`, :func:`loramux.kernels.lora_expand`). Strategies, picked
per call by :func:`_pick` from host-side facts only (never a device sync):

* ``single``   every token uses one adapter: two plain matmuls on that slot's A and B.
* ``bagged``   one ``embedding_bag`` per op, reading the stacks in place: a token's shrink is the
  sum of its slot's rows of A^T weighted by its input features, its expand the sum of its slot's
  rows of B^T weighted by ``t``. Needs row-major stacks, the layout of the registry's slots
  (``A`` a transposed view of (S, d_in, r_max), ``B`` of (S, r_max, d_out)).
* ``segments`` one matmul per distinct adapter: the fallback for other layouts.

``single`` multiplies contiguous copies of the adapter's A and B: the very BLAS calls peft's
``nn.Linear`` makes, so a lone request's LoRA matches peft's bit for bit. A quantized base needs
that: bitsandbytes' CPU nf4 kernel rounds its input to bf16 and turns a 1-ulp difference into a
different token. A mixed batch's embedding bags sum in another order, as peft's own mixed batches
(one matmul per adapter, its row count changing the BLAS blocking) differ from lone runs.

Why bagged: decode batches give each adapter one or a few tokens, so the work is reading each
used adapter's weights once, with little math. Per-adapter matmuls (``torch.mm``, grouped
matmuls) pay a dispatch and an OpenMP fork per adapter and a slow skinny-GEMM path in 16-bit;
gathering weights per token (``index_select`` + ``bmm``) copies them first. FBGEMM's embedding
bag streams them once, in bf16/fp16 as well as fp32, and for prefill-sized groups is within ~10%
of the grouped matmul (``python -m benchmarks.bench_kernels``, ``benchmarks/results/kernels.json``).

Rank-trimmed views (``A_stack[:, :r_used]``): ``bagged`` reads a trimmed A's whole rows
(its zero padding included: rows must be contiguous for the embedding bag) and drops the extra
columns, so size ``max_lora_rank`` to the adapters served.
"""
from __future__ import annotations

import torch

from loramux.kernels.checks import check_operands, check_output, check_scale_rows
from loramux.kernels.mapping import LoraMapping, as_mapping


def lora_shrink(x: torch.Tensor, A_stack: torch.Tensor, mapping: LoraMapping | torch.Tensor,
                scale: torch.Tensor | None) -> torch.Tensor:
    """:func:`loramux.kernels.lora_shrink` on the CPU path."""
    m = as_mapping(mapping)
    check_operands(x, A_stack, m)
    return _shrink(x, A_stack, m, scale, _pick(m, A_stack))


def lora_expand(t: torch.Tensor, B_stack: torch.Tensor, mapping: LoraMapping | torch.Tensor,
                y: torch.Tensor, y_offset: int = 0) -> None:
    """:func:`loramux.kernels.lora_expand` on the CPU path."""
    m = as_mapping(mapping)
    check_operands(t, B_stack, m)
    check_output(y, t, y_offset, B_stack.shape[1])
    _expand(t, B_stack, m, y, y_offset, _pick(m, B_stack))


def add_lora_group(y: torch.Tensor, x: torch.Tensor, A_group: torch.Tensor,
                   expands: list[tuple[torch.Tensor, int, int]], m: LoraMapping, strategy: str,
                   factors: torch.Tensor | None = None) -> None:
    """:func:`loramux.kernels.add_lora_group` on the CPU path, with the strategy the step's plan
    picked (:func:`pick_strategy`): no argument checks and no re-grouping per call."""
    t = _shrink(x, A_group, m, None, strategy)                      # (T, r * G)
    G = A_group.shape[1] // expands[0][0].shape[2] if expands else 1
    for B, i, offset in expands:
        _expand(t[:, i::G], B, m, y, offset, strategy)
    if factors is not None:
        scale_rows(y, factors, m, 0)


def lora_scale_rows(y: torch.Tensor, factors: torch.Tensor, mapping: LoraMapping | torch.Tensor,
                    y_offset: int = 0) -> None:
    """:func:`loramux.kernels.lora_scale_rows` on the CPU path."""
    m = as_mapping(mapping)
    check_scale_rows(y, factors, m, y_offset)
    scale_rows(y, factors, m, y_offset)


def scale_rows(y: torch.Tensor, factors: torch.Tensor, m: LoraMapping, y_offset: int) -> None:
    """The row scaling without argument checks (the step's plan checked its operands once): one
    broadcast multiply for a single adapter, else one gathered multiply (T, d) of the LoRA rows."""
    if not m.any_lora:
        return
    y_view = y[:, y_offset:y_offset + factors.shape[1]]  # (T, d) view: writes land in y
    if m.single_slot is not None:
        y_view.mul_(factors[m.single_slot])
    elif m.all_lora:
        y_view.mul_(factors.index_select(0, m.token_slots))
    else:  # base-model rows stay untouched: scale only the LoRA rows (order / sorted_slots)
        scaled = y_view.index_select(0, m.order) * factors.index_select(0, m.sorted_slots)   # float32
        y_view.index_copy_(0, m.order, scaled.to(y.dtype))


def pick_strategy(m: LoraMapping, stack: torch.Tensor) -> str:
    """``single`` | ``bagged`` | ``segments`` for every op of a step on stacks laid out as ``stack``."""
    return _pick(m, stack)


def _shrink(x: torch.Tensor, A_stack: torch.Tensor, m: LoraMapping, scale: torch.Tensor | None,
            how: str) -> torch.Tensor:
    T, r = x.shape[0], A_stack.shape[1]
    if not m.any_lora:
        return x.new_zeros(T, r)
    cx = x.to(A_stack.dtype)  # compute dtype = stack dtype (no-op unless stacks are float32)
    if how == "single":
        s = m.single_slot
        return _scaled(cx @ A_stack[s].contiguous().T, scale, s).to(x.dtype)  # (T, r)
    if how == "bagged":
        # t[i] = sum_k x[i, k] * A[s_i, :, k]: a weighted sum of slot s_i's rows (k, :) of A^T.
        rows, per_slot = _rows(A_stack.transpose(1, 2))
        indices, offsets = m.bags(per_slot, A_stack.shape[2])
        t = _bag_sum(rows, indices, offsets, _lora_rows(cx, m))
        if t.shape[1] != r:  # a rank-trimmed view: drop the padding columns read with the rows
            t = t[:, :r].contiguous()
        if scale is not None:
            t.mul_(scale.index_select(0, m.table_slots).unsqueeze_(1))
        return t.to(x.dtype)
    t = cx.new_zeros(T, r)
    for s, rows in _segments(m):
        t.index_copy_(0, rows, _scaled(cx.index_select(0, rows) @ A_stack[s].T, scale, s))
    return t.to(x.dtype)


def _expand(t: torch.Tensor, B_stack: torch.Tensor, m: LoraMapping, y: torch.Tensor, y_offset: int,
            how: str) -> None:
    d_out = B_stack.shape[1]
    if not m.any_lora:
        return
    y_view = y[:, y_offset:y_offset + d_out]  # (T, d_out) view: writes land in y
    ct = t.to(B_stack.dtype)
    if how == "single":
        y_view.add_(ct.contiguous() @ B_stack[m.single_slot].contiguous().T)
    elif how == "bagged":
        # y[i] += sum_j t[i, j] * B[s_i, :, j]: a weighted sum of slot s_i's rows (j, :) of B^T.
        rows, per_slot = _rows(B_stack.transpose(1, 2))
        indices, offsets = m.bags(per_slot, B_stack.shape[2])
        out = _bag_sum(rows, indices, offsets, _lora_rows(ct, m))
        y_view.add_(out[:, :d_out])
    else:
        for s, rows in _segments(m):
            y_view.index_add_(0, rows, (ct.index_select(0, rows) @ B_stack[s].T).to(y.dtype))


def _scaled(t: torch.Tensor, scale: torch.Tensor | None, slot: int) -> torch.Tensor:
    """t times slot's scale, in place; scale=None means 1 (the scale is folded into B)."""
    return t if scale is None else t.mul_(scale[slot])


def _rows(stack_t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A stack seen as (S, n, w) with unit inner stride, as the 2-D table of its whole storage rows
    (row stride wide: a rank-trimmed view reads its zero padding, dropped afterwards) and how many
    rows each slot has."""
    (S, n, _), (s0, s1, _) = stack_t.shape, stack_t.stride()
    per_slot = s0 // s1
    return stack_t.as_strided(((S - 1) * per_slot + n, s1), (s1, 1)), per_slot


def _has_rows(stack_t: torch.Tensor) -> bool:
    """Can ``_rows`` view this (S, n, w) stack: contiguous rows of at least w, whole rows per slot?"""
    (S, n, w), (s0, s1, s2) = stack_t.shape, stack_t.stride()
    if not (s2 == 1 and s1 >= w and s0 % s1 == 0 and s0 >= s1 * n):
        return False
    table_end = stack_t.storage_offset() + ((S - 1) * (s0 // s1) + n) * s1  # the whole rows lie in storage
    return table_end * stack_t.element_size() <= stack_t.untyped_storage().nbytes()


def _bag_sum(rows: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per bag, the sum of its rows weighted by ``weights`` (one per index): the ATen op itself,
    without ``F.embedding_bag``'s argument checks (the mapping built these arguments).

    The weights must be contiguous: strided per-sample weights (``t[:, i::G]`` of a step where every
    token has an adapter) make ATen leave FBGEMM's fused multiply-add kernel for a multiply-then-add
    loop, so the same token's LoRA would round differently depending on its batch mates."""
    return torch.embedding_bag(rows, indices, offsets, False, 0, False, weights.reshape(-1).contiguous())[0]


def _lora_rows(a: torch.Tensor, m: LoraMapping) -> torch.Tensor:
    """The rows of the LoRA tokens, in token order (the per-sample weights of the bags)."""
    return a if m.all_lora else a.index_select(0, m.lora_tokens)


def _segments(m: LoraMapping):
    """(slot, token indices) per distinct adapter of the batch."""
    for s, a, n in zip(m.seg_slots_host, m.seg_starts_host, m.seg_lens_host):
        yield s, m.order[a:a + n]


def _pick(m: LoraMapping, stack: torch.Tensor) -> str:
    if m.single_slot is not None:
        return "single"
    return "bagged" if _has_rows(stack.transpose(1, 2)) else "segments"

