"""A compact Llama-family decoder that adds the adapters' LoRA deltas to its projections.

Each layer has four projections, q/k/v and gate/up fused (one GEMM each): ``qkv_proj``,
``o_proj``, ``gate_up_proj``, ``down_proj``, each an ``engine.linear`` module in the resident
form the engine was started with (dense, int4, int8, bitsandbytes). The model loader
(``engine.models.loader``) builds them from a checkpoint. Every step runs on a flat batch of
tokens from many sequences (no padding): each carries a position, a KV cache row and an adapter
slot, so one forward pass serves any mix of adapters and the bare base model; the step's
``LoraStep`` adds each token's own adapter to the fused outputs' column slices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loramux.engine.attention import AttentionMetadata, KVCache, paged_attention
from loramux.engine.lora_step import LoraStep
from loramux.engine.models.spec import ModelSpec
from loramux.engine.quantize import dequantize_projection

QKV, O, GATE_UP, DOWN = range(4)          # indices of SHRINK_GROUPS, one per fused projection
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")   # DecoderLayer attribute of each


@dataclass
class ForwardContext:
    """Everything a step's forward pass needs besides the tokens; passed down, never global."""
    positions: torch.Tensor                 # [T]
    attn: AttentionMetadata
    kv: KVCache
    lora: LoraStep | None = None            # None when no token of the step uses an adapter
    cos: torch.Tensor | None = None         # (T, 1, hd) rotary tables for this step's positions, set once
    sin: torch.Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ATen's rms_norm: HF LlamaRMSNorm's float32 math in one call (one dispatch instead of eight).
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class RotaryEmbedding:
    """cos/sin tables in float32 (never cast with the model), looked up once per step."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, device: torch.device | str) -> None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
                                    / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)                                  # (P, hd)
        self.cos = emb.cos()
        # rotate_half(x) * sin == roll(x, hd/2) * (sin with its first half negated), product for product
        self.sin_signed = emb.sin() * torch.cat((-torch.ones(head_dim // 2), torch.ones(head_dim // 2))).to(device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin (T, 1, hd) for a step's positions: shared by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin_signed[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: [T, heads, hd] -> rotated: HF's x * cos + rotate_half(x) * sin, rounding for rounding
        (two products, then a sum: no fused multiply-add, so float32 results match transformers')."""
        return x * ctx.cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * ctx.sin


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.nh, self.nkv, self.hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_size, self.kv_size = self.nh * self.hd, self.nkv * self.hd
        self.ff = spec.intermediate_size
        self.scale = 1.0 / math.sqrt(self.hd)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        # Set by the loader: engine.linear modules (d_in -> d_out) holding the base weights.
        self.qkv_proj: nn.Module | None = None       # d -> q_size + 2 * kv_size
        self.o_proj: nn.Module | None = None         # q_size -> d
        self.gate_up_proj: nn.Module | None = None   # d -> 2 * ff
        self.down_proj: nn.Module | None = None      # ff -> d

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T, lora = h.shape[0], ctx.lora
        x = self.input_layernorm(h)
        qkv = self.qkv_proj(x)                                                       # (T, q + 2 kv)
        if lora is not None:
            lora.add(x, qkv, self.layer, QKV)
        k_end = self.q_size + self.kv_size
        qk = RotaryEmbedding.rotate(qkv[:, :k_end].view(T, self.nh + self.nkv, self.hd), ctx)
        q, k = qk[:, :self.nh], qk[:, self.nh:]                                      # (T, nh, hd), (T, nkv, hd)
        v = qkv[:, k_end:].view(T, self.nkv, self.hd)
        o = paged_attention(q, k, v, ctx.kv, self.layer, ctx.attn, self.scale)      # (T, nh * hd)
        out = self.o_proj(o)
        if lora is not None:
            lora.add(o, out, self.layer, O)
        h = h + out
        x = self.post_attention_layernorm(h)
        gate_up = self.gate_up_proj(x)                                               # (T, 2 ff)
        if lora is not None:
            lora.add(x, gate_up, self.layer, GATE_UP)
        a = F.silu(gate_up[:, :self.ff]) * gate_up[:, self.ff:]
        out = self.down_proj(a)
        if lora is not None:
            lora.add(a, out, self.layer, DOWN)
        return h + out


class LlamaModel(nn.Module):
    """Built by engine.models.loader.load_model, which sets the embedding, projections and lm_head."""

    def __init__(self, spec: ModelSpec, max_positions: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.register_buffer("embed_tokens", torch.empty(0))   # (vocab, d), set by the loader
        self.lm_head: nn.Module | None = None                  # d -> vocab
        self.rope = RotaryEmbedding(spec.head_dim, spec.rope_theta, max_positions, device)
        self.requires_grad_(False)

    def dequantized_weight(self, layer: int, group: int) -> torch.Tensor:
        """engine.lora_slots.BaseWeights: float32 (d_out, d_in) of layer `layer`'s fused projection
        number `group` (QKV, O, GATE_UP, DOWN), as its resident form multiplies by it."""
        return dequantize_projection(getattr(self.layers[layer], PROJECTIONS[group]))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext, logit_rows: torch.Tensor | None) -> torch.Tensor:
        """input_ids: [T] -> logits [len(logit_rows), vocab] in float32 (all rows if None)."""
        h = F.embedding(input_ids, self.embed_tokens)                            # (T, d)
        ctx.cos, ctx.sin = self.rope.tables(ctx.positions, h.dtype)
        for layer in self.layers:
            h = layer(h, ctx)
        if logit_rows is not None:
            h = h[logit_rows]
        return self.lm_head(self.norm(h)).float()
