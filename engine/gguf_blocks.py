"""GGUF quantized blocks decoded into the group-of-32 affine forms our int4 kernel holds exactly.

Layouts as gguf-py's ``quants.py`` reads them (one row of K weights = K / block_size blocks):

    Q4_0  fp16 d, 16 bytes of nibbles                 w = d * (q - 8)               32 weights
    Q4_1  fp16 d, fp16 m, 16 bytes of nibbles          w = d * q + m                 32 weights
    Q8_0  fp16 d, 32 int8                              w = d * q                     32 weights
    Q4_K  fp16 d, fp16 dmin, 12 bytes of 6-bit (sc, m) for 8 sub-blocks, 128 bytes of nibbles:
          sub-block j of 32 weights: w = (d * sc_j) * q - dmin * m_j     (256 weights)
    Q5_K  Q4_K's header, 32 bytes of fifth bits, 128 bytes of nibbles: q in 0..31, the same formula
    Q6_K  128 bytes low nibbles, 64 bytes of high 2 bits, 16 int8 scales, fp16 d:
          16 weights per scale: w = (d * sc_j) * (q - 32), q in 0..63      (256 weights)

Every Q4_0 / Q4_1 / Q4_K group of 32 has one scale and one offset and 4-bit codes: the int4 form
``w = (q - 8) * scale + zero`` holds it with zero = offset + 8 * scale (``Int4Blocks``). Q8_0 and
Q5_K groups have one scale and offset with codes up to 8 bits (``Int8Blocks``, ``w = scale * u +
offset``, u in 0..255; Q8_0 symmetric: u = q + 128), which two int4 parts hold exactly (engine.gguf_forms). Q6_K changes scale
every 16 weights, which no group-32 form holds: it is requantized (engine.gguf_forms states the
bound). Products like d * sc (11 + 6 significant bits) and their sums with the offset are exact in
float32 for real files' magnitudes, so these decode bit for bit to gguf-py's ``dequantize``
(tests/test_gguf_blocks.py asserts it on random blocks of every type).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUP = 32
QK_K = 256


@dataclass
class Int4Blocks:
    """w = (codes - 8) * scale + zero per group of 32: codes uint8 (N, K) in 0..15, scale / zero float32 (N, K / 32)."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


@dataclass
class Int8Blocks:
    """w = u * scale + offset per group of 32: u uint8 (N, K) in 0..255, scale / offset float32 (N, K / 32);
    offset None: symmetric, w = (u - 128) * scale (Q8_0)."""
    u: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None

    def offsets(self) -> torch.Tensor:
        return -128 * self.scale if self.offset is None else self.offset


def split_rows(b: Int4Blocks | Int8Blocks | None, sizes: list[int]) -> list[Int4Blocks | Int8Blocks | None]:
    """The blocks of a fused tensor (Phi-3's attn_qkv, gate|up ffn_up) as its parts' blocks: rows hold
    whole groups, so a split by rows keeps every part's codes and scales as stored."""
    if b is None:
        return [None] * len(sizes)
    fields = [a if a is None else a.split(sizes) for a in vars(b).values()]
    return [type(b)(*(a if a is None else a[j] for a in fields)) for j in range(len(sizes))]


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 little-endian fp16 fields -> (...) float32."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _torch(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes of a 32-weight block -> (..., 32) codes: low nibbles are weights 0..15."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 12) packed 6-bit scales and mins of Q4_K / Q5_K -> (..., 8) each (gguf-py's get_scale_min)."""
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 128) bytes of a K-quant super-block -> (..., 8, 32) low 4 bits: byte chunk c holds
    sub-block 2c in its low nibbles and sub-block 2c + 1 in its high ones."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)
    return (chunks & 0x0F).reshape(*qs.shape[:-1], 8, 32)


def int4_blocks(raw: np.ndarray, kind: str) -> Int4Blocks:
    """raw (N, bytes per row) of a Q4_0 / Q4_1 / Q4_K tensor -> its exact int4 form."""
    N = raw.shape[0]
    if kind in ("Q4_0", "Q4_1"):
        header = 4 if kind == "Q4_1" else 2
        blocks = raw.reshape(N, -1, header + GROUP // 2)                     # (N, K / 32, bytes)
        d = _f16(blocks[..., 0:2])
        zero = _f16(blocks[..., 2:4]) + 8 * d if kind == "Q4_1" else np.zeros_like(d)
        codes = _nibbles32(blocks[..., header:]).reshape(N, -1)
        return Int4Blocks(*_torch(codes, d, zero))
    if kind == "Q4_K":
        blocks = raw.reshape(N, -1, 4 + 12 + QK_K // 2)                       # (N, K / 256, 144)
        scale, offset = _k_affine(blocks)                                      # (N, K / 256, 8)
        codes = _k_nibbles(blocks[..., 16:]).reshape(N, -1)
        return Int4Blocks(*_torch(codes, scale.reshape(N, -1), (offset + 8 * scale).reshape(N, -1)))
    raise ValueError(f"{kind} blocks have no exact int4 form")


def int8_blocks(raw: np.ndarray, kind: str) -> Int8Blocks:
    """raw (N, bytes per row) of a Q8_0 / Q5_K tensor -> its exact 8-bit affine form."""
    N = raw.shape[0]
    if kind == "Q8_0":
        blocks = raw.reshape(N, -1, 2 + GROUP)
        d = _f16(blocks[..., 0:2])
        u = (np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Int8Blocks(*_torch(u.reshape(N, -1), d), None)
    if kind == "Q5_K":
        blocks = raw.reshape(N, -1, 4 + 12 + QK_K // 8 + QK_K // 2)          # (N, K / 256, 176)
        scale, offset = _k_affine(blocks)
        qh = blocks[..., 16:48].reshape(*blocks.shape[:-1], 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)
        u = _k_nibbles(blocks[..., 48:]) | ((qh & 1) << 4)                    # (N, K / 256, 8, 32) in 0..31
        return Int8Blocks(*_torch(u.reshape(N, -1), scale.reshape(N, -1), offset.reshape(N, -1)))
    raise ValueError(f"{kind} blocks have no exact 8-bit group-32 form")


def _k_affine(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K super-blocks (..., bytes) -> per sub-block scale d * sc and offset -dmin * m, (..., 8)."""
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    sc, mn = _k_scale_min(blocks[..., 4:16])
    return d[..., None] * sc, -(dmin[..., None] * mn)


INT4_KINDS = ("Q4_0", "Q4_1", "Q4_K")          # stored as they are in one int4 part
INT8_KINDS = ("Q8_0", "Q5_K")                  # stored as they are in two int4 parts
REQUANTIZED_KINDS = ("Q6_K",)                  # no group-32 form holds them: requantized
FLOAT_KINDS = ("F32", "F16", "BF16")
SUPPORTED_KINDS = FLOAT_KINDS + INT4_KINDS + INT8_KINDS + REQUANTIZED_KINDS
