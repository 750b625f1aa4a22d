"""The settings of loramux on Ray Serve (server/ray_app.py): the replicas' ServeConfig and the scale-out's own."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loramux.engine.model_source import cache_root
from loramux.server.bootstrap import ServeConfig


@dataclass
class RayConfig:
    serve: ServeConfig = field(default_factory=ServeConfig)   # per replica (each in a private dir under data_dir)
    replicas: int = 2
    replica_cpus: float = 1.0          # Ray CPUs reserved per replica; also its torch threads by default
    store_dir: Path | None = None      # shared adapter store (default <cache>/adapter_store)
    adapters_per_replica: int = 64     # multiplexing LRU: adapters registered per replica at once
    retries: int = 3                   # re-sends of a request whose replica died before answering

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.replica_cpus <= 0 or self.adapters_per_replica < 1 or self.retries < 0:
            raise ValueError(f"invalid RayConfig: {self}")
        self.store_dir = Path(self.store_dir or cache_root() / "adapter_store").expanduser().resolve()
