"""Paged attention on torch ops: KV lives in a flat cache of fixed-size blocks.

The cache is head-major, ``(n_kv_heads, rows, head_dim)`` per layer, so the rows a step gathers
for its decode tokens come out as ``(n_kv_heads * B, ctx, head_dim)``: ready for one batched
matmul over every (sequence, kv head) pair, grouped-query heads side by side, with no transposed
copy. Per step the runner builds an ``AttentionMetadata`` once; every layer reuses it. Prompts
being prefilled attend one by one (their lengths differ).

Nothing an earlier request left in a block reaches a later one (issue #28). Decode gathers whole
blocks: the rows of a sequence's last block past its length, and the padding up to the batch's
longest context, are masked by an additive -inf. A mask cannot stop a non-finite value there: a NaN
or Inf key makes its score NaN (-inf + NaN), and a masked value still enters ``probs @ values`` as
0 * NaN = NaN, so one request's overflowed K/V, left in a freed block, turned later requests'
answers to NaN. Three rules now keep masked rows exact zeros: no non-finite K/V is ever written (the
step checks each layer's new K/V and drops the offending tokens, whose sequences fail), padding
reads a null block that nothing writes, and the rows of a block past its sequence's length are
cleared when the sequence starts writing that block. A masked row then adds exactly 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from loramux.engine.batch_invariant import prefill_attention

# Decode batches up to this size attend in float32 even in a bf16 engine: measured on a 2-core EPYC
# (1 thread), one layer's decode attention at batch 1 took 57 us in bf16 and 17 us in float32.
SMALL_BF16_BATCH = 8


@dataclass
class PrefillSpan:
    start: int                        # first row of this sequence's tokens in the flat batch
    end: int
    context_slots: torch.Tensor | None  # [ctx] cache rows to attend to; None = only its own new tokens
    mask: torch.Tensor | None           # [q, ctx] bool, True = attend (None: plain causal)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor           # [T] cache row where each new token's K/V is written
    prefills: list[PrefillSpan]
    decode_start: int                    # decode tokens are rows decode_start.. of the flat batch
    decode_blocks: torch.Tensor | None   # [B * nb] KV blocks of each decode sequence, padded to nb blocks
    decode_mask: torch.Tensor | None     # [n_kv * B, 1, nb * block_size] additive: 0 = attend, -inf = not its token
    block_size: int = 0
    clear_rows: torch.Tensor | None = None   # [R] cache rows past their sequence's length in a block it starts
    # Filled by the forward pass: rows of the flat batch whose new K/V was not finite (never written).
    nonfinite_rows: set[int] = field(default_factory=set)
    batch_invariant: bool = False            # per-row arithmetic (engine.batch_invariant)
    window: int | None = None                # sliding window of the layers this metadata serves (None: full)


class KVCache:
    """One K and one V tensor per layer: [n_kv_heads, (num_blocks + 1) * block_size, head_dim]. The
    extra block, `null_block`, is never allocated nor written: decode pads with it (all zeros)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.null_block = num_blocks
        shape = (n_kv_heads, (num_blocks + 1) * block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(num_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              clear: torch.Tensor | None = None) -> None:
        """k, v: (T, n_kv, hd) of new tokens -> cache rows `rows`; rows `clear` (if any) -> 0."""
        self.k[layer].index_copy_(1, rows, k.transpose(0, 1))
        self.v[layer].index_copy_(1, rows, v.transpose(0, 1))
        if clear is not None:
            self.k[layer].index_fill_(1, clear, 0)
            self.v[layer].index_fill_(1, clear, 0)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: KVCache, layer: int,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, nh, hd]; k, v: [T, nkv, hd] for the new tokens. Writes k/v to the cache, returns [T, nh * hd].
    Tokens whose k/v is not finite are recorded in `meta.nonfinite_rows` and their rows get zeros."""
    if not bool(torch.isfinite(k.sum() + v.sum())):     # one reduction per layer; exact check only then
        k, v = _drop_nonfinite(k, v, meta)
    kv.write(layer, meta.slot_mapping, k, v, meta.clear_rows)
    k_cache, v_cache = kv.k[layer], kv.v[layer]
    T, nh, hd = q.shape
    if not meta.prefills:
        return _decode(q, k_cache, v_cache, meta, scale)
    out = torch.empty(T, nh * hd, dtype=q.dtype, device=q.device)
    for span in meta.prefills:
        if meta.batch_invariant:
            out[span.start:span.end] = _invariant_prefill(q, k, k_cache, v, v_cache, span, scale, meta.window)
            continue
        qs = q[span.start:span.end].transpose(0, 1).unsqueeze(0)                # (1, nh, q, hd)
        if span.context_slots is None:                                          # fresh prompt
            ks = k[span.start:span.end].transpose(0, 1).unsqueeze(0)            # (1, nkv, q, hd)
            vs = v[span.start:span.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        else:
            ks = k_cache.index_select(1, span.context_slots).unsqueeze(0)       # (1, nkv, ctx, hd)
            vs = v_cache.index_select(1, span.context_slots).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=span.mask, scale=scale, enable_gqa=True)
        out[span.start:span.end] = o[0].transpose(0, 1).reshape(span.end - span.start, nh * hd)
    if meta.decode_blocks is not None:
        out[meta.decode_start:] = _decode(q[meta.decode_start:], k_cache, v_cache, meta, scale)
    return out


def _drop_nonfinite(k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v with the tokens holding a NaN or Inf zeroed, those tokens added to meta.nonfinite_rows.
    (A sum of finite values that overflows lands here too and finds no such token.)"""
    bad = ~(torch.isfinite(k).flatten(1).all(1) & torch.isfinite(v).flatten(1).all(1))    # (T,)
    meta.nonfinite_rows.update(bad.nonzero().flatten().tolist())
    keep = ~bad[:, None, None]
    return k.where(keep, 0), v.where(keep, 0)


def _invariant_prefill(q: torch.Tensor, k: torch.Tensor, k_cache: torch.Tensor, v: torch.Tensor,
                       v_cache: torch.Tensor, span: PrefillSpan, scale: float, window: int | None) -> torch.Tensor:
    """A prefill span in batch-invariant mode: one formula whatever the chunking (a fresh prompt's
    keys are its own new ones, a later chunk's the cached context)."""
    if span.context_slots is None:
        keys, values = k[span.start:span.end].transpose(0, 1), v[span.start:span.end].transpose(0, 1)
    else:
        keys, values = k_cache.index_select(1, span.context_slots), v_cache.index_select(1, span.context_slots)
    first = keys.shape[1] - (span.end - span.start)
    return prefill_attention(q[span.start:span.end], keys, values, first, scale, window)


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
            scale: float) -> torch.Tensor:
    """One new token per sequence against its whole context: q [B, nh, hd] -> [B, nh * hd].

    In 16-bit, grouped-query heads become one batched matmul: the G query heads of a kv head are G
    rows against that head's keys, over n_kv * B (kv head, sequence) pairs (SDPA's CPU kernels are
    several times slower at these shapes in bf16). Float32 takes SDPA, transformers' arithmetic."""
    B, nh, hd = q.shape
    nkv, bs = k_cache.shape[0], meta.block_size
    G, ctx = nh // nkv, meta.decode_mask.shape[-1]                               # ctx: whole blocks
    # One gather of whole blocks per layer, straight into the batched-matmul layout.
    keys = k_cache.view(nkv, -1, bs, hd).index_select(1, meta.decode_blocks).view(nkv * B, ctx, hd)
    values = v_cache.view(nkv, -1, bs, hd).index_select(1, meta.decode_blocks).view(nkv * B, ctx, hd)
    if q.dtype == torch.float32 and not meta.batch_invariant:
        # float32 is the exact mode: SDPA, as transformers computes it (padding adds exact zeros), so a
        # quantized base that rounds its inputs sees the very values transformers' run does.
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys.view(nkv, B, ctx, hd).transpose(0, 1), values.view(nkv, B, ctx, hd).transpose(0, 1),
            attn_mask=meta.decode_mask.view(nkv, B, 1, 1, ctx)[0], scale=scale, enable_gqa=True)  # (B, nh, 1, hd)
        return o.view(B, nh * hd)
    qg = q.view(B, nkv, G, hd).transpose(0, 1).reshape(nkv * B, G, hd)           # (nkv*B, G, hd)
    mask = meta.decode_mask
    if B <= SMALL_BF16_BATCH or meta.batch_invariant:
        # bf16 batched matmuls this small take a slow path (~3x float32's); the casts cost less.
        qg, keys, values, mask = qg.float(), keys.float(), values.float(), mask.float()
    scores = torch.baddbmm(mask, qg, keys.transpose(1, 2), alpha=scale)          # (nkv*B, G, ctx)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    o = torch.bmm(probs, values).to(q.dtype)                                      # (nkv*B, G, hd)
    return o.view(nkv, B, G, hd).transpose(0, 1).reshape(B, nh * hd)
