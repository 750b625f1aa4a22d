"""Resident forms of a GGUF file's projections, built from its stored blocks (engine.gguf_blocks).

Two modes (engine.quantize):

    int4  every projection in one int4 part (4 bits a weight): Q4_0 / Q4_1 / Q4_K blocks as
          stored; any other type requantized min/max in groups of 32 (``quantize_int4``), which moves
          a weight by at most requant_int4_bound = half a step, (max - min) / 30 of its group.
    gguf  (what `auto` picks for a GGUF model in bf16 on the CPU) each fused projection in the
          fastest form that holds the file's weights:
            all parts Q4_0 / Q4_1 / Q4_K      one int4 part, the codes as stored
            any part Q8_0 / Q5_K / Q6_K       on a CPU that multiplies bf16 in hardware (AVX512-BF16,
                                              AMX), dense bf16: faster than two parts at every row
                                              count (dense_beats_two_parts); elsewhere
                                              two int4 parts (8-bit codes, w = scale * u + offset:
                                              u = 16 hi + lo, engine.linear.Int4Linear sums them);
                                              Q8_0 / Q5_K codes as stored, 4-bit parts with a null
                                              second part; Q6_K (a scale per 16 weights) requantized
                                              to int8 per group of 32, which moves a weight by at
                                              most requant_int8_bound = amax / 254 of its group:
                                              the order of a bf16 copy's own rounding (|w| / 512)
            any part F16 / BF16 / F32         dense in the engine dtype
The int4 kernel reads scales and zeros in bf16: "as stored" is exact in the codes and the float32
scales (tests/test_gguf_blocks.py), then the scales round to bf16 as for every int4 projection,
which moves a weight by at most ``stored_form_bound`` (about a bf16 rounding of the weight and
of its group's scale and offset).
With ATen's kernel (no native build) both int4 forms also keep a bf16 copy of the file's dequantized
weight for steps of more than 16 rows (engine.linear); the native kernel reads the blocks at every
row count.
"""
from __future__ import annotations

import torch
from torch import nn

from loramux.engine.gguf_blocks import FLOAT_KINDS, Int4Blocks, Int8Blocks
from loramux.engine.linear import (
    DenseLinear,
    Int4Linear,
    bf16_matmul_in_hardware,
    native_available,
    pack_int4,
    quantize_int4,
    quantize_int8_groups,
)


def requant_int4_bound(w: torch.Tensor) -> torch.Tensor:
    """(N, K / 32): the largest move ``quantize_int4`` makes to a weight of each group (half a step)."""
    g = w.float().reshape(w.shape[0], -1, 32)
    return (g.amax(-1) - g.amin(-1)) / 30


def requant_int8_bound(w: torch.Tensor) -> torch.Tensor:
    """(N, K / 32): the largest move ``quantize_int8_groups`` makes to a weight of each group."""
    return w.float().reshape(w.shape[0], -1, 32).abs().amax(-1) / 254


Blocks = Int4Blocks | Int8Blocks | None


def int4_projection(weights: list[torch.Tensor], blocks: list[Blocks]) -> Int4Linear:
    """`int4` mode: the parts' rows (each (N_i, K) float32 dequantized, with its blocks) in one int4 part."""
    rows = [(b.codes, b.scale, b.zero) if isinstance(b, Int4Blocks) else quantize_int4(w)
            for w, b in zip(weights, blocks)]
    return Int4Linear.from_codes(*(torch.cat(xs) for xs in zip(*rows)))


def exact_projection(weights: list[torch.Tensor], blocks: list[Blocks], kinds: list[str],
                     dtype: torch.dtype) -> nn.Module:
    """`gguf` mode: the form that holds every part exactly (module docstring)."""
    weight = torch.cat(weights)                                                 # (N, K) float32
    if any(k in FLOAT_KINDS for k in kinds) or (two_parts(blocks) and dense_beats_two_parts(dtype)):
        return DenseLinear(weight.to(dtype))
    # the native kernel reads the blocks at every row count: a bf16 copy for large steps is ATen's need
    return int4_parts(weights, blocks, dense=None if native_available() else weight.to(torch.bfloat16))


def two_parts(blocks: list[Blocks]) -> bool:
    """Whether the int4 kernel needs two parts to hold these blocks (any not 4-bit)."""
    return not all(isinstance(b, Int4Blocks) for b in blocks)


def dense_beats_two_parts(dtype: torch.dtype) -> bool:
    """Where the CPU multiplies bf16 in hardware, a bf16 GEMM beats two int4 parts at every row count
    (benchmarks/results/gguf_forms.json: two parts 0.6-0.9x its speed at 1 row, 0.1x at 32), for
    about a bf16 rounding of each weight (2^-9 relative: the order of stored_form_bound)."""
    return dtype == torch.bfloat16 and bf16_matmul_in_hardware()


def int4_parts(weights: list[torch.Tensor], blocks: list[Blocks], dense: torch.Tensor | None) -> Int4Linear:
    """One int4 part when every part's blocks are 4-bit, else two (8-bit codes; Q6_K / float parts
    requantized to int8 in groups of 32)."""
    if not two_parts(blocks):
        part = pack_int4(*(torch.cat(xs) for xs in zip(*((b.codes, b.scale, b.zero) for b in blocks))))
        return Int4Linear([part], part[0].shape[0], dense)
    rows = [_two_part_rows(w, b) for w, b in zip(weights, blocks)]
    hi, s0, z0, lo, s1, z1 = (torch.cat(xs) for xs in zip(*rows))
    return Int4Linear([pack_int4(hi, s0, z0), pack_int4(lo, s1, z1)], hi.shape[0], dense)


def requantized_int8(w: torch.Tensor) -> Int8Blocks:
    """A weight no group-32 form holds (Q6_K, float) as symmetric int8 per group of 32 (requant_int8_bound)."""
    q, d = quantize_int8_groups(w)
    return Int8Blocks((q.to(torch.int16) + 128).to(torch.uint8), d, None)


def _two_part_rows(w: torch.Tensor, b: Blocks) -> tuple[torch.Tensor, ...]:
    """(hi codes, scale, zero, lo codes, scale, zero) with (hi - 8) s0 + z0 + (lo - 8) s1 + z1 = w,
    u = 16 hi + lo. The scale is rounded to bf16 once, up front, so 16 s, 8 s, 128 s are exact in
    bf16 and only the asymmetric offset's zero rounds again: the kernel serves
    bf16(s) * u + o (symmetric: bf16(s) * (u - 128), as engine.linear.int8_groups_as_int4_parts)."""
    if isinstance(b, Int4Blocks):                                               # second part adds 0
        null = torch.zeros_like(b.scale)
        return b.codes, b.scale, b.zero, torch.full_like(b.codes, 8), null, null
    if b is None:
        b = requantized_int8(w)
    s = b.scale.to(torch.bfloat16).float()
    if b.offset is None:     # (hi - 8) 16 s + 0 + (lo - 8) s + 8 s = s (u - 128)
        return b.u >> 4, 16 * s, torch.zeros_like(s), b.u & 15, s, 8 * s
    #                          (hi - 8) 16 s + 128 s + (lo - 8) s + (8 s + o) = s u + o
    return b.u >> 4, 16 * s, 128 * s, b.u & 15, s, 8 * s + b.offset


def stored_form_bound(w: torch.Tensor, b: Int4Blocks | Int8Blocks) -> torch.Tensor:
    """(N, K): how far the int4 kernel's weight may be from the file's w when it holds blocks `b`:
    the bf16 rounding (< 2^-9 relative) of each group's scale times the weight's code, of its zero
    or offset, and of each part's output, within 2^-8 (|w| + |code| |scale| + |zero|) with the code
    centred as the form reads it (q - 8 in one part; u - 128 or u, plus 16 for the parts, in two)."""
    def per_weight(a: torch.Tensor) -> torch.Tensor:
        return a.abs().repeat_interleave(32, dim=-1)
    if isinstance(b, Int4Blocks):
        terms = (b.codes.float() - 8).abs() * per_weight(b.scale) + per_weight(b.zero)
    else:
        code = b.u.float() - 128 if b.offset is None else b.u.float()
        terms = (code.abs() + 16) * per_weight(b.scale) + (0 if b.offset is None else per_weight(b.offset))
    return 2.0 ** -8 * (w.abs() + terms)
