"""A compact Llama-family decoder that adds the adapters' LoRA deltas to its projections.

Weights load from an HF safetensors checkpoint, under HF's parameter names. Every step runs on a
flat batch of tokens from many sequences (no padding): each carries a position, a KV cache row
and an adapter slot, so one forward pass serves any mix of adapters and the bare base model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from loramux import kernels
from loramux.engine.attention import AttentionMetadata, KVCache, paged_attention
from loramux.engine.lora_slots import LoraSlots
from loramux.engine.models.spec import SHRINK_GROUPS, ModelSpec

QKV, O, GATE_UP, DOWN = SHRINK_GROUPS


@dataclass
class ForwardContext:
    """Everything a step's forward pass needs besides the tokens; passed down, never global."""
    positions: torch.Tensor                 # [T]
    attn: AttentionMetadata
    kv: KVCache
    lora: kernels.LoraMapping | None = None  # None when no token uses an adapter
    lora_stacks: LoraSlots | None = None    # the adapters' device slots: shrink_A / expand_B views
    lora_rank: int = 0                      # largest rank among this step's adapters: stacks are trimmed to it
    lora_modules: frozenset[str] = frozenset()  # target modules of this step's adapters: the others skip LoRA
    cos: torch.Tensor | None = None         # (T, 1, hd) rotary tables for this step's positions, set once
    sin: torch.Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 like HF's LlamaRMSNorm, so float32 results match it exactly.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def add_lora(x: torch.Tensor, outputs: tuple[torch.Tensor, ...], group: tuple[str, ...], layer: int,
             ctx: ForwardContext) -> None:
    """outputs[i] += scale * (x A[slot]^T) B[slot]^T for module group[i], the slot chosen per token.

    The group's modules read the same `x`, so one shrink computes every module's t (their A
    matrices sit side by side in the slot stacks); then one expand per module the step's adapters
    target. Tokens of the bare base model are left alone.
    """
    if ctx.lora is None or ctx.lora_modules.isdisjoint(group):
        return
    stacks, r, G = ctx.lora_stacks, ctx.lora_rank, len(group)
    t = kernels.lora_shrink(x, stacks.shrink_A(layer, group, r), ctx.lora, None)   # (T, r * G); scale is in B
    for i, (module, y) in enumerate(zip(group, outputs)):
        if module in ctx.lora_modules:
            kernels.lora_expand(t[:, i::G], stacks.expand_B(layer, module, r), ctx.lora, y)


def _linear(d_in: int, d_out: int) -> nn.Linear:
    """A bias-free projection. The ones adapters target (LORA_TARGETS) are plain linears too:
    `add_lora` adds the deltas to their outputs, and engine.quantize may swap them for bitsandbytes'."""
    return nn.Linear(d_in, d_out, bias=False)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_positions = head_dim, theta, max_positions
        self.cos = self.sin = None

    def build(self, device: torch.device | str = "cpu") -> None:
        """Compute the float32 cos/sin tables (kept out of the state dict and of dtype casts)."""
        hd = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32, device=device), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)                                  # (P, hd)
        self.cos, self.sin = emb.cos(), emb.sin()

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, 1, hd) for a step's positions: looked up once, shared by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: [T, heads, hd] -> rotated, computed as HF does (rotate_half)."""
        x1, x2 = x.chunk(2, dim=-1)
        return x * ctx.cos + torch.cat((-x2, x1), dim=-1) * ctx.sin


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        d = spec.hidden_size
        self.q_proj = _linear(d, self.nh * self.hd)
        self.k_proj = _linear(d, self.nkv * self.hd)
        self.v_proj = _linear(d, self.nkv * self.hd)
        self.o_proj = _linear(self.nh * self.hd, d)
        self.layer = layer
        self.scale = 1.0 / math.sqrt(self.hd)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        add_lora(x, (q, k, v), QKV, self.layer, ctx)
        q = RotaryEmbedding.rotate(q.view(T, self.nh, self.hd), ctx)    # (T, nh, hd)
        k = RotaryEmbedding.rotate(k.view(T, self.nkv, self.hd), ctx)   # (T, nkv, hd)
        o = paged_attention(q, k, v.view(T, self.nkv, self.hd), ctx.kv.k[self.layer], ctx.kv.v[self.layer],
                            ctx.attn, self.scale).reshape(T, self.nh * self.hd)
        out = self.o_proj(o)
        add_lora(o, (out,), O, self.layer, ctx)
        return out


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        d, ff = spec.hidden_size, spec.intermediate_size
        self.gate_proj = _linear(d, ff)
        self.up_proj = _linear(d, ff)
        self.down_proj = _linear(ff, d)
        self.layer = layer

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        add_lora(x, (gate, up), GATE_UP, self.layer, ctx)
        h = F.silu(gate) * up
        out = self.down_proj(h)
        add_lora(h, (out,), DOWN, self.layer, ctx)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec, layer)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), ctx)
        return h + self.mlp(self.post_attention_layernorm(h), ctx)


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec, max_positions: int) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = _linear(spec.hidden_size, spec.vocab_size)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(spec.head_dim, spec.rope_theta, max_positions)
        self.requires_grad_(False)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext, logit_rows: torch.Tensor | None) -> torch.Tensor:
        """input_ids: [T] -> logits [len(logit_rows), vocab] in float32 (all rows if None)."""
        h = self.embed_tokens(input_ids)                                         # (T, d)
        ctx.cos, ctx.sin = self.rope.tables(ctx.positions, h.dtype)
        for layer in self.layers:
            h = layer(h, ctx)
        if logit_rows is not None:
            h = h[logit_rows]
        return self.lm_head(self.norm(h)).float()

    def load_safetensors(self, model_dir: Path) -> None:
        """Copy weights from every *.safetensors shard in `model_dir` (HF names) into this model."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for shard in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                    ours = key.removeprefix("model.")
                    if ours not in params:
                        if "rotary_emb" in key:
                            continue
                        raise ValueError(f"unexpected weight {key} in {shard.name}")
                    tensor = f.get_tensor(key)
                    if tensor.shape != params[ours].shape:
                        raise ValueError(f"{key}: shape {tuple(tensor.shape)}, expected {tuple(params[ours].shape)}")
                    params[ours].data.copy_(tensor)
                    loaded.add(ours)
        if self.spec.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}...")
