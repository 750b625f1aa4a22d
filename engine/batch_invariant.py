"""`--batch-invariant`: a request's output does not depend on what else is batched with it.

Without it a row's arithmetic changes with its batch mates in these places (issue #28, item 10):
  - an int4 projection switches to its bf16 dense copy above 16 rows (engine.linear);
  - a GEMM's row blocking depends on its row count: one row takes a matrix-vector path, few rows a
    small-M kernel, more rows another (measured: float32 ``F.linear`` and ``bmm``);
  - decode attention runs in float32 up to 8 sequences and in bf16 above (engine.attention);
  - a step whose tokens all use one adapter takes plain matmuls, a mixed one embedding bags
    (kernels.torch_ops' ``single`` vs ``bagged``);
  - a prompt's chunk boundaries depend on the decodes of its step, and a first chunk takes SDPA's
    causal kernel while later ones take its masked kernel over the cache.
In this mode each is made per-row: int4 projections never use the dense copy (ATen's int4 kernel
computes every row alike: 1 to 64 rows measured bit-identical); dense projections run in tiles of
TILE rows (zero-padded), so every GEMM has one shape; decode attention is always float32; LoRA
always takes the embedding bags (one bag per token); prefill attention is one float32 formula for
every chunk, its query rows in TILE-row tiles against the whole context so far, masked. What a
batch still changes is how far decode attention's keys are padded (to the longest context of the
step) and how long a chunk's context is; the padded positions are masked to exact zeros
(engine.attention's docstring), which float32 ``bmm`` and softmax add without changing a row
(measured, 1 to 412 padded positions). Not covered: int8 and bitsandbytes projections (refused).
The cost is measured by benchmarks/bench_batch_invariant.py.
"""
from __future__ import annotations

import torch
from torch import nn

from loramux.engine.linear import DenseLinear, Int4Linear

TILE = 16                     # rows of every GEMM tile in this mode


def row_tiles(x: torch.Tensor, fn) -> torch.Tensor:
    """fn over x (T, ...) in tiles of exactly TILE rows (the last zero-padded) -> (T, ...)."""
    T = x.shape[0]
    pad = (-T) % TILE
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    return torch.cat([fn(x[i:i + TILE]) for i in range(0, T + pad, TILE)])[:T]


class RowTiledLinear(nn.Module):
    """A dense projection whose GEMMs always have TILE rows."""

    def __init__(self, inner: DenseLinear) -> None:
        super().__init__()
        self.inner = inner

    @property
    def out_features(self) -> int:
        return self.inner.out_features

    def dequantized(self) -> torch.Tensor:
        return self.inner.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return row_tiles(x, self.inner)


def make_batch_invariant(model: nn.Module, projections: tuple[str, ...]) -> None:
    """Turn a loaded model's projections (each layer's `projections` and the lm_head) per-row."""
    def convert(module: nn.Module) -> nn.Module:
        if isinstance(module, Int4Linear):
            module.dense, module.dequantize_above = None, None   # the int4 kernel at every row count
            return module
        if isinstance(module, DenseLinear):
            return RowTiledLinear(module)
        raise ValueError(f"--batch-invariant serves dense and int4 projections, not {type(module).__name__}")
    for layer in model.layers:
        for name in projections:
            setattr(layer, name, convert(getattr(layer, name)))
    model.lm_head = convert(model.lm_head)


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: int,
                      scale: float, window: int | None = None) -> torch.Tensor:
    """One chunk's attention, per-row: q (q, nh, hd) of logical positions first.., keys / values
    (nkv, ctx, hd) of positions 0..ctx-1 -> (q, nh * hd). float32; query rows (token, head of the
    group) in TILE-row tiles; each row attends to positions <= its own (and, with a sliding
    `window`, > its own - window, as transformers' sliding-window layers)."""
    n, nh, hd = q.shape
    nkv, ctx = keys.shape[0], keys.shape[1]
    G = nh // nkv
    qg = q.float().view(n, nkv, G, hd).permute(1, 0, 2, 3).reshape(nkv, n * G, hd)     # (nkv, n*G, hd)
    k32, v32 = keys.float().transpose(1, 2), values.float()                              # (nkv, hd, ctx), (nkv, ctx, hd)
    pos = first + torch.arange(n * G, device=q.device) // G                              # row -> its position
    k_pos = torch.arange(ctx, device=q.device).unsqueeze(0)
    allowed = k_pos <= pos.unsqueeze(1)                                                  # (n*G, ctx)
    if window is not None:
        allowed &= k_pos > pos.unsqueeze(1) - window

    out = torch.empty(nkv, n * G, hd, dtype=torch.float32, device=q.device)
    pad = (-(n * G)) % TILE
    if pad:
        qg = torch.cat([qg, qg.new_zeros(nkv, pad, hd)], 1)
        allowed = torch.cat([allowed, allowed.new_ones(pad, ctx)])
    for i in range(0, n * G + pad, TILE):
        scores = torch.bmm(qg[:, i:i + TILE], k32).mul_(scale)                           # (nkv, TILE, ctx)
        scores.masked_fill_(~allowed[i:i + TILE], float("-inf"))
        o = torch.bmm(torch.softmax(scores, dim=-1), v32)                                # (nkv, TILE, hd)
        end = min(i + TILE, n * G)
        out[:, i:end] = o[:, :end - i]
    return out.view(nkv, n, G, hd).permute(1, 0, 2, 3).reshape(n, nh * hd).to(q.dtype)
