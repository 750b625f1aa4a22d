"""Build a LlamaModel from a checkpoint, its projections fused and in the requested resident form.

Weights come from the HF safetensors directory (HF names; Phi-3's fused qkv_proj / gate_up_proj are
split by the spec's shapes and fused again as ours). With ``quantize="int4"`` and a
checkpoint converted from a GGUF (the embedded model), the projections are the GGUF's own 4-bit
codes (``engine.gguf_weights``, no requantization) and the tied lm_head its Q8_0 embedding held
exactly as two int4 parts; any other checkpoint is quantized group-wise here.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from loramux.engine.gguf_weights import GGUFWeights
from loramux.engine.linear import (
    DenseLinear,
    Int4Linear,
    int8_groups_as_int4_parts,
    quantize_int8_groups,
)
from loramux.engine.models.llama import LlamaModel
from loramux.engine.models.spec import SHRINK_GROUPS, ModelSpec
from loramux.engine.quantize import make_projection

log = logging.getLogger("loramux.engine")
FUSED = dict(zip(("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), SHRINK_GROUPS))
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def _parent(module: str) -> str:
    return "self_attn." if module[0] in "qkvo" else "mlp."


def _has_bias(spec: ModelSpec, group: int) -> bool:
    """Whether projection group `group` (QKV, O, GATE_UP, DOWN) carries a bias in this architecture."""
    return (spec.qkv_bias, spec.o_bias, spec.mlp_bias, spec.mlp_bias)[group]


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors shard, under HF's names without the `model.` prefix."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safe_open handle is not iterable
                if "rotary_emb" not in key:
                    tensors[key.removeprefix("model.")] = f.get_tensor(key)
    return tensors


def load_model(spec: ModelSpec, model_dir: Path, *, dtype: torch.dtype, quantize: str, max_positions: int,
               device: torch.device, gguf: Path | None = None) -> LlamaModel:
    tensors = read_checkpoint(model_dir)
    codes = GGUFWeights(gguf, spec.num_heads, spec.num_kv_heads) if gguf is not None and quantize == "int4" else None
    model = LlamaModel(spec, max_positions, device)

    def take(name: str) -> torch.Tensor:
        try:
            return tensors.pop(name)
        except KeyError:
            raise ValueError(f"checkpoint {model_dir} is missing weight {name}") from None

    def norm(name: str) -> torch.Tensor:
        return (take(name).float() + spec.norm_offset).to(device, dtype)   # Gemma's (1 + w), in float32

    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}."
        for g, (attr, group) in enumerate(FUSED.items()):
            names = [prefix + _parent(m) + m for m in group]
            if spec.fused_checkpoint and len(group) > 1:      # Phi-3 stores q|k|v and gate|up fused
                fused = take(prefix + _parent(group[0]) + attr + ".weight")
                parts = list(fused.split([spec.lora_dims(m)[1] for m in group]))
            else:
                parts = [take(n + ".weight") for n in names]
            for n, w, m in zip(names, parts, group):
                expected = spec.lora_dims(m)[::-1]
                if tuple(w.shape) != expected:
                    raise ValueError(f"{n}.weight: shape {tuple(w.shape)}, expected {expected}")
            if _has_bias(spec, g):
                layer.biases[g] = torch.cat([take(n + ".bias") for n in names]).to(device, dtype)
            gguf_parts = [codes.int4(i, m) for m in group] if codes is not None else None
            if gguf_parts is not None and all(p is not None for p in gguf_parts):
                proj = Int4Linear.from_codes(*(torch.cat(xs) for xs in zip(*gguf_parts)))
            else:
                proj = make_projection(quantize, torch.cat(parts), dtype)
            setattr(layer, attr, proj.to(device))
        for name in NORMS:
            if getattr(layer, name) is not None:
                getattr(layer, name).weight = norm(prefix + name + ".weight")
        for name in ("q_norm", "k_norm"):
            if getattr(layer, name) is not None:
                getattr(layer, name).weight = norm(prefix + "self_attn." + name + ".weight")
    model.norm.weight = norm("norm.weight")
    embed = take("embed_tokens.weight")
    model.embed_tokens = embed.to(device, dtype)
    head = embed if spec.tie_word_embeddings else take("lm_head.weight")
    model.lm_head = _lm_head(head, model.embed_tokens if spec.tie_word_embeddings else None, quantize, dtype,
                             codes).to(device)
    if tensors:
        raise ValueError(f"unexpected weights in {model_dir}: {sorted(tensors)[:5]}")
    return model.eval()


def _lm_head(weight: torch.Tensor, tied: torch.Tensor | None, quantize: str, dtype: torch.dtype,
             codes: GGUFWeights | None) -> nn.Module:
    """The output projection. Quantizing it to 4 bits would cost real fidelity (it decides the token),
    so int4 mode holds it as int8 in groups of 32 (the GGUF's own Q8_0 when tied to its embedding),
    read by the int4 kernel as two parts; large batches use the dense (tied) weight. The bitsandbytes
    modes leave it dense, as transformers' BitsAndBytesConfig does."""
    if quantize != "int4":
        return DenseLinear(tied if tied is not None else weight.to(dtype))
    q8 = codes.token_embedding_q8() if codes is not None and tied is not None else None
    q, d = q8 if q8 is not None else quantize_int8_groups(weight)
    head = int8_groups_as_int4_parts(q, d)
    head.dense = tied.to(torch.bfloat16) if tied is not None else weight.to(torch.bfloat16)
    return head

