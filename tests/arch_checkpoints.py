"""Small random checkpoints of every architecture we serve, made by transformers itself
(`AutoModelForCausalLM.from_config` + `save_pretrained`) with the embedded model's real tokenizer:
what tests compare our engine against, architecture by architecture.

Shapes are tiny (2 layers, hidden 64) and every sliding window is 16, so prompts of 20-40 tokens
cross it. Weights are drawn wider than transformers' init (std 0.02 leaves logits nearly flat, and a
greedy comparison on flat logits tests rounding, not the model); norms and biases get random values
too (their init, ones or zeros, would hide a missing or misplaced one).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

WINDOW = 16
# Prompts of 20-40 tokens with the embedded tokenizer (longer than WINDOW), and how many tokens to generate.
NEW_TOKENS = 10
TEXTS = ["The quick brown fox jumps over the lazy dog while the farmer watches from far away, smiling.",
         "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
         "Once upon a time, in a kingdom by the sea, there lived a princess who loved to read old maps."]
_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5)
_LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=64,
                 short_factor=[1.0 + 0.1 * i for i in range(6)], long_factor=[2.0 + 0.5 * i for i in range(6)])
# name -> (transformers config class name, its kwargs beyond _SHAPE)
ARCHS: dict[str, tuple[str, dict]] = {
    "llama3": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "llama-linear": ("LlamaConfig", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "llama-dynamic": ("LlamaConfig", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "llama-yarn": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64))),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW,
                                  max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=24)),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
    "phi3": ("Phi3Config", dict(sliding_window=WINDOW, partial_rotary_factor=0.75, rope_parameters=dict(
        _LONGROPE, partial_rotary_factor=0.75), pad_token_id=0)),
    "gemma3": ("Gemma3TextConfig", dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                                        query_pre_attn_scalar=32, final_logit_softcapping=30.0,
                                        tie_word_embeddings=True)),
}


def hf_config(arch: str, vocab_size: int):
    import transformers

    cls_name, kwargs = ARCHS[arch]
    return getattr(transformers, cls_name)(**{**_SHAPE, **kwargs, "vocab_size": vocab_size})


def write_arch_checkpoint(arch: str, out_dir: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """Save a random float32 `arch` model with transformers' save_pretrained, plus the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, len(tokenizer)), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for extra in ("chat_template.jinja",):
        if (Path(tokenizer_from) / extra).is_file():
            shutil.copy(Path(tokenizer_from) / extra, out_dir / extra)
    return out_dir
