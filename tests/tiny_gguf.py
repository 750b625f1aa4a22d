"""Tiny Llama GGUF files written with gguf-py's GGUFWriter, for tests of `--model FILE.gguf`.

Random weights in any of the types we read: float and Q8_0 / Q4_0 / Q4_1 tensors through gguf-py's
own quantizer; K-quant tensors (which gguf-py only dequantizes) as random bytes, every byte pattern
being a valid block, with their fp16 super-block scales set to magnitudes like a real file's. The
tokenizer and chat template are the embedded SmolLM2 GGUF's metadata, copied key by key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loramux.engine.gguf_blocks import QK_K

# 2 layers, hidden 256 (K-quant rows are whole 256-weight super-blocks), 4 heads of 64, 2 KV heads.
SHAPE = {"layers": 2, "hidden": 256, "ff": 512, "heads": 4, "kv_heads": 2, "head_dim": 64}
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Q4_K_M's recipe in small: 4-bit K blocks, v and down in Q6_K, the head Q6_K, the embedding Q4_K.
Q4_K_M = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K", "ffn_gate": "Q4_K",
          "ffn_up": "Q4_K", "ffn_down": "Q6_K", "token_embd": "Q4_K", "output": "Q6_K"}
# Q5_K_M's, with a Q8_0 head.
Q5_K_M = {**{p: "Q5_K" for p in PROJECTIONS}, "attn_v": "Q6_K", "ffn_down": "Q6_K", "token_embd": "Q5_K",
          "output": "Q8_0"}
# The older and float types, tied embeddings (no output tensor).
LEGACY = {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "F16", "ffn_gate": "Q4_1",
          "ffn_up": "Q4_0", "ffn_down": "BF16", "token_embd": "Q8_0"}
ALL_4BIT = {**{p: "Q4_K" for p in PROJECTIONS}, "attn_q": "Q4_0", "ffn_up": "Q4_1", "token_embd": "Q8_0"}
MIXES = {"q4_k_m": Q4_K_M, "q5_k_m": Q5_K_M, "legacy": LEGACY, "all_4bit": ALL_4BIT}
FORMAT_VERSION = 1                       # bump when this writer changes: files are cached by name


def _dims(role: str) -> tuple[int, int]:
    """(rows, cols) of a tensor, HF orientation (out, in)."""
    d, ff, q, kv = SHAPE["hidden"], SHAPE["ff"], SHAPE["heads"] * SHAPE["head_dim"], SHAPE["kv_heads"] * SHAPE["head_dim"]
    return {"attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q), "ffn_gate": (ff, d),
            "ffn_up": (ff, d), "ffn_down": (d, ff)}.get(role, (0, d))


def _fp16_bytes(rng: np.random.Generator, n: tuple[int, ...], lo: float, hi: float) -> np.ndarray:
    return rng.uniform(lo, hi, size=n).astype(np.float16).view(np.uint8).reshape(*n, 2)


def random_tensor(rng: np.random.Generator, kind: str, rows: int, cols: int):
    """(data, raw_dtype or None) for GGUFWriter.add_tensor: a random (rows, cols) weight stored as `kind`."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    qtype = T[kind]
    if kind in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"):
        w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        if kind == "F32":
            return w, None
        if kind == "F16":
            return w.astype(np.float16), None
        return quantize(w, qtype), qtype
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if kind in ("Q4_K", "Q5_K"):                       # fp16 d, dmin: weights of about +-0.1
        raw[..., 0:2] = _fp16_bytes(rng, (rows, cols // block), 1e-4, 3e-4)
        raw[..., 2:4] = _fp16_bytes(rng, (rows, cols // block), 1e-4, 3e-4)
    elif kind == "Q6_K":                               # int8 scales, then fp16 d at the end
        raw[..., -2:] = _fp16_bytes(rng, (rows, cols // block), 1e-5, 3e-5)
    else:
        raise ValueError(kind)
    assert cols % QK_K == 0
    return raw.reshape(rows, -1), qtype


def finish_gguf(w) -> None:
    """Write a GGUFWriter's header, metadata and tensors, in the order gguf-py requires, and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_gguf(path: Path, kinds: dict[str, str], *, seed: int = 0, arch: str = "llama",
                    tokenizer_from: Path) -> Path:
    """A 2-layer Llama GGUF at `path` whose tensor types are `kinds` (role -> type; no "output": tied)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    rng = np.random.default_rng(seed)
    src = GGUFReader(tokenizer_from)
    vocab = len(src.fields["tokenizer.ggml.tokens"].data)
    tmp = path.with_suffix(".partial")
    w = GGUFWriter(tmp, arch)
    w.add_name("tiny-llama")
    w.add_block_count(SHAPE["layers"])
    w.add_context_length(512)
    w.add_embedding_length(SHAPE["hidden"])
    w.add_feed_forward_length(SHAPE["ff"])
    w.add_head_count(SHAPE["heads"])
    w.add_head_count_kv(SHAPE["kv_heads"])
    w.add_rope_dimension_count(SHAPE["head_dim"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)

    def add(name: str, role: str, rows: int, cols: int) -> None:
        data, raw_dtype = random_tensor(rng, kinds[role], rows, cols)
        w.add_tensor(name, data, raw_dtype=raw_dtype)

    add("token_embd.weight", "token_embd", vocab, SHAPE["hidden"])
    norm = lambda: (1 + 0.1 * rng.standard_normal(SHAPE["hidden"])).astype(np.float32)
    for i in range(SHAPE["layers"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        for role in PROJECTIONS:
            add(f"blk.{i}.{role}.weight", role, *_dims(role))
    w.add_tensor("output_norm.weight", norm())
    if "output" in kinds:
        add("output.weight", "output", vocab, SHAPE["hidden"])
    finish_gguf(w)
    os.replace(tmp, path)
    return path


def cached_tiny_gguf(root: Path, name: str, kinds: dict[str, str], *, tokenizer_from: Path, **kw) -> Path:
    """write_tiny_gguf once per machine under `root` (the same bytes, name and mtime at every run, so
    engine.model_source reuses the config and tokenizer it read from it)."""
    path = Path(root) / f"tiny-{name}-v{FORMAT_VERSION}.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tiny_gguf(path, kinds, tokenizer_from=tokenizer_from, **kw)
    return path


def tiny_gguf_files() -> dict[str, Path]:
    """The test files by mix name, under the loramux cache (written once per machine)."""
    from loramux.engine.model_source import cache_root, find_embedded_gguf

    root, tok = cache_root() / "test-gguf", find_embedded_gguf()
    return {name: cached_tiny_gguf(root, name, kinds, tokenizer_from=tok) for name, kinds in MIXES.items()}


# -- HF checkpoints converted as llama.cpp's convert_hf_to_gguf.py converts them ----------------------
@dataclass(frozen=True)
class Conversion:
    """What llama.cpp's converter does to one architecture: its GGUF name, whether it permutes q/k rows
    for its rotary layout (LlamaModel, and Mistral through it), what it adds to every `*norm.weight`
    (Gemma3Model's norm_shift: Gemma3RMSNorm multiplies by 1 + w) and which metadata it writes."""
    gguf_arch: str
    permute_qk: bool = False
    norm_shift: float = 0.0
    rope_dims: bool = False              # writes rope.dimension_count (LlamaModel, Phi3MiniModel)
    sliding_window: bool = False         # writes attention.sliding_window (Gemma3Model; Phi-3: 0 for none)


CONVERSIONS = {
    "llama": Conversion("llama", permute_qk=True, rope_dims=True),          # and Llama 3.x: + rope_freqs
    "mistral": Conversion("llama", permute_qk=True, rope_dims=True),
    "qwen2": Conversion("qwen2"),
    "qwen3": Conversion("qwen3"),
    "phi3": Conversion("phi3", rope_dims=True, sliding_window=True),
    "gemma3_text": Conversion("gemma3", norm_shift=1.0, sliding_window=True),
}
ARCH_VOCAB = 512                         # the converted files' vocabulary: the embedded one's first 512 tokens
# Tensor types of the converted files by GGUF role (1-D tensors stay F32, as llama.cpp keeps them).
ARCH_MIXES = {
    "f32": {},
    "f16": {"*": "F16"},
    "q8_0": {"*": "Q8_0"},
    "q4": {"attn_q": "Q4_0", "attn_qkv": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "F16",
           "ffn_gate": "Q4_1", "ffn_up": "Q4_0", "ffn_down": "Q8_0", "token_embd": "Q8_0", "output": "Q4_1"},
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rows (r0, r1, ... in HF's rotate-half halves)
    interleaved pairwise for its rotary layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for a llama3 rope: the divisor of each
    inverse frequency (1 for short wavelengths, `factor` for long ones, smoothed between)."""
    import math

    import torch

    theta, factor, context = rope["rope_theta"], rope["factor"], rope["original_max_position_embeddings"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            out.append(1.0)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _stored(w: np.ndarray, kind: str):
    """(data, raw_dtype) of GGUFWriter.add_tensor for a float32 weight stored as `kind`."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if kind == "F32":
        return w, None
    if kind == "F16":
        return w.astype(np.float16), None
    return quantize(w, T[kind]), T[kind]


def _add_tokenizer(w, src, vocab: int) -> None:
    """The embedded GGUF's tokenizer (chat template included) cut to its first `vocab` tokens and the
    merges among them: a real byte-level BPE whose metadata transformers parses in a blink (the full
    49152-token one takes seconds at each reading, and the arch tests read each file twice)."""
    from gguf import GGUFValueType

    tokens = src.fields["tokenizer.ggml.tokens"].contents()[:vocab]
    kept = set(tokens)
    for key, field in src.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value, sub = field.contents(), None
        if field.types[0] == GGUFValueType.ARRAY:
            sub = field.types[1]
            value = ([m for m in value if set(m.split(" ")) <= kept and m.replace(" ", "") in kept]
                     if key == "tokenizer.ggml.merges" else value[:vocab])
        w.add_key_value(key, value, field.types[0], sub_type=sub)


def convert_checkpoint(model_dir: Path, path: Path, mix: dict[str, str], *, tokenizer_from: Path,
                       name: str = "tiny") -> Path:
    """An HF safetensors checkpoint (transformers' save_pretrained) as a GGUF file at `path`: tensor names
    by gguf-py's own TensorNameMap (what the converter maps with), weights changed as the converter
    changes them (CONVERSIONS), 2-D tensors stored as `mix` says (role -> type, "*" the default)."""
    import json
    import math

    import torch
    from gguf import (
        MODEL_ARCH,
        MODEL_ARCH_NAMES,
        GGUFReader,
        GGUFWriter,
        RopeScalingType,
        get_tensor_name_map,
    )
    from safetensors.torch import load_file

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    conv = CONVERSIONS[cfg["model_type"]]
    rope = cfg.get("rope_parameters") or {}
    n, heads, kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    arch = next(a for a, v in MODEL_ARCH_NAMES.items() if v == conv.gguf_arch)
    names = get_tensor_name_map(MODEL_ARCH(arch), n)
    tensors = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(shard))

    tmp = path.with_suffix(".partial")
    w = GGUFWriter(tmp, conv.gguf_arch)
    w.add_name(name)
    w.add_block_count(n)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if cfg.get("head_dim"):                          # TextModel writes key / value length when config has head_dim
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if conv.rope_dims:
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if conv.sliding_window:
        w.add_sliding_window(cfg.get("sliding_window") or 0)
    _add_tokenizer(w, GGUFReader(tokenizer_from), cfg["vocab_size"])
    if rope.get("rope_type") == "llama3":        # LlamaModel.generate_extra_tensors
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim))
    if conv.gguf_arch == "phi3" and rope.get("rope_type") == "longrope":   # Phi3MiniModel
        original = rope["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(original)
        scale = cfg["max_position_embeddings"] / original
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))
    full = rope.get("full_attention", {})
    if conv.gguf_arch == "gemma3" and full.get("rope_type") == "linear":   # Gemma3Model
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    for hf_name, t in tensors.items():
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ValueError(f"gguf-py maps no tensor for {hf_name}")
        a = t.to(torch.float32).numpy()
        if conv.permute_qk and base.endswith(("q_proj", "k_proj")):
            a = llama_cpp_permute(a, heads if base.endswith("q_proj") else kv)
        if hf_name.endswith("norm.weight"):
            a = a + np.float32(conv.norm_shift)
        role = gguf_name.rsplit(".", 1)[-1]
        kind = mix.get(role, mix.get("*", "F32")) if a.ndim == 2 else "F32"
        data, raw_dtype = _stored(np.ascontiguousarray(a), kind)
        w.add_tensor(f"{gguf_name}.{suffix}", data, raw_dtype=raw_dtype)
    finish_gguf(w)
    os.replace(tmp, path)
    return path


def arch_gguf_file(arch: str, mix: str) -> tuple[Path, Path]:
    """(the GGUF file, its source HF checkpoint) of tests/arch_checkpoints.GGUF_ARCHS[arch] stored as
    ARCH_MIXES[mix], written once per machine under the loramux cache."""
    from loramux.engine.model_source import cache_root, default_model_dir, find_embedded_gguf
    from tests.arch_checkpoints import GGUF_ARCHS, write_arch_checkpoint

    root = cache_root() / "test-gguf" / f"arch-v{FORMAT_VERSION}"
    src = root / f"{arch}-hf"
    if not (src / "config.json").is_file():
        tmp = root / f".{arch}-hf-partial"
        write_arch_checkpoint(arch, tmp, default_model_dir(), table=GGUF_ARCHS, vocab_size=ARCH_VOCAB)
        os.replace(tmp, src)
    path = root / f"tiny-{arch}-{mix}.gguf"
    if not path.is_file():
        convert_checkpoint(src, path, ARCH_MIXES[mix], tokenizer_from=find_embedded_gguf(), name=f"tiny-{arch}")
    return path, src
