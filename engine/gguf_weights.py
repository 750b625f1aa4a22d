"""A GGUF checkpoint's tensors under HF names: dequantized (gguf-py's own ``dequantize``, the
weights transformers loads from the same file) or as their stored blocks (engine.gguf_blocks), for
the resident forms that hold them exactly (engine.gguf_forms).

What llama.cpp's converter changed is undone as transformers' loader undoes it (engine.gguf_arch):
Llama's q/k rows permuted for its rotary layout (``_reverse_permute_weights``; we un-permute codes
and scales alike), Gemma 3's norms stored as 1 + w (1 subtracted in float32, as transformers does).
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import torch

from loramux.engine.gguf_arch import ARCHS, NOT_YET, ROPE_TENSORS, GGUFArch
from loramux.engine.gguf_blocks import (
    INT4_KINDS,
    INT8_KINDS,
    SUPPORTED_KINDS,
    Int4Blocks,
    Int8Blocks,
    int4_blocks,
    int8_blocks,
)


@functools.lru_cache(maxsize=4)
def _reader(path: Path, mtime_ns: int):
    from gguf import GGUFReader

    return GGUFReader(path)


def open_reader(path: Path):
    """gguf-py's reader of `path` (memory-mapped), parsed once per process and file version: parsing a
    file's metadata (its vocabulary) takes seconds, and a start reads it up to three times."""
    path = Path(path)
    return _reader(path, path.stat().st_mtime_ns)


class GGUFUnsupported(ValueError):
    """The file holds an architecture or tensor type we cannot serve exactly (one-line message)."""


def file_architecture(reader) -> str:
    field = reader.fields.get("general.architecture")
    return bytes(field.parts[field.data[0]]).decode() if field is not None else "?"


def arch_metadata(reader) -> dict[str, object]:
    """The file's `{architecture}.*` scalar metadata, keys without the prefix (engine.gguf_config)."""
    prefix = file_architecture(reader) + "."
    return {key.removeprefix(prefix): f.contents() for key, f in reader.fields.items()
            if key.startswith(prefix) and len(f.data) == 1}


def check_supported(reader, path: Path) -> tuple[GGUFArch, dict[str, str]]:
    """The file's architecture row and HF name -> GGUF name map, or GGUFUnsupported naming the first
    thing we do not serve exactly (an architecture, a rope scaling, a tensor type or name)."""
    arch = file_architecture(reader)
    if arch not in ARCHS:
        later = " yet" if arch in NOT_YET else ""
        raise GGUFUnsupported(f"{path.name}: GGUF architecture {arch!r} is not supported{later}; "
                              f"loramux serves GGUF architectures {', '.join(ARCHS)}")
    scaling = reader.fields.get(f"{arch}.rope.scaling.type")
    scaling = bytes(scaling.parts[scaling.data[0]]).decode() if scaling is not None else "none"
    row = ARCHS[arch]
    table = next((t.name for t in reader.tensors if t.name in ROPE_TENSORS and t.name not in row.rope_tensors), None)
    if scaling not in ("none", *row.rope_scalings) or table is not None:
        raise GGUFUnsupported(f"{path.name}: rope scaling {scaling if scaling != 'none' else table.split('.')[0]} "
                              f"in a GGUF file of architecture {arch!r} is not supported")
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_KINDS:
            raise GGUFUnsupported(f"{path.name}: GGUF tensor type {t.tensor_type.name} ({t.name}) is not supported; "
                                  f"loramux reads {', '.join(SUPPORTED_KINDS)}")
    return row, _hf_names(row, [t.name for t in reader.tensors if t.name not in ROPE_TENSORS], path)


def rope_tables(reader) -> dict[str, np.ndarray]:
    """The file's rope tables (engine.gguf_arch.ROPE_TENSORS) as float32 arrays, by name."""
    return {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors if t.name in ROPE_TENSORS}


def _hf_names(arch: GGUFArch, gguf_names: list[str], path: Path) -> dict[str, str]:
    """HF name -> GGUF name for every tensor of the file (GGUFUnsupported for one we do not know)."""
    patterns = [(re.compile(re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h) for g, h in arch.tensors.items()]
    out = {}
    for name in gguf_names:
        for pattern, hf in patterns:
            m = pattern.match(name)
            if m:
                out[hf.replace("{i}", m.group(1)) if m.groups() else hf] = name
                break
        else:
            raise GGUFUnsupported(f"{path.name}: GGUF tensor {name} is not one loramux serves")
    return out


class GGUFWeights:
    """The GGUF's tensors by HF name (no `model.` prefix), read from the memory-mapped file on demand."""

    def __init__(self, path: Path, num_heads: int, num_kv_heads: int) -> None:
        self.path = Path(path)
        reader = open_reader(self.path)
        self.arch, names = check_supported(reader, self.path)
        by_name = {t.name: t for t in reader.tensors}
        self._tensors = {hf: by_name[g] for hf, g in names.items()}
        self._heads = {"q_proj": num_heads, "k_proj": num_kv_heads} if self.arch.permuted_qk else {}

    def names(self) -> list[str]:
        return list(self._tensors)

    def kind(self, name: str) -> str:
        """The stored type ("Q4_K", "F16", ...) of the tensor with HF name `name`."""
        return self._tensors[name].tensor_type.name

    def dequantized(self, name: str) -> torch.Tensor:
        """float32, HF shape and row order: gguf-py's dequantize of the stored tensor."""
        from gguf.quants import dequantize

        t = self._tensors[name]
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        if self.arch.norm_shift and name.endswith("norm.weight"):     # Gemma: stored 1 + w
            w = w - self.arch.norm_shift
        return self._unpermute(name, w)

    def blocks(self, name: str) -> Int4Blocks | Int8Blocks | None:
        """The stored blocks in the exact form that holds them, or None (float or Q6_K tensors)."""
        t = self._tensors[name]
        kind = t.tensor_type.name
        if kind not in INT4_KINDS + INT8_KINDS:
            return None
        raw = np.ascontiguousarray(t.data)                                     # (N, bytes per row)
        b = int4_blocks(raw, kind) if kind in INT4_KINDS else int8_blocks(raw, kind)
        return type(b)(*(a if a is None else self._unpermute(name, a) for a in vars(b).values()))

    def _unpermute(self, name: str, a: torch.Tensor) -> torch.Tensor:
        proj = name.rsplit(".", 2)[-2]
        return unpermute_rows(a, self._heads[proj]) if proj in self._heads else a

    # -- the embedded model's forms (tests/test_int4.py) ------------------------------------------
    def int4(self, layer: int, proj: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(codes uint8 (N, K) in 0..15, scale, zero float32 (N, K / 32)) of a 4-bit projection, else None."""
        parent = "self_attn" if proj[0] in "qkvo" else "mlp"
        b = self.blocks(f"layers.{layer}.{parent}.{proj}.weight")
        return (b.codes, b.scale, b.zero) if isinstance(b, Int4Blocks) else None

    def token_embedding_q8(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(q int8 (V, d), scale float32 (V, d / 32)) of a Q8_0 token embedding, else None."""
        if self.kind("embed_tokens.weight") != "Q8_0":
            return None
        b = self.blocks("embed_tokens.weight")
        return (b.u.to(torch.int16) - 128).to(torch.int8), b.scale


def projection_kinds(path: Path) -> frozenset[str]:
    """The stored types of a GGUF's decoder projections (what `--quantize auto` decides by)."""
    return frozenset(t.tensor_type.name for t in open_reader(path).tensors
                     if t.name.startswith("blk.") and t.name.endswith(".weight") and t.data.ndim == 2)


def unpermute_rows(a: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' ``_reverse_permute_weights`` on the row axis of any (N, ...) tensor."""
    dim = a.shape[0] // n_head // 2
    return a.reshape(n_head, dim, 2, *a.shape[1:]).transpose(1, 2).reshape(a.shape).contiguous()
