"""Build a LlamaModel from a checkpoint, its projections fused and in the requested resident form.

Weights come from the HF safetensors directory (HF names; Phi-3's fused qkv_proj / gate_up_proj are
split by the spec's shapes and fused again as ours), or from a GGUF file (``--model FILE.gguf``:
engine.gguf_weights, dequantized by gguf-py as transformers does). With a GGUF behind the checkpoint
(also the embedded model's), the int4 / gguf modes build the projections from its stored blocks
(engine.gguf_forms: as stored where a form holds them, else requantized with a stated bound); any
other checkpoint is quantized group-wise here.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from loramux.engine.gguf_blocks import Int4Blocks, Int8Blocks, split_rows
from loramux.engine.gguf_forms import (
    dense_beats_two_parts,
    exact_projection,
    int4_parts,
    int4_projection,
    two_parts,
)
from loramux.engine.gguf_weights import GGUFWeights
from loramux.engine.linear import (
    DenseLinear,
    bf16_matmul_in_hardware,
    int8_groups_as_int4_parts,
    quantize_int8_groups,
)
from loramux.engine.models.llama import LlamaModel
from loramux.engine.models.spec import SHRINK_GROUPS, ModelSpec
from loramux.engine.quantize import GGUF_MODES, make_projection

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
    """`gguf`: the GGUF file behind `model_dir` (its blocks become the int4 / gguf forms; a directory
    without safetensors reads every weight from it)."""
    from_gguf = gguf is not None and not list(Path(model_dir).glob("*.safetensors"))
    codes = GGUFWeights(gguf, spec.num_heads, spec.num_kv_heads) if gguf is not None and (
        from_gguf or quantize in GGUF_MODES) else None
    tensors = _GGUFTensors(codes) if from_gguf else read_checkpoint(model_dir)
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
            sizes = [spec.lora_dims(m)[1] for m in group]
            # Phi-3 stores q|k|v and gate|up fused (its checkpoints and GGUF files alike)
            fused = prefix + _parent(group[0]) + attr + ".weight" if spec.fused_checkpoint and len(group) > 1 else None
            if fused is not None:
                parts = list(take(fused).split(sizes))
            else:
                parts = [take(n + ".weight") for n in names]
            for n, w, m in zip(names, parts, group):
                expected = spec.lora_dims(m)[::-1]
                if tuple(w.shape) != expected:
                    raise ValueError(f"{n}.weight: shape {tuple(w.shape)}, expected {expected}")
            if _has_bias(spec, g):
                layer.biases[g] = torch.cat([take(n + ".bias") for n in names]).to(device, dtype)
            if codes is not None and quantize in GGUF_MODES:
                if fused is not None:
                    blocks, kinds = split_rows(codes.blocks(fused), sizes), [codes.kind(fused)] * len(group)
                else:
                    blocks = [codes.blocks(n + ".weight") for n in names]
                    kinds = [codes.kind(n + ".weight") for n in names]
                proj = int4_projection(parts, blocks) if quantize == "int4" else exact_projection(
                    parts, blocks, kinds, dtype)
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
    head_name = "embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
    head = embed if spec.tie_word_embeddings else take(head_name)
    head_blocks = codes.blocks(head_name) if codes is not None and quantize in GGUF_MODES else None
    model.lm_head = _lm_head(head, model.embed_tokens if spec.tie_word_embeddings else None, quantize, dtype,
                             head_blocks).to(device)
    if tensors:
        raise ValueError(f"unexpected weights in {model_dir}: {sorted(tensors)[:5]}")
    return model.eval()


def _lm_head(weight: torch.Tensor, tied: torch.Tensor | None, quantize: str, dtype: torch.dtype,
             blocks: Int4Blocks | Int8Blocks | None) -> nn.Module:
    """The output projection. Quantizing it to 4 bits would cost real fidelity (it decides the token),
    so the int4 / gguf modes hold it as int8 in groups of 32 (a GGUF's own blocks when a group-32
    form holds them: Q8_0, Q5_K; 4-bit ones as they are), read by the int4 kernel in two parts.
    Large batches use the dense (tied) weight, which with the native kernel is kept only where it
    costs nothing (the bf16 embedding itself) and the CPU has bf16 hardware to make it faster. On
    such a CPU two int4 parts are slower than bf16 at every row count (engine.gguf_forms), so a
    head in two parts is dense there when that adds no byte (tied) or `auto` chose it (gguf). The
    bitsandbytes modes leave it dense, as transformers' BitsAndBytesConfig does."""
    if quantize not in GGUF_MODES:
        return DenseLinear(tied if tied is not None else weight.to(dtype))
    dense = tied.to(torch.bfloat16) if tied is not None else weight.to(torch.bfloat16)
    if two_parts([blocks]) and dense_beats_two_parts(dtype) and (dense is tied or quantize == "gguf"):
        return DenseLinear(dense)           # the embedding itself (no byte added), or `auto`'s fastest form
    if blocks is None:
        head = int8_groups_as_int4_parts(*quantize_int8_groups(weight))
    else:
        head = int4_parts([weight], [blocks], dense)
    head.dense = dense if not head.native or (dense is tied and bf16_matmul_in_hardware()) else None
    return head


class _GGUFTensors:
    """HF name -> float32 weight, dequantized from the GGUF as the loader takes it (dict's pop / bool)."""

    def __init__(self, codes: GGUFWeights) -> None:
        self._codes, self._left = codes, set(codes.names())

    def pop(self, name: str) -> torch.Tensor:
        if name not in self._left:
            raise KeyError(name)
        self._left.discard(name)
        return self._codes.dequantized(name)

    def __bool__(self) -> bool:
        return bool(self._left)

    def __iter__(self):
        return iter(self._left)
