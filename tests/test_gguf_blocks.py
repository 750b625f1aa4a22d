"""GGUF blocks in our resident forms against gguf-py's own `dequantize` of the same bytes.

a. Stored-as-is types (Q4_0, Q4_1, Q4_K in one int4 part; Q8_0, Q5_K in two) decode to codes and
   float32 scales that reproduce `dequantize` bit for bit.
b. What the int4 kernel multiplies by (read back through it) is the file's weights up to the bf16
   rounding of its scales, zeros and output: engine.gguf_forms.stored_form_bound.
c. Requantized types stay within the bound engine.gguf_forms states: Q6_K in the `gguf` form
   (int8 per group of 32: amax / 254), every non-4-bit type in the `int4` form ((max - min) / 30).
Random blocks: every byte pattern is a valid block (tests/tiny_gguf.py sets sane fp16 scales).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from loramux.engine.gguf_blocks import (
    INT4_KINDS,
    INT8_KINDS,
    REQUANTIZED_KINDS,
    Int4Blocks,
    int4_blocks,
    int8_blocks,
)
from loramux.engine.gguf_forms import (
    int4_parts,
    int4_projection,
    requant_int4_bound,
    requant_int8_bound,
    requantized_int8,
    stored_form_bound,
)
from loramux.engine.linear import INT4_GROUP, dequantize_int4, pack_int4, quantize_int4
from tests.tiny_gguf import random_tensor

ROWS, COLS = 32, 512
BF16_REL = 2.0 ** -8         # bf16 keeps 8 significant bits: rounding moves a value by < 2^-8 of it


def _file(kind: str, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """(raw bytes (ROWS, bytes per row), gguf-py's dequantize of them (ROWS, COLS) float32)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data, qtype = random_tensor(np.random.default_rng(seed), kind, ROWS, COLS)
    w = dequantize(data, qtype or GGMLQuantizationType[kind])
    return data, torch.from_numpy(np.array(w, dtype=np.float32))


def _blocks(kind: str, raw: np.ndarray):
    if kind in INT4_KINDS:
        return int4_blocks(raw, kind)
    return int8_blocks(raw, kind) if kind in INT8_KINDS else None


def _expand(per_group: torch.Tensor) -> torch.Tensor:
    return per_group.repeat_interleave(INT4_GROUP, dim=-1)


@pytest.mark.parametrize("kind", INT4_KINDS + INT8_KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_stored_blocks_decode_to_gguf_dequantize_bit_for_bit(kind, seed):
    raw, w = _file(kind, seed)
    b = _blocks(kind, raw)
    if isinstance(b, Int4Blocks):
        assert b.codes.dtype == torch.uint8 and int(b.codes.max()) <= 15
        got = dequantize_int4(b.codes, b.scale, b.zero)
    else:
        assert int(b.u.max()) <= (31 if kind == "Q5_K" else 255)
        got = (b.u.float().view(ROWS, -1, INT4_GROUP) * b.scale[..., None] + b.offsets()[..., None]).view(ROWS, COLS)
    assert torch.equal(got, w), (kind, (got - w).abs().max().item())


@pytest.mark.parametrize("kind", INT4_KINDS + INT8_KINDS + REQUANTIZED_KINDS)
def test_gguf_form_multiplies_by_the_file_weights(kind):
    raw, w = _file(kind)
    b = _blocks(kind, raw)
    module = int4_parts([w], [b], dense=None)
    assert module.num_parts == (1 if kind in INT4_KINDS else 2)
    if kind in INT4_KINDS:                                   # the file's very codes are what the kernel reads
        assert torch.equal(module.packed0, pack_int4(b.codes, b.scale, b.zero)[0])
    served = module.dequantized()                            # through the kernel (identity input)
    if kind in REQUANTIZED_KINDS:
        b = requantized_int8(w)
        allowed = stored_form_bound(w, b) + _expand(requant_int8_bound(w)) * (1 + 1e-6)
    else:
        allowed = stored_form_bound(w, b)
    err = (served - w).abs()
    assert (err <= allowed).all(), (kind, (err - allowed).max().item())
    # the bound means something: a small fraction of the weights' own size
    assert allowed.mean() < 0.05 * w.abs().mean(), (kind, allowed.mean().item(), w.abs().mean().item())


def test_q8_0_two_parts_are_the_lm_heads_form():
    """Q8_0 in two parts is bit for bit engine.linear.int8_groups_as_int4_parts (the embedded head's form)."""
    from loramux.engine.linear import int8_groups_as_int4_parts

    raw, w = _file("Q8_0")
    b = _blocks("Q8_0", raw)
    ours = int4_parts([w], [b], dense=None)
    ref = int8_groups_as_int4_parts((b.u.to(torch.int16) - 128).to(torch.int8), b.scale)
    for name in ("packed0", "scales_zeros0", "packed1", "scales_zeros1"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_K", "Q6_K", "F16"])
def test_int4_mode_requantizes_within_the_stated_bound(kind):
    _, w = _file(kind)
    module = int4_projection([w], [None])                    # the int4 form of a type it cannot hold as stored
    requantized = dequantize_int4(*quantize_int4(w))         # (q - 8) * scale + zero, float32 scale and zero
    allowed = _expand(requant_int4_bound(w)) * (1 + 1e-6) + BF16_REL * requantized.abs()
    assert ((requantized - w).abs() <= allowed).all(), kind
    kernel = module.__class__([(module.packed0, module.scales_zeros0)], ROWS).dequantized()
    stated = stored_form_bound(w, Int4Blocks(*quantize_int4(w)))
    assert ((kernel - w).abs() <= allowed + stated).all(), kind


def test_a_four_bit_part_rides_in_a_two_part_projection_exactly():
    """A fused q|k|v with 4-bit q, k and a Q5_K v: the 4-bit rows' second part adds exactly zero."""
    (raw4, w4), (raw5, w5) = _file("Q4_K"), _file("Q5_K")
    fused = int4_parts([w4, w5], [_blocks("Q4_K", raw4), _blocks("Q5_K", raw5)], dense=None)
    alone = int4_parts([w4], [_blocks("Q4_K", raw4)], dense=None)
    assert fused.num_parts == 2
    assert torch.equal(fused.dequantized()[:ROWS], alone.dequantized())
