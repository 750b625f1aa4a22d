"""The adapter registry: ids -> adapters, across three tiers, with leases for running requests.

Tiers: a fixed number of device slots (LoraStacks), a bounded LRU of parsed weights in host
memory, and the catalog on disk. `try_acquire` pulls an adapter up into a slot, evicting the least
recently used slot nobody holds; a lease pins it until `release`. Prefix adapters need no slot:
their KV prefix lives in the host tier (already on the device) and the lease carries it.

One lock guards all state; it is held for bookkeeping and slot copies but not while reading
files, so the engine thread never waits behind a slow disk read of another request's adapter.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from loramux.engine.models.spec import ModelSpec

from .adapter_files import WEIGHTS_FILE
from .catalog import Catalog
from .config import RegistryConfig
from .datadir_lock import claim_data_dir
from .errors import BAD_REQUEST, CONFLICT, INTERNAL, NOT_FOUND, AdapterError
from .formats import Manifest, Weights, inspect_adapter, load_adapter
from .host_cache import LruCache
from .ids import validate_adapter_id
from .merge import MergeError, merge_lora
from .mixtures import MixtureRecipe, write_lora_folder
from .paths import confine_path
from .peft_lora import LoraWeights
from .records import AdapterInfo, Lease
from .slots import LoraStacks, SlotTable

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity semantics: a re-registered id is a different record
class _Record:
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

    @property
    def kind(self) -> str:
        return self.manifest.kind


class AdapterRegistry:
    def __init__(self, spec: ModelSpec, config: RegistryConfig, *, dtype: torch.dtype,
                 device: torch.device | str, base_model_name: str):
        self.spec, self.config = spec, config
        self.dtype, self.device = dtype, torch.device(device)
        self.base_model_name = base_model_name
        self.stacks = LoraStacks(spec, config.max_slots, config.max_rank, dtype=dtype, device=self.device)
        # Before anything under data_dir is swept: what this start deletes is ours, never a live server's.
        self._data_dir_lock = claim_data_dir(config.data_dir)
        self.catalog = Catalog(config.data_dir)
        self.load_errors: dict[str, str] = {}  # persisted adapters that failed validation at startup
        self._lock = threading.RLock()
        self._live: dict[str, _Record] = {}
        self._slots: SlotTable[_Record] = SlotTable(config.max_slots)
        self._host: LruCache[_Record, Weights] = LruCache(config.max_host_adapters)
        # Per-request mixtures: merged once per recipe into a folder under mixtures/ (a cache, wiped
        # at start), served like any adapter, the least recently used dropped beyond max_mixtures.
        self.merges_computed = 0
        self._merge_lock = threading.Lock()  # one merge at a time: a recipe asked twice is merged once
        self._mixtures: OrderedDict[str, _Record] = OrderedDict()
        self._mixture_dir = self.catalog.data_dir / "mixtures"
        shutil.rmtree(self._mixture_dir, ignore_errors=True)
        self._mixture_dir.mkdir(parents=True)
        self._restore()

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
            self._live[entry.adapter_id] = _Record(entry.adapter_id, entry.path, manifest, size, persisted=True)

    def _inspect(self, folder: Path, label: str) -> Manifest:
        return inspect_adapter(folder, self.spec, max_rank=self.config.max_rank,
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
            weights = load_adapter(folder, manifest, self.spec, dtype=self.dtype, device=self.device, label=label)
            size = (folder / WEIGHTS_FILE).stat().st_size
            with self._lock:
                self._check_free(adapter_id)
                if persist:
                    folder = self.catalog.add(adapter_id, folder, staged=copy).path
                    staged = None  # the catalog owns it now
                record = _Record(adapter_id, folder, manifest, size, persisted=persist)
                self._live[adapter_id] = record
                self._host_put(record, weights)  # just registered: likely used soon
                return self._info(record)
        finally:
            if staged is not None:
                self.catalog.discard(staged)

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
            for mixture in [m for m in self._mixtures.values() if not m.retired and adapter_id in m.recipe.ids]:
                self._live.pop(mixture.adapter_id, None)  # merged from what was just removed: stale
                self._retire(mixture)

    def _retire(self, record: _Record) -> None:
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

    def _get_live(self, adapter_id: str) -> _Record:
        record = self._live.get(adapter_id) if isinstance(adapter_id, str) else None
        if record is None:
            raise self._not_found(adapter_id)
        return record

    @staticmethod
    def _not_found(adapter_id: object) -> AdapterError:
        return AdapterError(NOT_FOUND, f"adapter {str(adapter_id)[:80]!r} does not exist",
                            param="model", code="adapter_not_found")

    def _info(self, r: _Record) -> AdapterInfo:
        m = r.manifest
        if r.slot >= 0 or (m.kind == "prefix" and r in self._host):
            tier = "device"  # a cached prefix's KV already lives on the device
        else:
            tier = "host" if r in self._host else "disk"
        return AdapterInfo(
            id=r.adapter_id, type=m.kind, rank=m.rank, alpha=m.alpha, targets=m.targets,
            size_bytes=r.size_bytes, tier=tier, last_used=r.last_used, requests_served=r.requests_served,
            active_leases=r.refcount, num_virtual_tokens=getattr(m, "num_virtual_tokens", 0),
            use_rslora=getattr(m, "use_rslora", False), source=str(r.folder),
            mixture=r.recipe.to_dict() if r.recipe is not None else None,
        )

    # -- leases ---------------------------------------------------------------------------------
    def try_acquire(self, adapter_id: str) -> Lease | None:
        """Hold an adapter for one request, loading it into a slot if needed.

        Returns None when it needs a slot and every slot is held by running requests: the caller
        retries after some request finishes (no eviction of in-use adapters, no thrashing).
        Raises AdapterError 404 for an unknown id.
        """
        loaded: tuple[_Record, Weights] | None = None  # weights read outside the lock
        while True:
            with self._lock:
                record = self._get_live(adapter_id)
                weights = self._host.get(record)
                if weights is None and loaded is not None and loaded[0] is record:
                    weights = loaded[1]
                    self._host_put(record, weights)
                if record.kind == "prefix":
                    if weights is not None:
                        return self._lease(record, -1, weights.kv)
                elif record.slot >= 0:
                    self._slots.touch(record.slot)
                    return self._lease(record, record.slot, None)
                else:
                    slot = self._slots.victim(lambda owner: owner.refcount == 0)
                    if slot is None:
                        return None
                    if weights is not None:
                        self._place(record, slot, weights)
                        return self._lease(record, slot, None)
            loaded = (record, self._reload(record))

    def release(self, lease: Lease) -> None:
        with self._lock:
            if lease.released:
                raise ValueError(f"lease on {lease.adapter_id!r} released twice")
            lease.released = True
            record: _Record = lease._record
            record.refcount -= 1
            if record.slot >= 0:
                self._slots.touch(record.slot)  # just finished: recently used
            if record.refcount == 0 and record.retired:
                self._drop(record)

    def _lease(self, record: _Record, slot: int, kv: torch.Tensor | None) -> Lease:
        record.refcount += 1
        record.requests_served += 1
        record.last_used = time.time()
        return Lease(record.adapter_id, record.kind, slot, kv, _record=record)

    def _place(self, record: _Record, slot: int, weights: Weights) -> None:
        evicted = self._slots.owner[slot]
        if evicted is not None:
            evicted.slot = -1
        self.stacks.write(slot, weights)
        self._slots.assign(slot, record)
        record.slot = slot

    def _reload(self, record: _Record) -> Weights:
        """Read a registered adapter's weights again (outside the lock)."""
        try:
            manifest = self._inspect(record.folder, str(record.folder))
            if manifest != record.manifest:
                raise AdapterError(INTERNAL, "its files changed on disk since registration")
            return load_adapter(record.folder, manifest, self.spec, dtype=self.dtype, device=self.device)
        except (AdapterError, OSError) as e:
            raise AdapterError(INTERNAL, f"adapter {record.adapter_id!r} can no longer be loaded: "
                                         f"{getattr(e, 'message', e)}") from None

    def _host_put(self, record: _Record, weights: Weights) -> None:
        self._host.put(record, weights)

    def _drop(self, record: _Record) -> None:
        """Free everything a retired, unleased adapter still occupies."""
        if record.slot >= 0:
            self._slots.free(record.slot)
            self.stacks.clear(record.slot)
            record.slot = -1
        self._host.pop(record)
        if record.recipe is not None:
            if self._mixtures.get(record.adapter_id) is record:
                del self._mixtures[record.adapter_id]
            shutil.rmtree(record.folder, ignore_errors=True)

    # -- mixtures -------------------------------------------------------------------------------
    def mixture(self, recipe: MixtureRecipe) -> str:
        """The adapter id serving `recipe`: merged and registered on first use, reused after.

        Blocks while merging (call it off the event loop). Sources must be registered LoRA
        adapters: AdapterError 404 for an unknown one, 400 for prefix tuning or unmergeable ranks.
        """
        mix_id = recipe.adapter_id
        with self._lock:
            if self._cached_mixture(mix_id, recipe):
                return mix_id
        with self._merge_lock:
            with self._lock:
                if self._cached_mixture(mix_id, recipe):
                    return mix_id
            merged, sources = self._merge(recipe)
            folder = write_lora_folder(merged, self._mixture_dir / f"{mix_id}-{uuid.uuid4().hex[:8]}",
                                       self.spec.num_layers)
            try:
                label = f"mixture {mix_id}"
                manifest = self._inspect(folder, label)  # serve what we wrote, checked like any adapter
                weights = load_adapter(folder, manifest, self.spec, dtype=self.dtype, device=self.device, label=label)
                with self._lock:
                    if any(self._live.get(s.adapter_id) is not s for s in sources):
                        raise AdapterError(CONFLICT, "a source adapter was removed or replaced during the merge; "
                                                     "retry", param="adapters")
                    self._check_free(mix_id)
                    record = _Record(mix_id, folder, manifest, (folder / WEIGHTS_FILE).stat().st_size,
                                     persisted=False, recipe=recipe)
                    self._live[mix_id] = record
                    self._host_put(record, weights)
                    self._mixtures[mix_id] = record
                    self._trim_mixtures()
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        return mix_id

    def save_mixture(self, adapter_id: str, recipe: MixtureRecipe) -> AdapterInfo:
        """Merge `recipe` (or reuse its cached merge) and register it as a persisted adapter."""
        validate_adapter_id(adapter_id, self.base_model_name)
        with self._lock:
            self._check_free(adapter_id)
        mix_id = self.mixture(recipe)
        with self._lock:
            record = self._get_live(mix_id)
            record.refcount += 1  # pinned (its folder stays) while we copy it
        try:  # a copy: later changes to the sources do not reach the saved adapter
            return self._register(adapter_id, record.folder, copy=True, persist=True, label=f"mixture {adapter_id!r}")
        finally:
            with self._lock:
                record.refcount -= 1
                if record.refcount == 0 and record.retired:
                    self._drop(record)

    def _cached_mixture(self, mix_id: str, recipe: MixtureRecipe) -> bool:
        record = self._live.get(mix_id)
        if record is None:
            return False
        if record.recipe != recipe:
            raise AdapterError(CONFLICT, f"mixture id {mix_id!r} is taken by another adapter", param="adapters")
        self._mixtures.move_to_end(mix_id)
        return True

    def _trim_mixtures(self) -> None:
        """Drop the least recently used idle mixtures beyond `max_mixtures` (merged again if asked)."""
        live = [r for r in self._mixtures.values() if not r.retired]  # oldest first
        idle = [r for r in live if r.refcount == 0]
        for record in idle[:max(0, len(live) - self.config.max_mixtures)]:
            self._live.pop(record.adapter_id, None)
            self._retire(record)

    def _merge(self, recipe: MixtureRecipe) -> tuple[LoraWeights, list[_Record]]:
        with self._lock:
            sources = [self._source(aid) for aid in recipe.ids]
        weights = []
        for record in sources:
            with self._lock:
                w = self._host.get(record)
            if w is None:
                w = self._reload(record)
                with self._lock:
                    if not record.retired:
                        self._host_put(record, w)
            weights.append(w)
        try:
            merged = merge_lora(weights, recipe.weights, recipe.method, density=recipe.density,
                                majority_sign_method=recipe.majority_sign_method or "total",
                                generator=torch.Generator().manual_seed(recipe.seed or 0))
        except MergeError as e:
            raise AdapterError(BAD_REQUEST, f"cannot merge {', '.join(recipe.ids)}: {e}", param="adapters") from None
        if merged.manifest.rank > self.config.max_rank:
            raise AdapterError(BAD_REQUEST, f"the merged adapter's rank {merged.manifest.rank} exceeds the server's "
                                            f"maximum rank {self.config.max_rank}", param="adapters")
        with self._lock:
            self.merges_computed += 1
        return merged, sources

    def _source(self, adapter_id: str) -> _Record:
        record = self._live.get(adapter_id)
        if record is None:
            raise AdapterError(NOT_FOUND, f"mixture source adapter {adapter_id[:80]!r} does not exist",
                               param="adapters", code="adapter_not_found")
        if record.kind != "lora":
            raise AdapterError(BAD_REQUEST, f"adapter {adapter_id!r} is {record.kind} tuning: only LoRA adapters "
                                            f"can be merged", param="adapters")
        if record.recipe is not None:
            raise AdapterError(BAD_REQUEST, f"adapter {adapter_id!r} is itself a per-request mixture: save it under "
                                            f"a name first (POST /v1/adapters with `mixture`)", param="adapters")
        return record

