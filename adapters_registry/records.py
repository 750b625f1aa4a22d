"""What the registry keeps (AdapterRecord, one per served adapter) and hands out: AdapterInfo (a
snapshot for listings) and Lease (a held adapter)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from .formats import Manifest
    from .mixtures import MixtureRecipe

Kind = Literal["lora", "prefix"]
Tier = Literal["device", "host", "disk"]


@dataclass(frozen=True)
class AdapterInfo:
    id: str
    type: Kind
    rank: int                    # largest per-module rank (0 for prefix)
    alpha: float                 # config lora_alpha (0 for prefix)
    targets: tuple[str, ...]     # adapted projections (empty for prefix)
    size_bytes: int              # the safetensors file
    tier: Tier                   # where its weights are ready: device slot / host memory / disk only
    last_used: float | None      # wall-clock time of the last acquire
    requests_served: int         # acquires so far (this process)
    active_leases: int
    num_virtual_tokens: int      # prefix tuning only (0 for LoRA)
    use_rslora: bool
    source: str                  # folder served from
    mixture: dict | None = None  # a per-request mixture's recipe (see mixtures.py); None otherwise
    use_dora: bool = False       # a DoRA adapter (LoRA with magnitude vectors)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


@dataclass(eq=False)
class Lease:
    """One request's hold on an adapter. LoRA: `slot` indexes the stacks; prefix: `slot` is -1 and
    `prefix_kv` is (num_layers, 2, n_virt, num_kv_heads, head_dim) in the registry dtype/device.
    `version` names the weights: a re-registered id serves new weights under a new version (the
    engine's prefix cache keys KV by it). Give it back with `AdapterRegistry.release` exactly once."""
    adapter_id: str
    kind: Kind
    slot: int
    prefix_kv: torch.Tensor | None = None
    version: int = 0
    released: bool = False
    _record: object = field(default=None, repr=False)


@dataclass(eq=False)  # identity semantics: a re-registered id is a different record
class AdapterRecord:
    """The registry's own state of one adapter (guarded by the registry's lock)."""
    adapter_id: str
    folder: Path
    manifest: Manifest
    size_bytes: int
    persisted: bool
    refcount: int = 0
    slot: int = -1
    retired: bool = False
    last_used: float | None = None
    requests_served: int = 0
    recipe: MixtureRecipe | None = None  # set for per-request mixtures (merged on demand, not persisted)
    version: int = 0                     # set by the registry when it starts serving the record (unique)
    loading: bool = False                # a background read of its weights is under way
    placing: bool = False                # its slot (`slot`) is being written in the background
    load_error: Exception | None = None  # why the last background load failed (raised to the next acquirer)

    @property
    def kind(self) -> str:
        return self.manifest.kind
