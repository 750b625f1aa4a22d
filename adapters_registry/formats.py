"""One entry point over the adapter formats we serve: inspect (cheap) and load (reads weights)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from loramux.engine.models.spec import ModelSpec

from .adapter_files import check_folder, read_config, read_header
from .errors import BAD_REQUEST, AdapterError
from .lora_gain import check_gain
from .peft_lora import LoraManifest, LoraWeights, inspect_lora, load_lora
from .peft_prefix import PrefixManifest, PrefixWeights, inspect_prefix, load_prefix

Manifest = LoraManifest | PrefixManifest
Weights = LoraWeights | PrefixWeights
SUPPORTED_PEFT_TYPES = ("LORA", "PREFIX_TUNING")


@contextmanager
def _about(label: str) -> Iterator[None]:
    """Prefix every refusal with the adapter it is about (the user's path, not our staging copy)."""
    try:
        yield
    except AdapterError as e:
        e.message = f"adapter at {label}: {e.message}"
        e.args = (e.message,)
        e.param = e.param or "path"
        raise


def inspect_adapter(folder: Path, spec: ModelSpec, *, max_rank: int, max_virtual_tokens: int,
                    label: str | None = None) -> Manifest:
    """Validate config and safetensors header of an adapter folder; reads no weight data.

    Used before and after copying an adapter in, and at startup for the persisted catalog, where
    reading every adapter's weights would make a restart slow.
    """
    with _about(label or str(folder)):
        config_path, weights_path = check_folder(folder)
        config = read_config(config_path)
        header = read_header(weights_path)
        peft_type = config.get("peft_type")
        if peft_type == "LORA":
            return inspect_lora(config, header, spec, max_rank)
        if peft_type == "PREFIX_TUNING":
            return inspect_prefix(config, header, spec, max_virtual_tokens)
        raise AdapterError(BAD_REQUEST, f"peft_type {peft_type!r} is not supported "
                                        f"(loramux serves {', '.join(SUPPORTED_PEFT_TYPES)})")


def load_adapter(folder: Path, manifest: Manifest, spec: ModelSpec, *, dtype: torch.dtype,
                 device: torch.device, label: str | None = None) -> Weights:
    """Read the weights of an inspected adapter; LoRA stays on the host, a prefix goes to `device`.
    A LoRA whose update could overflow `dtype` is refused (adapters_registry.lora_gain)."""
    with _about(label or str(folder)):
        _, weights_path = check_folder(folder)
        if isinstance(manifest, LoraManifest):
            weights = load_lora(weights_path, manifest)
            check_gain(weights, dtype)
            return weights
        return load_prefix(weights_path, manifest, spec, dtype=dtype, device=device)
