"""Paged attention on torch ops: KV lives in a flat cache of fixed-size blocks.

Per step the runner builds an `AttentionMetadata` once; every layer reuses it. Prompts being
prefilled attend one by one (their lengths differ); decode tokens attend together as one padded
batch gathered from their blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    start: int                        # first row of this sequence's tokens in the flat batch
    end: int
    context_slots: torch.Tensor | None  # [ctx] cache rows to attend to; None = only its own new tokens
    mask: torch.Tensor | None           # [q, ctx] bool, True = attend (None: plain causal)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor         # [T] cache row where each new token's K/V is written
    prefills: list[PrefillSpan]
    decode_start: int                  # decode tokens are rows decode_start.. of the flat batch
    decode_slots: torch.Tensor | None  # [B, max_ctx] cache rows per decode sequence (padded with 0)
    decode_mask: torch.Tensor | None   # [B, 1, 1, max_ctx] additive: 0 = attend, -inf = padding


class KVCache:
    """One K and one V tensor per layer: [num_blocks * block_size, n_kv_heads, head_dim]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_blocks * block_size, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, nh, hd]; k, v: [T, nkv, hd] for the new tokens. Writes k/v to the cache, returns [T, nh, hd]."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    for span in meta.prefills:
        qs = q[span.start:span.end].transpose(0, 1).unsqueeze(0)                # (1, nh, q, hd)
        if span.context_slots is None:                                          # fresh prompt
            ks = k[span.start:span.end].transpose(0, 1).unsqueeze(0)            # (1, nkv, q, hd)
            vs = v[span.start:span.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        else:
            ks = k_cache[span.context_slots].transpose(0, 1).unsqueeze(0)       # (1, nkv, ctx, hd)
            vs = v_cache[span.context_slots].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=span.mask, scale=scale, enable_gqa=True)
        out[span.start:span.end] = o[0].transpose(0, 1)
    if meta.decode_slots is not None:
        n = meta.decode_slots.shape[0]
        qd = q[meta.decode_start:meta.decode_start + n].unsqueeze(2)            # (B, nh, 1, hd)
        kd = k_cache[meta.decode_slots].transpose(1, 2)                         # (B, nkv, ctx, hd)
        vd = v_cache[meta.decode_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale,
                                           enable_gqa=True)
        out[meta.decode_start:meta.decode_start + n] = o.squeeze(2)
    return out
