"""The bytes a loaded model should hold in each `--quantize` form, from its shapes alone: what
`engine.quantize.resident_bytes` (and the base_weights metric) is checked against."""
from __future__ import annotations

import torch

from loramux.engine.gguf_forms import dense_beats_two_parts
from loramux.engine.linear import native_available
from loramux.engine.models.spec import ModelSpec


def int4_part_bytes(n: int, k: int) -> int:
    """One int4 part of an (n, k) weight: 2 codes per byte + a bf16 scale and zero per group of 32."""
    return n * k // 2 + 2 * 2 * n * k // 32


def nf4_absmax_bytes() -> int:
    """bitsandbytes keeps nf4's absmax in float32, and converts it to bf16 when it repacks the weight for
    its AVX512-BF16 CPU kernel, which it does only on CPUs that have that extension."""
    from bitsandbytes.functional import has_avx512bf16

    return 2 if has_avx512bf16() else 4


def expected_weight_bytes(spec: ModelSpec, mode: str, dtype_bytes: int = 4) -> tuple[int, int]:
    """Embeddings, lm_head (once if tied) and norms in the engine dtype + the four fused projections
    per layer as `mode` stores them. -> (bytes, number of projections).

    int4 holds the lm_head as int8 in groups of 32 (two int4 parts), or a tied one in bf16 as the
    embedding itself where the CPU multiplies bf16 in hardware (engine.gguf_forms). Without the native kernel
    (ATen's path) it also keeps a bf16 dense copy of each projection (for steps of more than 16
    rows) and of the lm_head, which for a tied head is the embedding's own storage when the engine
    runs bf16 and a separate copy otherwise; with it, only the head's copy that costs nothing.
    bitsandbytes' codebooks (16 or 256 entries per linear) are not counted."""
    d, ff, q, kv = spec.hidden_size, spec.intermediate_size, spec.num_heads * spec.head_dim, \
        spec.num_kv_heads * spec.head_dim
    fused = [(q + 2 * kv, d), (d, q), (2 * ff, d), (d, ff)]                               # (out, in)
    dense_copy = 0 if native_available() else 2
    absmax = nf4_absmax_bytes() if mode == "bnb-nf4" else 0
    per_weight = {"none": lambda n, k: dtype_bytes * n * k,
                  "int4": lambda n, k: int4_part_bytes(n, k) + dense_copy * n * k,        # + bf16 dense copy
                  "int8": lambda n, k: n * k + 2 * n,                                     # int8 + bf16 row scales
                  "bnb-int8": lambda n, k: n * k + 4 * n,
                  "bnb-nf4": lambda n, k: n * k // 2 + absmax * n * k // 64}[mode]        # 2 per byte + absmax/64
    embed = dtype_bytes * spec.vocab_size * d
    if mode == "int4":
        shares_embedding = spec.tie_word_embeddings and dtype_bytes == 2
        if shares_embedding and dense_beats_two_parts(torch.bfloat16):
            head = 0                               # the embedding itself serves as the head
        else:
            head = 2 * int4_part_bytes(spec.vocab_size, d) + (0 if shares_embedding else dense_copy * spec.vocab_size * d)
    else:
        head = 0 if spec.tie_word_embeddings else embed
    norms = dtype_bytes * d * (2 * spec.num_layers + 1)
    projections = spec.num_layers * sum(per_weight(n, k) for n, k in fused)
    return embed + head + norms + projections, spec.num_layers * len(fused)
