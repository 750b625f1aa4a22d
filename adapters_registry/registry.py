"""The adapter registry: ids -> adapters, across three tiers, with leases for running requests.

Tiers: a fixed number of device slots (LoraStacks), a bounded LRU of parsed weights in host
memory, and the catalog on disk. `try_acquire` hands out a lease on an adapter that is in a slot
and otherwise has a background thread pull it up, evicting the least recently used slot nobody
holds (`Residency`); a lease pins it until `release`. Prefix adapters need no slot: their KV
prefix lives in the host tier (already on the device) and the lease carries it. Per-request
mixtures are served like any adapter; merging and caching them is `MixtureCache`'s job.

One lock guards all state; it is held for bookkeeping only, never while reading files or copying
weights, so the engine thread never waits behind a slow disk read or slot write.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from pathlib import Path

import torch

from loramux.engine.lora_slots import BaseWeights
from loramux.engine.models.spec import ModelSpec

from .adapter_files import WEIGHTS_FILE
from .catalog import Catalog
from .config import RegistryConfig
from .datadir_lock import claim_data_dir
from .dora import with_dora_factors
from .errors import BAD_REQUEST, CONFLICT, INTERNAL, NOT_FOUND, AdapterError
from .formats import Manifest, Weights, inspect_adapter, load_adapter
from .ids import validate_adapter_id
from .mixture_cache import MixtureCache
from .mixtures import MixtureRecipe
from .paths import confine_path
from .records import AdapterInfo, AdapterRecord, Lease
from .residency import Residency
from .slots import LoraStacks

log = logging.getLogger(__name__)


class AdapterRegistry:
    def __init__(self, spec: ModelSpec, config: RegistryConfig, *, dtype: torch.dtype,
                 device: torch.device | str, base_model_name: str):
        self.spec, self.config = spec, config
        self.dtype, self.device = dtype, torch.device(device)
        self.base_model_name = base_model_name
        self.stacks = LoraStacks(spec, config.max_loras, config.max_lora_rank, dtype=dtype, device=self.device)
        # Before anything under data_dir is swept: what this start deletes is ours, never a live server's.
        self._data_dir_lock = claim_data_dir(config.data_dir)
        self.catalog = Catalog(config.data_dir)
        self.load_errors: dict[str, str] = {}  # persisted adapters that failed validation at startup
        self._lock = threading.RLock()
        self._live: dict[str, AdapterRecord] = {}
        self._versions = itertools.count(1)
        self.residency = Residency(self.stacks, config.max_host_adapters, self._lock, self._reload, self._drop)
        self.mixtures = MixtureCache(self, self.catalog.data_dir / "mixtures")
        self._base: BaseWeights | None = None  # the engine's model, once attached (DoRA reads it)
        self._restore()

    def attach_base(self, base: BaseWeights) -> None:
        """The base weights DoRA adapters' factors are computed from (the engine's model). Attach it
        before registering DoRA adapters; until then they are refused."""
        self._base = base

    @property
    def slot_bytes(self) -> int:
        """Device memory held by the slot stacks (allocated once, at startup)."""
        return self.stacks.nbytes

    @property
    def scratch_dir(self) -> Path:
        """Where callers may stage incoming files (e.g. uploads) in folders named `.staging-*`:
        on the data dir's disk, and swept at the next start if the process dies mid-upload."""
        return self.catalog.adapters_dir

    # -- registration ---------------------------------------------------------------------------
    def _restore(self) -> None:
        """Re-register the persisted catalog: config + header checks only, weights load lazily."""
        for entry in self.catalog.entries():
            try:
                validate_adapter_id(entry.adapter_id, self.base_model_name)
                manifest = self._inspect(entry.path, str(entry.path))
                size = (entry.path / WEIGHTS_FILE).stat().st_size
            except (AdapterError, OSError) as e:
                self.load_errors[entry.adapter_id] = getattr(e, "message", str(e))
                log.warning("persisted adapter %r not served: %s", entry.adapter_id, self.load_errors[entry.adapter_id])
                continue
            self._serve(AdapterRecord(entry.adapter_id, entry.path, manifest, size, persisted=True))

    def _inspect(self, folder: Path, label: str) -> Manifest:
        return inspect_adapter(folder, self.spec, max_rank=self.config.max_lora_rank,
                               max_virtual_tokens=self.config.max_virtual_tokens, label=label)

    def _check_free(self, adapter_id: str) -> None:
        if adapter_id in self._live:
            raise AdapterError(CONFLICT, f"adapter {adapter_id!r} already exists", param="id")
        if adapter_id in self.catalog:
            raise AdapterError(CONFLICT, f"adapter {adapter_id!r} is in the catalog but failed to load "
                                         f"({self.load_errors.get(adapter_id, 'unknown error')}); delete it first",
                               param="id")

    def register(self, adapter_id: str, path: Path, *, copy: bool = True, label: str | None = None) -> AdapterInfo:
        """Validate an adapter folder completely, then serve and persist it under `adapter_id`.

        copy=True copies the files under the data dir first and validates that copy (what we serve
        is what we checked); copy=False persists a reference to `path`. Nothing changes unless
        validation passes. `label` names the adapter in error messages (default: `path`).
        """
        return self._register(adapter_id, Path(path), copy=copy, persist=True, label=label)

    def preload_dir(self, folder: Path) -> list[AdapterInfo]:
        """Serve every subfolder of `folder` as an adapter named after it (`--adapters DIR`).

        These are served in place and not persisted: the directory is the source of truth and is
        read again at each start. The first invalid adapter raises, naming its folder.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise AdapterError(BAD_REQUEST, f"adapters directory {folder} does not exist", param="path")
        return [self._register(sub.name, sub, copy=False, persist=False)
                for sub in sorted(folder.iterdir()) if sub.is_dir() and not sub.name.startswith(".")]

    def resolve_allowed_path(self, raw: object) -> Path:
        """Check a client-supplied path against `allowed_roots` (AdapterError 403/400 otherwise)."""
        return confine_path(raw, self.config.allowed_roots)

    def describe(self, adapter_id: str, folder: Path, *, label: str | None = None) -> AdapterInfo:
        """What registering `folder` as `adapter_id` would serve, from its config and header alone:
        nothing is loaded or registered (tier "disk"). AdapterError as `register` would refuse it
        before reading the weights. For adapters kept elsewhere (the Ray replicas' shared store)."""
        folder = Path(folder)
        record = AdapterRecord(adapter_id, folder, self._inspect(folder, label or str(folder)),
                               (folder / WEIGHTS_FILE).stat().st_size, persisted=False)
        with self._lock:
            return self._info(record)

    def _register(self, adapter_id: str, path: Path, *, copy: bool, persist: bool,
                  label: str | None = None) -> AdapterInfo:
        validate_adapter_id(adapter_id, self.base_model_name)
        label = label or str(path)
        source = path.expanduser().resolve()
        with self._lock:
            self._check_free(adapter_id)
        self._inspect(source, label)  # cheap refusal before copying anything
        staged = self.catalog.stage(source) if copy else None
        try:
            folder = staged or source
            manifest = self._inspect(folder, label)
            weights = self._load(folder, manifest, label)
            size = (folder / WEIGHTS_FILE).stat().st_size
            with self._lock:
                self._check_free(adapter_id)
                if persist:
                    folder = self.catalog.add(adapter_id, folder, staged=copy).path
                    staged = None  # the catalog owns it now
                record = AdapterRecord(adapter_id, folder, manifest, size, persisted=persist)
                self._serve(record)
                self._host_put(record, weights)  # just registered: likely used soon
                return self._info(record)
        finally:
            if staged is not None:
                self.catalog.discard(staged)

    def _serve(self, record: AdapterRecord) -> None:
        """Make `record` the one new requests for its id get, under a version no earlier weights had."""
        record.version = next(self._versions)
        self._live[record.adapter_id] = record

    def unregister(self, adapter_id: str) -> None:
        """Remove at once for new requests; weights stay until in-flight leases are released."""
        with self._lock:
            record = self._live.pop(adapter_id, None)
            if record is None:
                if adapter_id in self.catalog:  # persisted but broken at startup
                    self.catalog.remove(adapter_id)
                    self.load_errors.pop(adapter_id, None)
                    return
                raise self._not_found(adapter_id)
            record.retired = True
            if record.persisted:
                self.catalog.remove(adapter_id)
            self._retire(record)
            for mixture in self.mixtures.merged_from(adapter_id):
                self._withdraw(mixture)  # merged from what was just removed: stale

    def _withdraw(self, record: AdapterRecord) -> None:
        """Out of `_live` (new requests no longer find it), then retired."""
        self._live.pop(record.adapter_id, None)
        self._retire(record)

    def _retire(self, record: AdapterRecord) -> None:
        """Already out of `_live`: free it now, or when its last lease is released."""
        record.retired = True
        if record.refcount == 0:
            self._drop(record)

    # -- lookup ---------------------------------------------------------------------------------
    def get(self, adapter_id: str) -> AdapterInfo:
        with self._lock:
            return self._info(self._get_live(adapter_id))

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._info(r) for r in self._live.values()]

    def __contains__(self, adapter_id: object) -> bool:
        with self._lock:
            return adapter_id in self._live

    def _get_live(self, adapter_id: str) -> AdapterRecord:
        record = self._live.get(adapter_id) if isinstance(adapter_id, str) else None
        if record is None:
            raise self._not_found(adapter_id)
        return record

    @staticmethod
    def _not_found(adapter_id: object) -> AdapterError:
        return AdapterError(NOT_FOUND, f"adapter {str(adapter_id)[:80]!r} does not exist",
                            param="model", code="adapter_not_found")

    def _info(self, r: AdapterRecord) -> AdapterInfo:
        m = r.manifest
        tier = self.residency.tier(r)
        return AdapterInfo(
            id=r.adapter_id, type=m.kind, rank=m.rank, alpha=m.alpha, targets=m.targets,
            size_bytes=r.size_bytes, tier=tier, last_used=r.last_used, requests_served=r.requests_served,
            active_leases=r.refcount, num_virtual_tokens=getattr(m, "num_virtual_tokens", 0),
            use_rslora=getattr(m, "use_rslora", False), use_dora=getattr(m, "use_dora", False), source=str(r.folder),
            mixture=r.recipe.to_dict() if r.recipe is not None else None,
        )

    # -- leases (see Residency) -------------------------------------------------------------------
    def prefetch(self, adapter_id: str) -> None:
        """A request for `adapter_id` arrived: start reading its weights in the background, so they
        are ready by the time the engine can run it. Unknown ids are left to `try_acquire`."""
        with self._lock:
            record = self._live.get(adapter_id)
            if record is not None:
                self.residency.prefetch(record)

    def try_acquire(self, adapter_id: str) -> Lease | None:
        """Hold an adapter for one request, if it is ready: in a device slot (LoRA) or in host
        memory (a prefix's KV). Never reads a file or copies weights on the calling thread (the
        engine's): when it is not ready this returns None and the background thread gets it ready
        (read from disk, then copied into a free slot or the least recently used one no request
        holds). None also when it needs a slot and every slot is held by running requests: the
        caller retries later (no eviction of in-use adapters, no thrashing).
        Raises AdapterError 404 for an unknown id, 500 when its files can no longer be loaded.
        """
        with self._lock:
            return self.residency.try_acquire(self._get_live(adapter_id))

    def is_loading(self, adapter_id: str) -> bool:
        """Whether `adapter_id`'s weights are being read or written into a slot (the scheduler does not
        count those steps as waiting for a slot)."""
        with self._lock:
            record = self._live.get(adapter_id)
            return record is not None and self.residency.pending(record)

    def acquire(self, adapter_id: str, timeout: float = 120.0) -> Lease | None:
        """`try_acquire`, waiting for the background load and slot copy it starts: None only when
        every slot is held by running requests. For callers that may block (tests, tools)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                lease = self.try_acquire(adapter_id)
                record = self._get_live(adapter_id)
                if lease is not None or not (self.residency.pending(record) or self.residency.writing):
                    return lease
                if time.monotonic() > deadline:
                    raise TimeoutError(f"adapter {adapter_id!r} was not ready within {timeout} s")
                self.residency.wait(max(0.0, deadline - time.monotonic()))

    def release(self, lease: Lease) -> None:
        with self._lock:
            if lease.released:
                raise ValueError(f"lease on {lease.adapter_id!r} released twice")
            lease.released = True
            record: AdapterRecord = lease._record
            record.refcount -= 1
            self.residency.release(record)
            if record.refcount == 0 and record.retired:
                self._drop(record)

    def _reload(self, record: AdapterRecord) -> Weights:
        """Read a registered adapter's weights again (outside the lock: on the background thread)."""
        try:
            manifest = self._inspect(record.folder, str(record.folder))
            if manifest != record.manifest:
                raise AdapterError(INTERNAL, "its files changed on disk since registration")
            return self._load(record.folder, manifest, str(record.folder))
        except (AdapterError, OSError) as e:
            raise AdapterError(INTERNAL, f"adapter {record.adapter_id!r} can no longer be loaded: "
                                         f"{getattr(e, 'message', e)}") from None

    def _load(self, folder: Path, manifest: Manifest, label: str) -> Weights:
        """Read an inspected adapter's weights (outside the lock); a DoRA adapter's factors are
        computed here, once per read from disk, never on the engine's step path."""
        weights = load_adapter(folder, manifest, self.spec, dtype=self.dtype, device=self.device, label=label)
        if not getattr(manifest, "use_dora", False):
            return weights
        if self._base is None:
            raise AdapterError(INTERNAL, f"adapter at {label}: DoRA needs the base model's weights, and none "
                                         f"are attached to this registry")
        return with_dora_factors(weights, self._base, self.spec)

    def _host_put(self, record: AdapterRecord, weights: Weights) -> None:
        self.residency.put(record, weights)

    def _drop(self, record: AdapterRecord) -> None:
        """Free everything a retired, unleased adapter still occupies."""
        self.residency.drop(record)
        if record.recipe is not None:
            self.mixtures.forget(record)

    # -- mixtures (see MixtureCache) -------------------------------------------------------------
    def mixture(self, recipe: MixtureRecipe) -> str:
        """The adapter id serving `recipe`, merged on first use (blocks while merging)."""
        return self.mixtures.get(recipe)

    def save_mixture(self, adapter_id: str, recipe: MixtureRecipe) -> AdapterInfo:
        """Merge `recipe` (or reuse its cached merge) and register it as a persisted adapter."""
        return self.mixtures.save(adapter_id, recipe)

    @property
    def merges_computed(self) -> int:
        return self.mixtures.merges_computed
