"""Tiny Llama GGUF files written with gguf-py's GGUFWriter, for tests of `--model FILE.gguf`.

Random weights in any of the types we read: float and Q8_0 / Q4_0 / Q4_1 tensors through gguf-py's
own quantizer; K-quant tensors (which gguf-py only dequantizes) as random bytes, every byte pattern
being a valid block, with their fp16 super-block scales set to magnitudes like a real file's. The
tokenizer and chat template are the embedded SmolLM2 GGUF's metadata, copied key by key.
"""
from __future__ import annotations

import os
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
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
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
