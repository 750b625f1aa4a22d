"""The native int8 x int4 / int8 kernel (engine/csrc/quant_matmul.cpp) against float64, on every
dispatch path this CPU runs (scalar and AVX2 are forced on an AVX512 machine too).

What is exact and what is bounded:
- activation quantization: bit for bit against the same float32 operations in torch
  (d = amax / 127, qx = round-half-even(x * (1 / d)), sx = sum(qx));
- integer dots: exact (int32 sums of at most 32 * 15 * 127 or 32 * 127 * 127 per group);
- float part, per output over G = K / 32 groups in order: t = fma(z, sx, s * (S - 8 sx)) (two
  float32 roundings) then acc = fma(t, d, acc) (one per group), so against float64 on the same
  quantized inputs |y - ref| <= (G + 2) * 2^-24 * 1.01 * R, R = sum_g |d| (|s| |S - 8 sx| + |z| |sx|)
  (standard recursive-summation bound, 1.01 for second-order terms); one more rounding (G + 3)
  when a second part adds into the output;
- every path does the same float32 operations in the same order: paths agree bit for bit.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from loramux.engine import native_quant
from loramux.engine.linear import INT4_GROUP, pack_int4, unpack_native_int4

U32 = 2.0 ** -24
ROWS = list(range(1, 65))
SHAPES = [(96, 576), (8, 32), (13, 64), (1536, 576), (37, 160)]       # (N, K): full and partial 8-column tiles


@pytest.fixture(scope="module")
def ops():
    module = native_quant.ops()
    assert module is not None, "the native kernel must build on x86-64 with g++ (see the log)"
    return module


def _paths(ops) -> list[int]:
    return list(range(ops.best_path() + 1))


def reference_quantize(x: torch.Tensor):
    """The kernel's activation quantization in torch's float32 operations."""
    M, K = x.shape
    g = x.float().reshape(M, K // INT4_GROUP, INT4_GROUP)
    d = g.abs().amax(-1) / 127
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(g * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q.reshape(M, K), d, q.to(torch.int32).sum(-1, dtype=torch.int32)


def _random_int4(gen, n, k):
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = torch.rand(n, k // INT4_GROUP, generator=gen) * 0.02 + 0.001
    zero = torch.randn(n, k // INT4_GROUP, generator=gen) * 0.05
    return codes, scale, zero


def reference_int4(qx, dx, sx, codes, scales_zeros):
    """float64 (M, N) and the bound's R, from the same quantized activations and bf16 scales/zeros."""
    M, K = qx.shape
    N, G = codes.shape[0], K // INT4_GROUP
    S = torch.einsum("mgj,ngj->mng", qx.double().view(M, G, INT4_GROUP), codes.double().view(N, G, INT4_GROUP))
    s, z = (t.double().T for t in scales_zeros.unbind(-1))                     # (N, G)
    integer = S - 8 * sx.double().unsqueeze(1)                                  # (M, N, G), exact
    terms = s * integer + z * sx.double().unsqueeze(1)
    magnitude = (s.abs() * integer.abs() + z.abs() * sx.double().abs().unsqueeze(1))
    d = dx.double().unsqueeze(1)
    return (terms * d).sum(-1), (magnitude * d.abs()).sum(-1)


def test_activation_quantization_is_bit_exact(ops):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 576, generator=gen) * torch.rand(64, 1, generator=gen) * 4
    x[3, :32] = 0                                                                  # an all-zero group
    x[5, 40] = 1e-30                                                               # a tiny amax
    for xx in (x, x.bfloat16(), x[:1, :64]):
        want = reference_quantize(xx)
        for p in _paths(ops):
            for a, b in zip(native_quant.quantize_rows(xx, path=p), want):
                assert a.dtype == b.dtype and torch.equal(a, b), p
    q, d, _ = native_quant.quantize_rows(x)
    assert (q.abs() <= 127).all() and q.view(64, -1, 32).abs().amax(-1).max() == 127
    # round to nearest: each element within half a step of its group's scale
    assert ((q.float().view(64, -1, 32) * d.unsqueeze(-1) - x.view(64, -1, 32)).abs()
            <= d.unsqueeze(-1) * (0.5 + 1e-5)).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_int4_kernel_matches_float64_on_every_path(ops, shape):
    N, K = shape
    gen = torch.Generator().manual_seed(N * K)
    codes, scale, zero = _random_int4(gen, N, K)
    packed, scales_zeros = pack_int4(codes, scale, zero, native=True)
    x = torch.randn(max(ROWS), K, generator=gen)
    for rows in ROWS:
        act = native_quant.quantize_rows(x[:rows])
        ref, magnitude = reference_int4(*act, codes, scales_zeros)
        bound = (K // INT4_GROUP + 2) * U32 * 1.01 * magnitude
        outs = [native_quant.int4_mm(act, packed, scales_zeros, path=p) for p in _paths(ops)]
        for p, y in enumerate(outs):
            assert y.shape == (rows, N) and y.dtype == torch.float32
            err = (y.double() - ref).abs()
            assert (err <= bound).all(), (rows, p, (err / bound).max().item())
            assert torch.equal(y, outs[0]), (rows, p, "paths must agree bit for bit")


def test_int4_second_part_adds_into_the_output(ops):
    gen = torch.Generator().manual_seed(5)
    N, K = 44, 96
    parts = [_random_int4(gen, N, K) for _ in range(2)]
    packed = [pack_int4(*p, native=True) for p in parts]
    for rows in (1, 7, 33):
        act = native_quant.quantize_rows(torch.randn(rows, K, generator=gen))
        refs = [reference_int4(*act, p[0], pk[1]) for p, pk in zip(parts, packed)]
        ref, magnitude = refs[0][0] + refs[1][0], refs[0][1] + refs[1][1]
        for p in _paths(ops):
            y = native_quant.int4_mm(act, *packed[0], path=p)
            native_quant.int4_mm(act, *packed[1], out=y, path=p)
            assert ((y.double() - ref).abs() <= (K // INT4_GROUP + 3) * U32 * 1.01 * magnitude).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_int8_kernel_matches_float64_on_every_path(ops, shape):
    """y = scale * sum_g fl(S_g * d_g): G roundings (fma per group) and the final product by the
    bf16 scale: (G + 1) * 2^-24 * 1.01 * |scale| * sum_g |d_g| |S_g|."""
    N, K = shape
    gen = torch.Generator().manual_seed(7 + N * K)
    q = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int16).to(torch.int8)
    scale = (torch.rand(N, generator=gen) * 0.01 + 1e-4).to(torch.bfloat16)
    x = torch.randn(max(ROWS), K, generator=gen)
    G = K // INT4_GROUP
    for rows in ROWS:
        qx, dx, _ = act = native_quant.quantize_rows(x[:rows])
        S = torch.einsum("mgj,ngj->mng", qx.double().view(rows, G, 32), q.double().view(N, G, 32))
        ref = (S * dx.double().unsqueeze(1)).sum(-1) * scale.double()
        bound = (G + 1) * U32 * 1.01 * (S.abs() * dx.double().unsqueeze(1)).sum(-1) * scale.double().abs()
        outs = [native_quant.int8_mm(act, q, scale, path=p) for p in _paths(ops)]
        for p, y in enumerate(outs):
            err = (y.double() - ref).abs()
            assert (err <= bound).all(), (rows, p, (err / bound).max().item())
            assert torch.equal(y, outs[0]), (rows, p)


def test_native_layout_round_trips_and_paths_are_checked(ops):
    gen = torch.Generator().manual_seed(9)
    codes, scale, zero = _random_int4(gen, 24, 96)
    packed, scales_zeros = pack_int4(codes, scale, zero, native=True)
    s, z = (t.float().T.repeat_interleave(INT4_GROUP, 1) for t in scales_zeros.unbind(-1))
    assert torch.equal(unpack_native_int4(packed, scales_zeros), (codes.float() - 8) * s + z)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 16] << 4)                     # GGUF Q4's nibble order
    if ops.best_path() < max(native_quant.PATHS.values()):           # a path the CPU lacks is refused
        act = native_quant.quantize_rows(torch.randn(2, 96, generator=gen))
        with pytest.raises(RuntimeError, match="not supported by this CPU"):
            native_quant.int4_mm(act, packed, scales_zeros, path=ops.best_path() + 1)


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("num_parts", [1, 2])
def test_dequantize_bf16_is_the_parts_weight_rounded_once(ops, n, k, num_parts):
    """The weight a large step multiplies by: the parts' float32 weights (unpack_native_int4: the
    same operations), summed, rounded to bf16 (nearest even) once: bit for bit, odd shapes too."""
    gen = torch.Generator().manual_seed(n * k + num_parts)
    parts = [pack_int4(*_random_int4(gen, n, k), native=True) for _ in range(num_parts)]
    want = sum(unpack_native_int4(p, sz) for p, sz in parts).to(torch.bfloat16)
    for path in _paths(ops):                     # scalar, and AVX-512 where the CPU has it (the VNNI path)
        got = native_quant.dequantize_bf16(parts, path=path)
        assert got.dtype == torch.bfloat16 and got.shape == (n, k)
        assert torch.equal(got, want), path


def test_rows_do_not_depend_on_their_batch_mates(ops):
    """Each row is quantized alone and each output sums its groups in one fixed order; threads split
    columns only: a row's output is the same bit for bit alone or among 63 others, on every path."""
    gen = torch.Generator().manual_seed(11)
    N, K = 200, 160
    packed, scales_zeros = pack_int4(*_random_int4(gen, N, K), native=True)
    q = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int16).to(torch.int8)
    scale = torch.rand(N, generator=gen).to(torch.bfloat16)
    x = torch.randn(64, K, generator=gen)
    for p in _paths(ops):
        batch = native_quant.quantize_rows(x, path=p)
        y4, y8 = native_quant.int4_mm(batch, packed, scales_zeros, path=p), native_quant.int8_mm(batch, q, scale, path=p)
        for i in (0, 17, 63):
            alone = native_quant.quantize_rows(x[i:i + 1], path=p)
            assert torch.equal(native_quant.int4_mm(alone, packed, scales_zeros, path=p), y4[i:i + 1]), (p, i)
            assert torch.equal(native_quant.int8_mm(alone, q, scale, path=p), y8[i:i + 1]), (p, i)


def test_a_failed_build_falls_back_to_aten_and_says_so_once(tmp_path):
    """No working compiler (CXX=/bin/false, a fresh build directory): the forms run ATen's kernels,
    and the log says why once, however often the kernel is asked for."""
    code = ("import logging, torch\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "from loramux.engine.linear import Int4Linear, Int8Linear, native_available, quantize_int4\n"
            "p = Int4Linear.from_codes(*quantize_int4(torch.randn(64, 64)))\n"
            "q = Int8Linear(torch.randn(16, 64))\n"
            "assert not native_available() and not p.native and not q.native and p.dense is not None\n"
            "print(tuple(p(torch.randn(3, 64)).shape), tuple(q(torch.randn(3, 64)).shape))\n")
    env = {**os.environ, "CXX": "/bin/false", "LORAMUX_EXT_DIR": str(tmp_path / "ext")}
    env.pop("LORAMUX_NATIVE", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "(3, 64) (3, 16)"
    assert out.stderr.count("native int4/int8 kernel could not be built") == 1, out.stderr[-3000:]
