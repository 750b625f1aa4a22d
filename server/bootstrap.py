"""Builds the server's state from its settings: model, engine, adapter registry."""
from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from loramux.adapters_registry.config import RegistryConfig
from loramux.adapters_registry.datadir_lock import claim_data_dir
from loramux.adapters_registry.registry import AdapterRegistry
from loramux.adapters_registry.slots import LoraStacks
from loramux.engine.async_engine import AsyncEngine
from loramux.engine.config import EngineConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.engine.model_source import cache_root, model_name, resolve_model
from loramux.engine.models.spec import ModelSpec
from loramux.server.body_limit import DEFAULT_MAX_REQUEST_BYTES
from loramux.server.state import ServerState

log = logging.getLogger("loramux.server")


@dataclass
class ServeConfig(EngineConfig):
    """`loramux serve`'s settings: the engine's, with their names and defaults, from EngineConfig
    (checked here, before anything loads), and the server's own."""
    model_dir: Path | None = None        # None: the embedded model (engine.model_source.resolve_model)
    adapters_dir: Path | None = None     # every subfolder served as an adapter, in place, not persisted
    data_dir: Path | None = None         # where registered adapters persist (default <cache>/data)
    allowed_roots: tuple[Path, ...] = field(default_factory=tuple)
    admin_key: str | None = None
    host: str = "127.0.0.1"
    threads: int = 0                     # torch intra-op threads; 0 = all cores
    request_timeout: float | None = None  # seconds per request, arrival to last token; None: no limit
    max_upload_bytes: int = RegistryConfig.max_upload_bytes  # one adapter upload, both files together
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES   # any other request body
    drain_timeout: float = 30.0          # on SIGTERM: seconds in-flight requests get to finish, then an error

    def __post_init__(self) -> None:
        if self.model_dir is not None:
            self.model_dir = Path(self.model_dir)
        self.check_settings()
        if self.admin_key is not None and not self.admin_key.strip():
            # An empty key would accept `Authorization: Bearer ` : refuse rather than run unlocked.
            raise ValueError("the admin key is empty: give a real key or none")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError("request_timeout must be a positive number of seconds")
        if not self.drain_timeout >= 0:
            raise ValueError("drain_timeout must be a number of seconds >= 0")
        if self.max_upload_bytes < 1 or self.max_request_bytes < 1:
            raise ValueError("max_upload_bytes and max_request_bytes must be positive")

    def engine_config(self, model_dir: Path) -> EngineConfig:
        """The engine's part of these settings, serving the checkpoint at `model_dir`."""
        engine_fields = {f.name for f in fields(EngineConfig)} - {"model_dir"}
        return EngineConfig(model_dir, **{name: getattr(self, name) for name in engine_fields})


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, admin_key: str | None) -> str | None:
    """The startup warning when anyone who can reach `host` could manage adapters, else None."""
    if admin_key is not None or _is_loopback(host):
        return None
    return f"admin routes are NOT locked and the server listens on {host}: set --admin-key or LORAMUX_ADMIN_KEY"


def build_state(cfg: ServeConfig) -> ServerState:
    # First, before the model loads: a data dir another live server owns fails the start at once (DataDirBusy).
    data_dir_lock = claim_data_dir(_data_dir(cfg))
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    model_dir = resolve_model(cfg.model_dir)
    econf = cfg.engine_config(model_dir)
    registry = build_registry(econf, _data_dir(cfg), model_name(model_dir), allowed_roots=tuple(cfg.allowed_roots),
                              max_upload_bytes=cfg.max_upload_bytes)
    engine = _engine(econf, registry)
    if cfg.adapters_dir is not None:
        registry.preload_dir(cfg.adapters_dir)
    log.info("memory: base weights %.1f MiB (quantize=%s), KV cache %.1f MiB (%d blocks of %d tokens), "
             "adapter slots %.1f MiB (%d slots of %.1f MiB at rank %d)", engine.weight_bytes / 2**20, engine.quantize,
             engine.kv.nbytes / 2**20, engine.blocks.num_blocks, econf.block_size, registry.slot_bytes / 2**20,
             registry.stacks.num_slots, registry.slot_bytes / registry.stacks.num_slots / 2**20, econf.max_lora_rank)
    warning = exposure_warning(cfg.host, cfg.admin_key)
    if warning:
        log.warning(warning)
    return ServerState(engine=AsyncEngine(engine, cfg.max_queue), tokenizer=engine.tokenizer,
                       base_model_name=model_name(model_dir), registry=registry, admin_key=cfg.admin_key,
                       request_timeout=cfg.request_timeout, max_request_bytes=cfg.max_request_bytes,
                       data_dir_lock=data_dir_lock)


def _engine(econf: EngineConfig, registry: AdapterRegistry) -> LLMEngine:
    """The engine reading `registry`'s slots; the registry reads the engine's base weights (DoRA), so
    adapters are registered only after this."""
    engine = LLMEngine(econf, adapters=registry, lora_stacks=registry.stacks)
    registry.attach_base(engine.model)
    return engine


def _data_dir(cfg: ServeConfig) -> Path:
    return Path(cfg.data_dir or cache_root() / "data")


def build_registry(econf: EngineConfig, data_dir: Path, base_name: str = "base", **config) -> AdapterRegistry:
    """The adapter registry whose slot stacks an engine with `econf` reads (also used by tests/benchmarks)."""
    # The stacks follow the model's dtype, as peft's adapter weights do: in bf16 the CPU path reads
    # half the bytes of float32 stacks, and reading them is most of its work (kernels/torch_ops.py).
    spec = ModelSpec.from_dir(econf.model_dir)
    slots = econf.max_loras or LoraStacks.count_for(spec, econf.max_lora_rank, econf.torch_dtype,
                                                    econf.max_lora_memory_bytes)
    return AdapterRegistry(spec, RegistryConfig(data_dir=data_dir, max_loras=slots, max_lora_rank=econf.max_lora_rank,
                                                **config),
                           dtype=econf.torch_dtype, device=torch.device(econf.device), base_model_name=base_name)


def build_engine(econf: EngineConfig, data_dir: Path, adapters: dict[str, Path] | None = None
                 ) -> tuple[LLMEngine, AdapterRegistry]:
    """An engine serving adapters from a fresh registry, with `adapters` (id -> peft folder) registered."""
    registry = build_registry(econf, data_dir)
    engine = _engine(econf, registry)
    for adapter_id, path in (adapters or {}).items():
        registry.register(adapter_id, path)
    return engine, registry
