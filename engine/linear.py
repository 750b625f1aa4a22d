"""The base model's projections in each resident form, one call: ``y = proj(x)``, x (T, d_in).

    DenseLinear  ``F.linear`` in the engine dtype.
    Int4Linear   4-bit codes in groups of 32 input features, each group with its own scale and
                 zero, ``w = (q - 8) * scale + zero``. A sum of such parts can hold an int8 group-32
                 weight exactly (see ``int8_groups_as_int4_parts``).
    Int8Linear   per-output-channel int8 weights.

Both run the native kernel (``engine.native_quant``: activations quantized to int8 per group of
32, integer dot products, float32 accumulation) at every row count, where it builds. Without it
they run ATen's weight-only kernels on bf16 activations (``_weight_int4pack_mm_for_cpu``,
``_weight_int8pack_mm``), and an int4 projection keeps a bf16 copy of its dequantized weight for
steps with more than ``dense_above`` rows: there ATen's int4 kernel is compute-bound and slower
than a bf16 GEMM (benchmarks/bench_native.py, its `aten_int4_us` and `bf16_linear_us` columns). The native and ATen forms store the same codes
and bf16 scales/zeros; only the byte order of the packed codes differs (``pack_int4``).
"""
from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from loramux.engine import native_quant

INT4_GROUP = 32            # the GGUF Q4_0/Q4_1/Q8_0 block: scales map one to one
INT4_DENSE_ABOVE = 16      # rows from which the bf16 GEMM beats ATen's int4 kernel (benchmarks/bench_native.py)
# rows from which dequantizing the native parts for the step and one bf16 GEMM beat the integer dots,
# on a CPU with bf16 hardware (one-off in-process timings of the embedded model's steps, EPYC AVX512-BF16,
# not a benchmarks/ results file: a 17-row step 71 vs
# 68 ms, 24 rows 74 vs 83 ms, 128 rows 169 vs 320 ms, 1,500 rows 1.9 vs 4.1 s)
INT4_DEQUANTIZE_ABOVE = 20


def native_available() -> bool:
    """Whether the quantized forms built now run the native kernel (else ATen's)."""
    return native_quant.ops() is not None


@functools.cache
def bf16_matmul_in_hardware() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there a bf16 GEMM beats
    the int4 kernels on many rows; elsewhere oneDNN widens bf16 to float32 and runs 3-8x slower than
    the native kernel (benchmarks/results/native.json)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


class DenseLinear(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)          # (d_out, d_in)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def dequantized(self) -> torch.Tensor:
        """float32 (d_out, d_in): the weight this projection multiplies by."""
        return self.weight.float()


class Int4Linear(nn.Module):
    """y = sum over parts of int4mm(x, part); the output is cast back to x's dtype. Native: float32
    sums of int8-activation dots; ATen: bf16 activations and outputs. `native` says which layout
    `parts` are packed in (default: the one `pack_int4` gives now)."""

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor]], out_features: int,
                 dense: torch.Tensor | None = None, dense_above: int = INT4_DENSE_ABOVE,
                 native: bool | None = None) -> None:
        super().__init__()
        if len(parts) not in (1, 2):
            raise ValueError("an int4 projection has one part (int4) or two (int8 in groups)")
        for i, (packed, scales_zeros) in enumerate(parts):
            self.register_buffer(f"packed{i}", packed)              # uint8 (d_out, d_in / 2), see pack_int4
            self.register_buffer(f"scales_zeros{i}", scales_zeros)  # bf16 (d_in / 32, d_out, 2)
        self.native = native_available() if native is None else native
        self.num_parts = len(parts)
        self._out_features = out_features
        self.register_buffer("dense", dense)                         # bf16 (d_out, d_in) or None
        self.dense_above = dense_above
        # On a CPU that multiplies bf16 in hardware, steps of more rows multiply by the native parts
        # dequantized for the step (one pass over the codes) in one bf16 GEMM: there the integer dots
        # cost ~2-3x a bf16 GEMM per row. None: the int4 kernel at every row count.
        self.dequantize_above: int | None = (INT4_DEQUANTIZE_ABOVE if self.native and bf16_matmul_in_hardware()
                                             else None)

    @property
    def out_features(self) -> int:
        return self._out_features

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *,
                   keep_dense: bool = True) -> Int4Linear:
        """codes int (d_out, d_in) in 0..15, scale / zero float32 (d_out, d_in / 32): w = (q - 8) * scale + zero.
        keep_dense: with ATen's kernel, keep the bf16 copy for large steps (the native one needs none)."""
        native = native_available()
        part = pack_int4(codes, scale, zero, native=native)
        dense = dequantize_int4(codes, scale, zero).to(torch.bfloat16) if keep_dense and not native else None
        return cls([part], codes.shape[0], dense, native=native)

    def dequantized(self) -> torch.Tensor:
        """float32 (d_out, d_in): the bf16 dense copy the large steps multiply by; without one, the
        codes and bf16 scales/zeros the kernel reads (native: exact up to float32's rounding of each
        weight; ATen: read back through its kernel, identity input, exact up to its bf16 output)."""
        if self.dense is not None:
            return self.dense.float()
        if self.native:
            return sum(unpack_native_int4(getattr(self, f"packed{i}"), getattr(self, f"scales_zeros{i}"))
                       for i in range(self.num_parts))
        packed0 = self.packed0                                      # (d_out, d_in / 2)
        eye = torch.eye(packed0.shape[1] * 2, dtype=torch.bfloat16, device=packed0.device)
        w = sum(torch.ops.aten._weight_int4pack_mm_for_cpu(eye, getattr(self, f"packed{i}"), INT4_GROUP,
                                                            getattr(self, f"scales_zeros{i}")).float()
                for i in range(self.num_parts))
        return w.T.contiguous()

    def parts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(getattr(self, f"packed{i}"), getattr(self, f"scales_zeros{i}")) for i in range(self.num_parts)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, w = x.shape[0], None
        if self.dense is not None and rows > self.dense_above:
            w = self.dense
        elif self.dequantize_above is not None and rows > self.dequantize_above:
            w = native_quant.dequantize_bf16(self.parts(), _step_weight(self.out_features, self.packed0.shape[1] * 2))
        if w is not None:
            y = F.linear(x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16), w)
        elif self.native:
            act = native_quant.quantize_rows(x)
            y = native_quant.int4_mm(act, self.packed0, self.scales_zeros0)
            if self.num_parts == 2:
                native_quant.int4_mm(act, self.packed1, self.scales_zeros1, out=y)
        else:
            xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
            if not xb.is_contiguous():
                xb = xb.contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed0, INT4_GROUP, self.scales_zeros0)
            if self.num_parts == 2:
                y.add_(torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed1, INT4_GROUP, self.scales_zeros1))
        return y if y.dtype == x.dtype else y.to(x.dtype)


_step_weights = threading.local()


def _step_weight(n: int, k: int) -> torch.Tensor:
    """The bf16 (n, k) buffer a step dequantizes int4 parts into, one per shape and thread, reused by
    every projection of that shape: a thread runs one projection at a time, and two engines stepping
    on two threads of one process never share one."""
    buffers: dict[tuple[int, int], torch.Tensor] = _step_weights.__dict__.setdefault("by_shape", {})
    buf = buffers.get((n, k))
    if buf is None:
        buf = buffers[n, k] = torch.empty(n, k, dtype=torch.bfloat16)
    return buf


class Int8Linear(nn.Module):
    """Per-channel symmetric int8 weights: w[n] = q[n] * scale[n]. Native: int8 activations, float32
    sums; ATen: bf16 activations (its kernel is vectorised for 16-bit inputs only: float32 would
    take a scalar loop ~10x slower) and outputs."""

    def __init__(self, weight: torch.Tensor, native: bool | None = None) -> None:
        super().__init__()
        self.native = native_available() if native is None else native
        w = weight.float()
        # The kernel reads bf16 scales: quantize against the rounded scale (nudged up so 127 steps
        # still reach the row's largest weight), so q * scale is exactly the weight served.
        scale = (w.abs().amax(1).clamp(min=1e-12) / 127 * (1 + 2**-8)).to(torch.bfloat16)     # (d_out,)
        self.register_buffer("q", (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scale", scale)

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            y = native_quant.int8_mm(native_quant.quantize_rows(x), self.q, self.scale)
        else:
            xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
            y = torch._weight_int8pack_mm(xb.contiguous(), self.q, self.scale)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """float32 (d_out, d_in): q * scale, row by row."""
        return self.q.float() * self.scale.unsqueeze(1)


def pack_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              native: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (N, K) in 0..15, scale / zero (N, K / 32)) -> the packed codes, uint8 (N, K / 2), and
    their bf16 (K / 32, N, 2) scales-and-zeros. Native layout (GGUF Q4's): per group of 32, byte j
    holds code j in its low nibble and code j + 16 in its high one; else ATen's own packing."""
    if native_available() if native is None else native:
        N, K = codes.shape
        c = codes.to(torch.uint8).reshape(N, K // INT4_GROUP, 2, INT4_GROUP // 2)
        packed = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(N, K // 2).contiguous()
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
    return packed, scales_zeros


def unpack_native_int4(packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """float32 (N, K) from one part in the native layout: (q - 8) * scale + zero with the bf16 scales."""
    N, K = packed.shape[0], packed.shape[1] * 2
    p = packed.reshape(N, K // INT4_GROUP, INT4_GROUP // 2)
    codes = torch.stack([p & 15, p >> 4], dim=2)                                    # (N, K / 32, 2, 16)
    scale, zero = scales_zeros.float().unbind(-1)                                  # (K / 32, N) each
    return dequantize_int4(codes.reshape(N, K), scale.T, zero.T)


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 (N, K): (q - 8) * scale + zero, group by group."""
    N, K = codes.shape
    q = codes.float().reshape(N, K // INT4_GROUP, INT4_GROUP) - 8
    return (q * scale.unsqueeze(-1) + zero.unsqueeze(-1)).reshape(N, K)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max 4-bit quantization in groups of 32 input features (GGUF Q4_1's scheme):
    -> codes (N, K) in 0..15, scale, zero (N, K / 32) float32."""
    N, K = weight.shape
    g = weight.float().reshape(N, K // INT4_GROUP, INT4_GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo).clamp(min=1e-12) / 15
    codes = ((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15).to(torch.uint8).reshape(N, K)
    return codes, scale, lo + 8 * scale


def int8_groups_as_int4_parts(q: torch.Tensor, d: torch.Tensor) -> Int4Linear:
    """An int8 weight with one scale per group of 32 (GGUF Q8_0: w = d * q, q in -128..127) held
    exactly as two int4 parts: with u = q + 128 = 16 * hi + lo,
        w = d * (u - 128) = [(hi - 8) * 16d + 0] + [(lo - 8) * d + 8d].
    Half the bytes of a bf16 copy, read by the int4 kernel; only d is rounded (to bf16)."""
    u = (q.to(torch.int16) + 128).to(torch.uint8)
    hi, lo = u >> 4, u & 15
    zeros = torch.zeros_like(d)
    native = native_available()
    parts = [pack_int4(hi, 16 * d, zeros, native=native), pack_int4(lo, d, 8 * d, native=native)]
    return Int4Linear(parts, q.shape[0], dense=None, native=native)


def quantize_int8_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 in groups of 32 (GGUF Q8_0's scheme): -> q (N, K) int8, d (N, K / 32) float32."""
    N, K = weight.shape
    g = weight.float().reshape(N, K // INT4_GROUP, INT4_GROUP)
    d = g.abs().amax(-1).clamp(min=1e-12) / 127
    q = (g / d.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8).reshape(N, K)
    return q, d
