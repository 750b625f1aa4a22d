"""Registry limits and locations, checked once at startup."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class RegistryConfig:
    data_dir: Path                          # adapters registered at runtime persist here
    max_loras: int                          # adapters resident on the device at once (EngineConfig's)
    max_lora_rank: int                      # r_max of the slot stacks, higher ranks refused (EngineConfig's)
    max_host_adapters: int = 64             # parsed adapters kept in host memory (LRU)
    allowed_roots: tuple[Path, ...] = ()    # where register-by-path may read from (empty: nowhere)
    max_upload_bytes: int = 1 << 30         # bound on one uploaded adapter (both files together)
    max_virtual_tokens: int = 512           # bound on a prefix adapter's num_virtual_tokens
    max_mixtures: int = 32                  # per-request mixtures kept merged (LRU beyond, if idle)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.allowed_roots = tuple(Path(p).expanduser().resolve() for p in self.allowed_roots)
        for name in ("max_loras", "max_lora_rank", "max_host_adapters", "max_upload_bytes", "max_virtual_tokens",
                     "max_mixtures"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RegistryConfig.{name} must be a positive integer, got {value!r}")
