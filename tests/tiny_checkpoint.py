"""A tiny HF Llama checkpoint on disk (config.json + model.safetensors, random weights, HF names), for
tests of the model loader and of settings that depend on the checkpoint (an ordinary one: no GGUF)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from loramux.engine.models.spec import LORA_TARGETS, ModelSpec
from tests.adapter_factory import TINY_SPEC

_PARENT = {m: "self_attn" if m[0] in "qkvo" else "mlp" for m in LORA_TARGETS}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def hf_config(spec: ModelSpec) -> dict:
    """The config.json transformers writes for a LlamaForCausalLM of `spec`'s shape."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
            "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim, "vocab_size": spec.vocab_size,
            "max_position_embeddings": spec.max_position_embeddings, "rms_norm_eps": spec.rms_norm_eps,
            "rope_theta": spec.rope_theta, "tie_word_embeddings": spec.tie_word_embeddings,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "dtype": "float32"}


def write_tiny_checkpoint(out_dir: Path, spec: ModelSpec = TINY_SPEC, *, seed: int = 0,
                          tokenizer_from: Path | None = None) -> Path:
    """Random float32 weights under HF's names (`model.` prefix, `lm_head.weight` when untied).
    `tokenizer_from`: copy that checkpoint's tokenizer files (LLMEngine loads a tokenizer)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    d = spec.hidden_size

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    weights = {"model.embed_tokens.weight": rand(spec.vocab_size, d), "model.norm.weight": 1 + rand(d)}
    for i in range(spec.num_layers):
        for m in LORA_TARGETS:
            d_in, d_out = spec.lora_dims(m)
            weights[f"model.layers.{i}.{_PARENT[m]}.{m}.weight"] = rand(d_out, d_in)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weights[f"model.layers.{i}.{norm}.weight"] = 1 + rand(d)
    if not spec.tie_word_embeddings:
        weights["lm_head.weight"] = rand(spec.vocab_size, d)
    (out_dir / "config.json").write_text(json.dumps(hf_config(spec)))
    save_file(weights, str(out_dir / "model.safetensors"))
    for name in TOKENIZER_FILES if tokenizer_from is not None else ():
        shutil.copy(Path(tokenizer_from) / name, out_dir / name)
    return out_dir
