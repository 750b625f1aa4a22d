"""What a GGUF file's ``general.architecture`` means for us: the HF model it is, its tensor names
and how llama.cpp's converter changed the weights on the way in.

An architecture is served when it has a row in ``ARCHS`` and the HF config transformers reads from
the file is one our engine implements (engine.model_source.check_model_dir); the rest are refused at
start in one line. To add one (qwen2, qwen3, phi3, gemma3 as engine/models learns them), add its
row: its tensor names (biases, q/k norms, Phi-3's fused attn_qkv, Gemma's extra norms) and what
llama.cpp's converter did to them (Gemma stores norms as 1 + w: transformers subtracts 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

# GGUF tensor names of a Llama-layout decoder -> HF names (without the `model.` prefix);
# `{i}` is the layer.
LLAMA_TENSORS = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
}


@dataclass(frozen=True)
class GGUFArch:
    permuted_qk: bool                   # llama.cpp permuted q/k rows for its rotary layout (undo it)
    tensors: dict[str, str] = field(default_factory=lambda: dict(LLAMA_TENSORS))


# By the file's general.architecture. llama.cpp writes Mistral models as "llama" too (transformers
# reads those as model_type "mistral" from their name); the HF config transformers builds from the
# metadata (engine.model_source) is what the engine checks and serves.
ARCHS = {
    "llama": GGUFArch(permuted_qk=True),
}
# Known to transformers' GGUF reader, not yet to our engine: named in the refusal.
NOT_YET = ("qwen2", "qwen3", "phi3", "gemma3")
