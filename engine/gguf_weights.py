"""Read a GGUF checkpoint's quantized projections as they are stored, for the int4 path.

GGUF Q4_1 keeps each block of 32 weights of a row as fp16 ``d``, fp16 ``m`` and 32 4-bit codes,
``w = d * q + m``; Q4_0 as ``d`` and codes, ``w = d * (q - 8)``; Q8_0 as ``d`` and 32 int8,
``w = d * q``. The int4 kernel computes ``(q - 8) * scale + zero`` per group of 32, so Q4_1 maps
onto it with scale = d, zero = m + 8d (Q4_0: zero = 0), and serving reads the very codes the file
ships: the weights transformers dequantizes from the same file (our float32 oracle) are exactly
these values, before the kernel rounds the scales to bf16.

llama.cpp stores Llama's q/k rows permuted for its rotary layout; transformers undoes it on
loading (``_reverse_permute_weights``), and so do we, on codes and scales alike.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

BLOCK = 32
# GGUF tensor name -> (HF projection, heads to un-permute by: "q" / "kv" / None)
_PROJECTIONS = {"attn_q": ("q_proj", "q"), "attn_k": ("k_proj", "kv"), "attn_v": ("v_proj", None),
                "attn_output": ("o_proj", None), "ffn_gate": ("gate_proj", None), "ffn_up": ("up_proj", None),
                "ffn_down": ("down_proj", None)}


class GGUFWeights:
    """The GGUF's projections and token embedding, by (layer, HF projection name)."""

    def __init__(self, path: Path, num_heads: int, num_kv_heads: int) -> None:
        from gguf import GGUFReader

        self.path = Path(path)
        self._tensors = {t.name: t for t in GGUFReader(self.path).tensors}
        self._heads = {"q": num_heads, "kv": num_kv_heads}

    def int4(self, layer: int, proj: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(codes uint8 (N, K) in 0..15, scale, zero float32 (N, K / 32)) of a Q4_0/Q4_1 projection,
        or None when the file holds it in another format."""
        name, heads = next((g, h) for g, (hf, h) in _PROJECTIONS.items() if hf == proj)
        t = self._tensors[f"blk.{layer}.{name}.weight"]
        kind = t.tensor_type.name
        if kind not in ("Q4_0", "Q4_1"):
            return None
        raw = np.ascontiguousarray(t.data)                             # (N, K / 32 * block bytes)
        N = raw.shape[0]
        header = 4 if kind == "Q4_1" else 2
        blocks = raw.reshape(N, -1, header + BLOCK // 2)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)      # (N, K / 32)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "Q4_1" else None
        nibbles = blocks[..., header:]
        codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(N, -1)  # elements 0..15, 16..31
        zero = m + 8 * d if m is not None else np.zeros_like(d)
        out = [torch.from_numpy(a) for a in (codes, d, zero)]
        if heads is not None:
            out = [unpermute_rows(a, self._heads[heads]) for a in out]
        return out[0], out[1], out[2]

    def token_embedding_q8(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(q int8 (V, d), scale float32 (V, d / 32)) of a Q8_0 token embedding, else None."""
        t = self._tensors.get("token_embd.weight")
        if t is None or t.tensor_type.name != "Q8_0":
            return None
        raw = np.ascontiguousarray(t.data)
        blocks = raw.reshape(raw.shape[0], -1, 2 + BLOCK)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = blocks[..., 2:].copy().view(np.int8).reshape(raw.shape[0], -1)
        return torch.from_numpy(q), torch.from_numpy(d)


def unpermute_rows(a: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' ``_reverse_permute_weights`` on the row axis of any (N, ...) tensor."""
    dim = a.shape[0] // n_head // 2
    return a.reshape(n_head, dim, 2, *a.shape[1:]).transpose(1, 2).reshape(a.shape).contiguous()
