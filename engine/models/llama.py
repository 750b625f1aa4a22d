"""A compact Llama-family decoder that adds the adapters' LoRA deltas to its projections.

Each layer has four projections, q/k/v and gate/up fused (one GEMM each): ``qkv_proj``,
``o_proj``, ``gate_up_proj``, ``down_proj``, each an ``engine.linear`` module in the resident
form the engine was started with (dense, int4, int8, bitsandbytes). The model loader
(``engine.models.loader``) builds them from a checkpoint. Every step runs on a flat batch of
tokens from many sequences (no padding): each carries a position, a KV cache row and an adapter
slot, so one forward pass serves any mix of adapters and the bare base model; the step's
``LoraStep`` adds each token's own adapter to the fused outputs' column slices.

One implementation serves every architecture of ``engine.models.spec.ARCHITECTURES``: what differs
(biases, q/k norms, Gemma's (1 + w) norms and extra norms around attention and MLP, embedding scale,
GeGLU, softmax scale, rotary tables and sliding window per layer, final soft-cap) is data in the
``ModelSpec``, read here once at construction.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from loramux.engine.attention import AttentionMetadata, KVCache, paged_attention
from loramux.engine.lora_step import LoraStep
from loramux.engine.models.spec import ModelSpec, Rope
from loramux.engine.quantize import dequantize_projection

QKV, O, GATE_UP, DOWN = range(4)          # indices of SHRINK_GROUPS, one per fused projection
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")   # DecoderLayer attribute of each


class StepYielded(Exception):
    """The step stopped at a checkpoint for a request that arrived (engine.llm_engine.LLMEngine.step)."""


@dataclass
class ForwardContext:
    """Everything a step's forward pass needs besides the tokens; passed down, never global."""
    positions: torch.Tensor                 # [T]
    attn: AttentionMetadata                 # full causal attention
    kv: KVCache
    lora: LoraStep | None = None            # None when no token of the step uses an adapter
    windowed: dict[int, AttentionMetadata] = field(default_factory=dict)  # per sliding window: its masks
    # per rotary table of the spec: (cos, signed sin) (T, 1, rotary dim) for this step's positions, set once
    rope: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # asked before each layer and its attention, MLP and down projection: True stops the step
    # (StepYielded), its work dropped; None: never stops
    should_yield: Callable[[], bool] | None = None

    def attention(self, window: int | None) -> AttentionMetadata:
        return self.attn if window is None else self.windowed[window]

    def checkpoint(self) -> None:
        """Where a step may stop (between layers and between a layer's large parts): StepYielded."""
        if self.should_yield is not None and self.should_yield():
            raise StepYielded


class RMSNorm(nn.Module):
    """HF's RMSNorm; Gemma's multiplies by (1 + w): the loader stores offset + w as the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ATen's rms_norm: HF LlamaRMSNorm's float32 math in one call (one dispatch instead of eight).
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class RotaryEmbedding:
    """cos/sin tables in float32 (never cast with the model), looked up once per step, over the first
    2 * len(inv_freq) dims of a head (Phi-4-mini's partial rotary leaves the rest as they are)."""

    def __init__(self, rope: Rope, max_positions: int, device: torch.device | str) -> None:
        inv_freq = torch.tensor(rope.inv_freq, dtype=torch.float32, device=device)
        half = inv_freq.shape[0]
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)                                  # (P, rd)
        self.cos = emb.cos() * rope.attention_scaling
        # rotate_half(x) * sin == roll(x, rd/2) * (sin with its first half negated), product for product
        self.sin_signed = (emb.sin() * rope.attention_scaling) * torch.cat((-torch.ones(half), torch.ones(half))).to(device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin (T, 1, rd) for a step's positions: shared by every layer of this table."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin_signed[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, hd] -> rotated: HF's x * cos + rotate_half(x) * sin, rounding for rounding
        (two products, then a sum: no fused multiply-add, so float32 results match transformers')."""
        rd = cos.shape[-1]
        if rd == x.shape[-1]:
            return x * cos + torch.roll(x, rd // 2, dims=-1) * sin
        rot = x[..., :rd]
        return torch.cat((rot * cos + torch.roll(rot, rd // 2, dims=-1) * sin, x[..., rd:]), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.nh, self.nkv, self.hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_size, self.kv_size = self.nh * self.hd, self.nkv * self.hd
        self.ff = spec.intermediate_size
        self.scale = spec.attn_scale
        self.window = spec.layer_window[layer]
        self.rope = spec.layer_rope[layer]
        self.act = F.silu if spec.hidden_act == "silu" else partial(F.gelu, approximate="tanh")
        self.sandwich = spec.sandwich_norms
        d, eps = spec.hidden_size, spec.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps) if self.sandwich else None
        self.post_feedforward_layernorm = RMSNorm(d, eps) if self.sandwich else None
        self.q_norm = RMSNorm(self.hd, eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.hd, eps) if spec.qk_norm else None
        # Set by the loader: engine.linear modules (d_in -> d_out) holding the base weights, and their
        # biases (None: the architecture has none).
        self.qkv_proj: nn.Module | None = None       # d -> q_size + 2 * kv_size
        self.o_proj: nn.Module | None = None         # q_size -> d
        self.gate_up_proj: nn.Module | None = None   # d -> 2 * ff
        self.down_proj: nn.Module | None = None      # ff -> d
        self.biases: list[torch.Tensor | None] = [None] * 4   # per projection (QKV, O, GATE_UP, DOWN)

    def _project(self, group: int, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        y = getattr(self, PROJECTIONS[group])(x)
        if ctx.lora is not None:
            ctx.lora.add(x, y, self.layer, group)
        # after the LoRA: DoRA's magnitude scales x W^T + its delta, never the bias (as peft computes it)
        return y if self.biases[group] is None else y + self.biases[group]

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T = h.shape[0]
        x = self.input_layernorm(h)
        qkv = self._project(QKV, x, ctx)                                             # (T, q + 2 kv)
        k_end = self.q_size + self.kv_size
        q = qkv[:, :self.q_size].view(T, self.nh, self.hd)
        k = qkv[:, self.q_size:k_end].view(T, self.nkv, self.hd)
        v = qkv[:, k_end:].view(T, self.nkv, self.hd)
        cos, sin = ctx.rope[self.rope]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
            q, k = RotaryEmbedding.rotate(q, cos, sin), RotaryEmbedding.rotate(k, cos, sin)
        else:                                                 # one rotation over q and k side by side
            qk = RotaryEmbedding.rotate(qkv[:, :k_end].view(T, self.nh + self.nkv, self.hd), cos, sin)
            q, k = qk[:, :self.nh], qk[:, self.nh:]                                  # (T, nh, hd), (T, nkv, hd)
        ctx.checkpoint()
        o = paged_attention(q, k, v, ctx.kv, self.layer, ctx.attention(self.window), self.scale)  # (T, nh * hd)
        out = self._project(O, o, ctx)
        if self.sandwich:
            h = h + self.post_attention_layernorm(out)
            x = self.pre_feedforward_layernorm(h)
        else:
            h = h + out
            x = self.post_attention_layernorm(h)
        ctx.checkpoint()
        gate_up = self._project(GATE_UP, x, ctx)                                    # (T, 2 ff)
        a = self.act(gate_up[:, :self.ff]) * gate_up[:, self.ff:]
        ctx.checkpoint()
        out = self._project(DOWN, a, ctx)
        return h + (self.post_feedforward_layernorm(out) if self.sandwich else out)


class LlamaModel(nn.Module):
    """Built by engine.models.loader.load_model, which sets the embedding, projections and lm_head."""

    def __init__(self, spec: ModelSpec, max_positions: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.register_buffer("embed_tokens", torch.empty(0))   # (vocab, d), set by the loader
        self.lm_head: nn.Module | None = None                  # d -> vocab
        self.ropes = [RotaryEmbedding(r, max_positions, device) for r in spec.ropes]
        self.requires_grad_(False)

    def dequantized_weight(self, layer: int, group: int) -> torch.Tensor:
        """engine.lora_slots.BaseWeights: float32 (d_out, d_in) of layer `layer`'s fused projection
        number `group` (QKV, O, GATE_UP, DOWN), as its resident form multiplies by it."""
        return dequantize_projection(getattr(self.layers[layer], PROJECTIONS[group]))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext, logit_rows: torch.Tensor | None) -> torch.Tensor:
        """input_ids: [T] -> logits [len(logit_rows), vocab] in float32 (all rows if None)."""
        h = F.embedding(input_ids, self.embed_tokens)                            # (T, d)
        if self.spec.embed_scale != 1.0:                # Gemma: HF multiplies by the scale in the model dtype
            h = h * torch.tensor(self.spec.embed_scale, dtype=h.dtype)
        ctx.rope = [rope.tables(ctx.positions, h.dtype) for rope in self.ropes]
        for layer in self.layers:
            ctx.checkpoint()
            h = layer(h, ctx)
        if logit_rows is not None:
            h = h[logit_rows]
        logits = self.lm_head(self.norm(h)).float()
        cap = self.spec.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
