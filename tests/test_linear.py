"""engine.linear's quantized projections against float64 on random inputs, at batch sizes on both
sides of Int4Linear's dense-copy threshold (ATen's path), within bounds derived from the roundings
each performs; and exactly where bf16 can hold the weights (which pins the layouts).

The native kernel (where it builds, the default) quantizes activations to int8 per group of 32
instead of rounding them to bf16, which moves each activation by up to half its group's step,
amax / 254, where bf16 moves it by 2^-9 of itself: its bound adds that term (`_int8_activations`)
and counts the bf16 roundings it does perform. The kernel alone against float64 on the same
quantized activations, every path and row count 1..64: tests/test_native_quant.py."""
from __future__ import annotations

import pytest
import torch

from loramux.engine import linear
from loramux.engine.linear import (
    INT4_DENSE_ABOVE,
    INT4_GROUP,
    Int4Linear,
    Int8Linear,
    int8_groups_as_int4_parts,
)

U = 2.0 ** -8        # bf16 unit roundoff: 8 significant bits, round to nearest
U32 = 2.0 ** -24     # float32's
BATCHES = (1, 5, 17, 21, 64)   # rows; above INT4_DENSE_ABOVE (16) the bf16 dense copy, above 20 dequantized parts
N_OUT, K_IN = 96, 576      # 96 = a full and a partial block of the AVX512 kernel's 64 columns; 576 = hidden size


@pytest.fixture(params=["native", "aten"], autouse=True)
def backend(request, monkeypatch):
    """Every test on both forms: the native kernel and ATen's (its fallback and reference)."""
    if request.param == "aten":
        monkeypatch.setattr(linear, "native_available", lambda: False)
    else:
        assert linear.native_available(), "the native kernel must build on x86-64 with g++ (see the log)"
    return request.param


def _bound(x: torch.Tensor, magnitude: torch.Tensor, bf16_roundings: int) -> torch.Tensor:
    """Elementwise bound on |y - x @ W.T| (float64) for a kernel that rounds `bf16_roundings` times
    to bf16, each time relative to a quantity bounded by |x| @ magnitude.T, and otherwise
    dequantizes and accumulates in float32 over K:

        |y - ref| <= (r * 2^-8 + (K + 2) * 2^-24) * 1.01 * (|x| @ M.T)

    M is the elementwise magnitude of the dequantization's terms (|q - 8| * |scale| + |zero| for
    int4: scale and zero are rounded separately, so a cancelling sum is not a bound), r counts the
    bf16 roundings (activations, scales/zeros, weights, outputs), K + 2 the float32 ones (FMA
    accumulation over K, the dequantizing FMA, the final cast), and 1.01 the second-order terms
    (r^2 * 2^-16 / 2 relative, < 1% for r <= 4). ATen's int4/int8 CPU kernels dequantize and
    accumulate in float32 on every x86 path (AVX512, AVX2, scalar), and so does the bf16 GEMM of a
    dense copy, so this holds on any x86-64 CPU."""
    K = x.shape[-1]
    return (bf16_roundings * U + (K + 2) * U32) * 1.01 * (x.double().abs() @ magnitude.T)


def _int8_activations(x: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Bound on |x @ W.T - xq @ W.T| for the native kernel's int8 activations xq: each element within
    half a step d / 2 = amax / 254 of its group of 32 (round to nearest), |W| <= magnitude; x 1.01 for
    the float32 roundings of d and of the quantizing product (2^-24 relative each)."""
    rows, K = x.shape
    amax = x.double().abs().view(rows, K // INT4_GROUP, INT4_GROUP).amax(-1)
    return 1.01 * (amax / 254).repeat_interleave(INT4_GROUP, dim=1) @ magnitude.T


def _bf16_path(lin, rows: int) -> bool:
    """The step multiplies by bf16 weights: the dense copy, or the native parts dequantized for it."""
    return ((lin.dense is not None and rows > lin.dense_above)
            or (lin.dequantize_above is not None and rows > lin.dequantize_above))


def _native_path(lin, rows: int) -> bool:
    return lin.native and not _bf16_path(lin, rows)


def _random_int4(gen: torch.Generator, n: int = N_OUT, k: int = K_IN):
    """Codes, scales and zeros like a GGUF Q4_1 file's (scales not bf16-representable, zeros of
    both signs and of the scale's size times a few)."""
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = torch.rand(n, k // INT4_GROUP, generator=gen) * 0.02 + 0.001
    zero = torch.randn(n, k // INT4_GROUP, generator=gen) * 0.05
    return codes, scale, zero


def _per_group(t: torch.Tensor) -> torch.Tensor:
    """(N, K / 32) -> (N, K), each group's value repeated over its 32 input features."""
    return t.repeat_interleave(INT4_GROUP, dim=1)


@pytest.mark.parametrize("rows", BATCHES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_int4_linear_matches_float64(rows, dtype):
    """ATen, r = 3: activations, scale/zero (int4 kernel) or the dequantized weight (dense copy),
    output. Native, r = 2: scale/zero, output (bf16 only), + the int8 activations' term; its steps of
    more than 20 rows on a CPU with bf16 hardware (the parts dequantized to bf16), r = 4: activations,
    scale/zero, the weight's own bf16 rounding, output."""
    gen = torch.Generator().manual_seed(rows)
    codes, scale, zero = _random_int4(gen)
    lin = Int4Linear.from_codes(codes, scale, zero)
    if lin.native:
        assert lin.dense is None, "the native kernel serves every row count: no bf16 copy"
    else:
        assert lin.dense is not None and lin.dense_above == INT4_DENSE_ABOVE
    q = codes.double() - 8
    weight = q * _per_group(scale.double()) + _per_group(zero.double())
    magnitude = q.abs() * _per_group(scale.double()) + _per_group(zero.double().abs())
    x = torch.randn(rows, K_IN, generator=gen).to(dtype)
    y = lin(x)
    assert y.dtype == dtype and y.shape == (rows, N_OUT)
    err = (y.double() - x.double() @ weight.T).abs()
    if _native_path(lin, rows):
        bound = _bound(x, magnitude, bf16_roundings=2) + _int8_activations(x, magnitude)
    else:
        bound = _bound(x, magnitude, bf16_roundings=3 if lin.dense is not None or not lin.native else 4)
    assert (err <= bound).all(), (err / bound).max().item()


@pytest.mark.parametrize("dense", [False, True], ids=["parts", "with-dense-copy"])
@pytest.mark.parametrize("rows", BATCHES)
def test_int8_groups_as_int4_parts_matches_float64(rows, dense):
    """The lm_head's form: GGUF Q8_0 (q int8, d per group of 32) as two int4 parts.

    Parts path, r = 4: activations, d (one relative rounding shared by 16d, d and 8d, powers of two
    apart), each part's output, their bf16 sum; M = the parts' magnitudes |hi - 8| * 16|d| and
    |lo - 8| * |d| + 8|d|. Native: the parts sum in float32, r = 2 (d, the output) + the int8
    activations' term. With the loader's dense copy (bf16 of the weight) above 16 rows, r = 3;
    with the native parts dequantized for the step (bf16 hardware), r = 4 as the parts path."""
    gen = torch.Generator().manual_seed(100 + rows)
    q = torch.randint(-128, 128, (N_OUT, K_IN), generator=gen, dtype=torch.int16).to(torch.int8)
    d = torch.rand(N_OUT, K_IN // INT4_GROUP, generator=gen) * 0.004 + 0.0005
    lin = int8_groups_as_int4_parts(q, d)
    weight = q.double() * _per_group(d.double())
    if dense:
        lin.dense = weight.to(torch.bfloat16)
    u = q.to(torch.int16) + 128
    hi, lo, dd = (u >> 4).double(), (u & 15).double(), _per_group(d.double())
    magnitude = (hi - 8).abs() * 16 * dd + (lo - 8).abs() * dd + 8 * dd
    x = torch.randn(rows, K_IN, generator=gen).to(torch.bfloat16)
    err = (lin(x).double() - x.double() @ weight.T).abs()
    if _native_path(lin, rows):
        bound = _bound(x, magnitude, bf16_roundings=2) + _int8_activations(x, magnitude)
    else:
        bound = _bound(x, magnitude, bf16_roundings=4 if not (dense and rows > lin.dense_above) else 3)
    assert (err <= bound).all(), (err / bound).max().item()


def test_int4_forms_are_exact_where_bf16_holds_the_weights():
    """With power-of-two scales every weight is a bf16 number and one-hot rows pick single weights:
    no rounding is left, so the output must be the weight itself, bit for bit. This pins the
    layouts (nibble order, groups, scale and zero per group, the -8 offset, the hi/lo split)."""
    gen = torch.Generator().manual_seed(7)
    eye = torch.eye(K_IN, dtype=torch.bfloat16)
    scale = 2.0 ** -torch.randint(3, 10, (N_OUT, K_IN // INT4_GROUP), generator=gen).float()
    codes = torch.randint(0, 16, (N_OUT, K_IN), generator=gen, dtype=torch.uint8)
    zero = torch.randint(-8, 9, scale.shape, generator=gen).float() * scale              # w = (q - 8 + k) * 2^-e
    int4 = Int4Linear.from_codes(codes, scale, zero, keep_dense=False)
    weight = (codes.float() - 8) * _per_group(scale) + _per_group(zero)
    assert torch.equal(int4(eye).float(), weight.T)
    q = torch.randint(-128, 128, (N_OUT, K_IN), generator=gen, dtype=torch.int16).to(torch.int8)
    head = int8_groups_as_int4_parts(q, scale)                                           # |q| <= 128: 8 bits
    assert torch.equal(head(eye).float(), (q.float() * _per_group(scale)).T)


@pytest.mark.parametrize("rows", BATCHES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_int8_linear_matches_float64(rows, dtype):
    """Per-channel int8 (`--quantize int8`), against its own q * scale in float64 (the scale is held
    in bf16, so the product is exact). ATen, r = 2, the activations and the output, rounded to bf16
    for float32 inputs too: its kernel is vectorised for 16-bit inputs only. Native, r = 1 (the
    output, bf16 only) + the int8 activations' term."""
    gen = torch.Generator().manual_seed(200 + rows)
    w = torch.randn(N_OUT, K_IN, generator=gen) * 0.05
    lin = Int8Linear(w)
    assert lin.q.dtype == torch.int8
    assert ((lin.q.float() * lin.scale.float()[:, None] - w).abs() <= lin.scale.float()[:, None] * 0.5).all()
    weight = lin.q.double() * lin.scale.double()[:, None]
    x = torch.randn(rows, K_IN, generator=gen).to(dtype)
    y = lin(x)
    assert y.dtype == dtype
    err = (y.double() - x.double() @ weight.T).abs()
    if lin.native:
        bound = _bound(x, weight.abs(), bf16_roundings=1) + _int8_activations(x, weight.abs())
    else:
        bound = _bound(x, weight.abs(), bf16_roundings=2)
    assert (err <= bound).all(), (err / bound).max().item()
