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
# The same architectures as llama.cpp's GGUF files can hold them (tests/tiny_gguf.py converts them): only
# what the file's metadata carries and transformers' GGUF reader reads back (its config class defaults
# for the rest: Qwen3's head_dim 128, Gemma 3's query_pre_attn_scalar 256 and sliding pattern of 6,
# Phi-3 without a window or longrope; llama.cpp writes Mistral as "llama", read back as Llama).
GGUF_ARCHS: dict[str, tuple[str, dict]] = {
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=128, rope_parameters=dict(
        rope_type="default", rope_theta=1000000.0))),
    "phi3": ("Phi3Config", dict(tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)),
    "gemma3": ("Gemma3TextConfig", dict(num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=256, query_pre_attn_scalar=256, sliding_window=WINDOW,
                                        tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "mistral": ("MistralConfig", dict(sliding_window=None, tie_word_embeddings=False)),
    # Llama 3.x: its llama3 rope goes into the file as the rope_freqs tensor (two factors in the smooth
    # band, as real files have more); theta 10000 and a 64-token original context make it bite within
    # 30-token prompts
    "llama3": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=8.0,
        original_max_position_embeddings=64))),
    # Phi-4-mini's shape: partial rotary, longrope (its factors in rope_factors_short/long, served up to
    # the original context), and a sliding window (Phi-3 mini 4k's): all dropped by transformers' reader
    "phi3-long": ("Phi3Config", dict(tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                     sliding_window=WINDOW, partial_rotary_factor=0.75, rope_parameters=dict(
                                         _LONGROPE, partial_rotary_factor=0.75))),
    # Gemma 3 4B / 12B: linear rope scaling (factor 8) on the global layers only
    "gemma3-linear": ("Gemma3TextConfig", dict(
        num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=WINDOW, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_parameters={
            "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1000000.0),
            "sliding_attention": dict(rope_type="default", rope_theta=10000.0)})),
}


def hf_config(arch: str, vocab_size: int, table: dict[str, tuple[str, dict]] = ARCHS):
    import transformers

    cls_name, kwargs = table[arch]
    return getattr(transformers, cls_name)(**{**_SHAPE, **kwargs, "vocab_size": vocab_size})


def write_arch_checkpoint(arch: str, out_dir: Path, tokenizer_from: Path, seed: int = 0,
                          table: dict[str, tuple[str, dict]] = ARCHS, vocab_size: int | None = None) -> Path:
    """Save a random float32 `arch` model (of `table`) with transformers' save_pretrained, plus the
    tokenizer (`vocab_size`: a model over its first tokens only, for GGUF files that cut it so)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, vocab_size or len(tokenizer), table), dtype=torch.float32)
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
