"""Batched LoRA ops that let one batch mix adapters: one API, dispatched by device.

CUDA tensors run the Triton kernels (``kernels.triton_ops``: SGMV for prefill, BGMV for decode);
CPU tensors run the torch path (``kernels.torch_ops``). Both are twins with identical signatures
and can be called directly (the Triton twin runs on CPU tensors under Triton's interpreter).
The semantics, shapes and dtypes below, and in :func:`lora_shrink` / :func:`lora_expand`, are
the one statement of what the ops compute: the twins and the float64 oracle
(``kernels.reference``) refer to them, and share their argument checks (``kernels.checks``).

A LoRA projection of a batch of T tokens, token i using adapter slot ``slot[i]`` (-1: none)::

    t = lora_shrink(x, A_stack, mapping, scale)   # (T, r)
    y = x @ W.T                                    # base projection, (T, d_out_total)
    lora_expand(t, B_stack, mapping, y, y_offset)  # y[:, y_offset:y_offset + d_out] += ...

Conventions (the engine integrator's checklist):
  * ``x``, ``t`` and ``y`` share one dtype (fp32, bf16 or fp16); the stacks have that dtype too,
    or float32 (the LoRA math then runs in float32, and only ``t`` and ``y`` are 16-bit). All on
    one device. ``scale`` is float32 (S,), or None for 1 (stacks that fold it into B, as the
    registry's do).
  * Adapters of smaller rank are zero-padded to r_max; callers may pass rank-trimmed views
    (``A_stack[:, :r]``, ``B_stack[:, :, :r]``) of any strides.
  * ``mapping`` is a :class:`LoraMapping`, built once per engine step with
    ``LoraMapping.from_slots(token_slots)`` on the batch's device and reused by every layer and
    projection. A raw (T,) slot tensor is accepted too, but is then re-grouped on every call.
  * When ``not mapping.any_lora`` both ops are free (shrink returns zeros, expand returns at once),
    but the engine may skip them outright.

DoRA adapters scale the whole projection output, base and LoRA together, by a per-output factor
of their own (``m / ||W + scale * B A||`` per row of W, fixed once the adapter is loaded):
``lora_scale_rows`` after the expands, tokens of other adapters and of the base model by 1.
"""
from __future__ import annotations

import torch

from loramux.kernels import torch_ops
from loramux.kernels.mapping import LoraMapping

__all__ = ["LoraMapping", "add_lora_group", "lora_expand", "lora_scale_rows", "lora_shrink", "pick_strategy"]


def lora_shrink(x: torch.Tensor, A_stack: torch.Tensor, mapping: LoraMapping | torch.Tensor,
                scale: torch.Tensor | None) -> torch.Tensor:
    """Per-token adapter down-projection, scaled (``scale=None``: 1 for every slot, for stacks that
    fold each adapter's scale into B, as the registry's do).

    x (T, d_in), A_stack (S, r_max, d_in), scale (S,) float32  ->  t (T, r_max) in x.dtype::

        for i in range(T):
            s = slot[i]
            t[i] = scale[s] * x[i] @ A_stack[s].T if s >= 0 else 0
    """
    return _ops(x).lora_shrink(x, A_stack, mapping, scale)


def lora_expand(t: torch.Tensor, B_stack: torch.Tensor, mapping: LoraMapping | torch.Tensor,
                y: torch.Tensor, y_offset: int = 0) -> None:
    """Per-token adapter up-projection, added in place into a column slice of ``y``.

    t (T, r_max), B_stack (S, d_out, r_max), y (T, >= y_offset + d_out)::

        for i in range(T):
            s = slot[i]
            if s >= 0:
                y[i, y_offset:y_offset + d_out] += t[i] @ B_stack[s].T

    ``y_offset`` serves fused projections: q/k/v (or gate/up) share one ``y`` and each adapter
    module expands into its own column slice. Rows with slot -1 are left untouched.
    """
    _ops(t).lora_expand(t, B_stack, mapping, y, y_offset)


def add_lora_group(y: torch.Tensor, x: torch.Tensor, A_group: torch.Tensor,
                   expands: list[tuple[torch.Tensor, int, int]], mapping: LoraMapping, strategy: str,
                   factors: torch.Tensor | None = None) -> None:
    """One LoRA for a group of G projections that read the same ``x`` and write column slices of
    one fused output ``y`` (q/k/v, gate/up): one shrink, then one expand per listed module::

        t = lora_shrink(x, A_group, mapping, None)                    # (T, r * G)
        for B, i, y_offset in expands:                                # module i of the group
            lora_expand(t[:, i::G], B, mapping, y, y_offset)
        if factors is not None:                                       # DoRA: (S, y.shape[1]) float32
            lora_scale_rows(y, factors, mapping, 0)

    ``A_group`` (S, r * G, d_in) holds the modules' A side by side, rank-major (column j * G + i
    of ``t`` is rank j of module i); each B (S, d_out_i, r). ``factors`` (a step with DoRA adapters)
    scales each token's whole fused row, base output and LoRA alike, by its slot's row. ``strategy`` comes from
    :func:`pick_strategy`, called once per step: the engine's per-step plan validates the
    operands once and calls this for every layer with no further checks.
    """
    _ops(x).add_lora_group(y, x, A_group, expands, mapping, strategy, factors)


def lora_scale_rows(y: torch.Tensor, factors: torch.Tensor, mapping: LoraMapping | torch.Tensor,
                    y_offset: int = 0) -> None:
    """Per-token scaling of a column slice of ``y`` by its adapter's row of factors, in place.

    y (T, >= y_offset + d), factors (S, d) float32 (1 where an adapter scales nothing)::

        for i in range(T):
            s = slot[i]
            if s >= 0:
                y[i, y_offset:y_offset + d] *= factors[s]

    The product is computed in float32 and rounded once to ``y``'s dtype; rows with slot -1 are
    left untouched. DoRA: called on a fused projection's output after its expands, so the factor
    scales the base output and the LoRA delta alike (peft's ``m / ||W + s B A|| * (x W^T + s x A^T B^T)``).
    """
    _dora_ops(y).lora_scale_rows(y, factors, mapping, y_offset)


def pick_strategy(mapping: LoraMapping, stack: torch.Tensor) -> str:
    """How the ops run a step with this mapping on stacks laid out as ``stack`` (decided once per step)."""
    return _ops(stack).pick_strategy(mapping, stack)


def _ops(a: torch.Tensor):
    if a.is_cuda:
        from loramux.kernels import triton_ops  # triton is imported only where it can run

        return triton_ops
    return torch_ops


def _dora_ops(a: torch.Tensor):
    if a.is_cuda:
        from loramux.kernels import triton_dora

        return triton_dora
    return torch_ops
