"""peft prefix-tuning adapters: per-layer key/value prefixes, exactly as peft feeds them.

peft saves `prompt_embeddings` [num_virtual_tokens, num_layers * 2 * token_dim] = the output of its
PrefixEncoder (with `prefix_projection` the MLP is already applied at save time, and a loaded
adapter runs in inference mode straight from these values). `PeftModel.get_prompt` then does

    view(B, n_virt, num_layers * 2, num_attention_heads, token_dim // num_attention_heads)
    .permute(2, 0, 3, 1, 4).split(2)   # num_layers x [2 (k, v), B, heads, n_virt, head_dim]

For grouped-query models peft sizes the prefix by the KV heads (peft#1901):
token_dim = num_key_value_heads * head_dim and num_attention_heads = num_key_value_heads.
The keys are used as stored: no rotary embedding is applied to them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loramux.engine.models.spec import ModelSpec

from .adapter_files import TensorInfo, read_tensors
from .errors import BAD_REQUEST, AdapterError

EMBEDDINGS_KEY = "prompt_embeddings"
_KNOWN_OPTIONS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
    "num_layers", "modules_to_save", "init_weights", "encoder_hidden_size", "prefix_projection",
}


@dataclass(frozen=True)
class PrefixManifest:
    num_virtual_tokens: int
    prefix_projection: bool  # informational: the saved embeddings are already projected
    kind: str = "prefix"
    rank: int = 0
    alpha: float = 0.0
    targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class PrefixWeights:
    manifest: PrefixManifest
    kv: torch.Tensor  # (num_layers, 2, n_virt, num_kv_heads, head_dim), registry dtype and device

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def _int(config: dict, name: str) -> int:
    v = config.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise AdapterError(BAD_REQUEST, f"prefix tuning {name} must be a positive integer, got {v!r}")
    return v


def inspect_prefix(config: dict, header: dict[str, TensorInfo], spec: ModelSpec,
                   max_virtual_tokens: int) -> PrefixManifest:
    """Validate a prefix-tuning adapter from its config and safetensors header."""
    unknown = sorted(k for k, v in config.items() if k not in _KNOWN_OPTIONS and v)
    if unknown:
        raise AdapterError(BAD_REQUEST, f"unrecognized prefix tuning option(s) {', '.join(unknown)}")
    if config.get("modules_to_save"):
        raise AdapterError(BAD_REQUEST, "modules_to_save (fully trained extra modules) is not supported")
    n_virt = _int(config, "num_virtual_tokens")
    if n_virt > max_virtual_tokens:
        raise AdapterError(BAD_REQUEST, f"num_virtual_tokens {n_virt} exceeds the server's maximum "
                                        f"{max_virtual_tokens}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterError(BAD_REQUEST, "num_transformer_submodules != 1: an encoder-decoder adapter")
    layers, heads, token_dim = _int(config, "num_layers"), _int(config, "num_attention_heads"), _int(config, "token_dim")
    if layers != spec.num_layers:
        raise AdapterError(BAD_REQUEST, f"dimension mismatch: prefix made for {layers} layers, "
                                        f"the base model has {spec.num_layers}")
    kv_dim = spec.num_kv_heads * spec.head_dim
    if heads != spec.num_kv_heads or token_dim != kv_dim:
        raise AdapterError(BAD_REQUEST, f"dimension mismatch: prefix sized for {heads} heads x "
                                        f"{token_dim // heads} dims, the base model has {spec.num_kv_heads} "
                                        f"KV heads x {spec.head_dim} dims")
    expected = (n_virt, layers * 2 * token_dim)
    if set(header) != {EMBEDDINGS_KEY}:
        extra = sorted(set(header) - {EMBEDDINGS_KEY})
        raise AdapterError(BAD_REQUEST, f"unexpected tensor {extra[0]} in a prefix tuning adapter" if extra
                           else f"tensor {EMBEDDINGS_KEY} is missing (incomplete adapter file)")
    if header[EMBEDDINGS_KEY].shape != expected:
        raise AdapterError(BAD_REQUEST, f"dimension mismatch for {EMBEDDINGS_KEY}: expected {list(expected)}, "
                                        f"got {list(header[EMBEDDINGS_KEY].shape)}")
    return PrefixManifest(num_virtual_tokens=n_virt, prefix_projection=bool(config.get("prefix_projection")))


def prefix_kv(embeddings: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """peft's get_prompt layout, batch dropped, as (num_layers, 2, n_virt, num_kv_heads, head_dim)."""
    n_virt = embeddings.shape[0]
    kv = embeddings.view(n_virt, spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)  # row 2*l+j = layer l, k/v j
    return kv.permute(1, 2, 0, 3, 4).contiguous()                                       # (L, 2, n_virt, kvh, hd)


def load_prefix(weights_path: Path, manifest: PrefixManifest, spec: ModelSpec, *,
                dtype: torch.dtype, device: torch.device) -> PrefixWeights:
    emb = read_tensors(weights_path, [EMBEDDINGS_KEY])[EMBEDDINGS_KEY]
    return PrefixWeights(manifest, prefix_kv(emb, spec).to(device=device, dtype=dtype))
