"""What a GGUF file's ``general.architecture`` means for us: its tensor names and what llama.cpp's
converter (convert_hf_to_gguf.py) did to the weights on the way in, undone as transformers' GGUF
loader (modeling_gguf_pytorch_utils.py) undoes it.

Served: llama (Llama 2; Llama 3.x, its llama3 rope read back from rope_freqs; Mistral, which llama.cpp writes as
"llama"), qwen2 (Qwen2 / 2.5: q/k/v biases), qwen3 (per-head q/k norms), phi3 (fused attn_qkv =
q|k|v rows and ffn_up = gate|up rows, as Phi-3's own qkv_proj / gate_up_proj) and gemma3 (text: four
norms a layer, q/k norms). What the converter changed:

    llama            q/k rows permuted for llama.cpp's rotary layout: un-permuted (codes and scales too)
    qwen2/qwen3/phi3 nothing (Qwen2Model, Qwen3Model, Phi3MiniModel write the HF tensors as they are)
    gemma3           every `*norm.weight` stored as 1 + w (Gemma3RMSNorm's scale): 1 is subtracted

An architecture is served when it has a row in ``ARCHS``, the HF config transformers reads from the
file is one our engine implements (engine.model_source.check_model_dir), completed with and checked
against the file's own metadata where transformers' reader drops it (engine.gguf_config); the rest
are refused at start in one line.
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
QK_NORMS = {
    "blk.{i}.attn_q_norm.weight": "layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.self_attn.k_norm.weight",
}
QKV_BIASES = {f"blk.{{i}}.attn_{p}.bias": f"layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"}
# Phi-3: q|k|v in one tensor, gate|up in ffn_up (transformers' Phi3 names; the loader splits them)
PHI3_TENSORS = {k: v for k, v in LLAMA_TENSORS.items()
                if v.split(".")[-2] not in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}
PHI3_TENSORS |= {"blk.{i}.attn_qkv.weight": "layers.{i}.self_attn.qkv_proj.weight",
                 "blk.{i}.ffn_up.weight": "layers.{i}.mlp.gate_up_proj.weight"}
# Gemma 3: ffn_norm is the norm before the MLP; the norms after attention and the MLP are their own
GEMMA3_TENSORS = {**LLAMA_TENSORS, **QK_NORMS,
                  "blk.{i}.post_attention_norm.weight": "layers.{i}.post_attention_layernorm.weight",
                  "blk.{i}.ffn_norm.weight": "layers.{i}.pre_feedforward_layernorm.weight",
                  "blk.{i}.post_ffw_norm.weight": "layers.{i}.post_feedforward_layernorm.weight"}
# Rope tables stored as tensors (transformers' GGUF reader drops them: engine.gguf_config reads them
# back for the architecture that may hold them; anywhere else they are refused).
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


@dataclass(frozen=True)
class GGUFArch:
    permuted_qk: bool = False           # llama.cpp permuted q/k rows for its rotary layout (undo it)
    norm_shift: float = 0.0             # llama.cpp added this to every `*norm.weight` (subtract it)
    tensors: dict[str, str] = field(default_factory=lambda: dict(LLAMA_TENSORS))
    rope_tensors: tuple[str, ...] = ()  # of ROPE_TENSORS, those engine.gguf_config reads back
    rope_scalings: tuple[str, ...] = ()  # `rope.scaling.type` values it reads back ("none" always served)


# By the file's general.architecture. llama.cpp writes Mistral models as "llama" too (transformers
# reads those as model_type "mistral" only when general.name is exactly "mistral"); the HF config
# transformers builds from the metadata (engine.model_source) is what the engine checks and serves.
ARCHS = {
    "llama": GGUFArch(permuted_qk=True, rope_tensors=("rope_freqs.weight",)),             # Llama 3.x
    "qwen2": GGUFArch(tensors={**LLAMA_TENSORS, **QKV_BIASES}),
    "qwen3": GGUFArch(tensors={**LLAMA_TENSORS, **QK_NORMS}),
    "phi3": GGUFArch(tensors=PHI3_TENSORS, rope_tensors=ROPE_TENSORS[1:]),                  # longrope
    "gemma3": GGUFArch(norm_shift=1.0, tensors=GEMMA3_TENSORS, rope_scalings=("linear",)),  # 4B and up
}
# Known to transformers' GGUF reader, not to our engine: named in the refusal.
NOT_YET = ("gemma2", "qwen2moe", "qwen3moe")

