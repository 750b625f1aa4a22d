"""The cache of per-request mixtures: each recipe merged once, into a folder under mixtures/ (a
cache, wiped at start), then served like any adapter; the least recently used idle mixtures are
dropped beyond `max_mixtures` (merged again if asked), and a mixture goes when a source goes.

It is a part of the registry, not a layer above it: its records live among the registry's
(`_live`, the host tier, leases) and its bookkeeping is guarded by the registry's lock. It adds
its own lock (one merge at a time, so a recipe asked twice is merged once), folder, LRU order
and merge counter.
"""
from __future__ import annotations

import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .adapter_files import WEIGHTS_FILE
from .errors import BAD_REQUEST, CONFLICT, NOT_FOUND, AdapterError
from .formats import load_adapter
from .ids import validate_adapter_id
from .merge import MergeError, merge_lora
from .mixtures import MixtureRecipe, write_lora_folder
from .peft_lora import LoraWeights
from .records import AdapterInfo, AdapterRecord

if TYPE_CHECKING:
    from .registry import AdapterRegistry


class MixtureCache:
    def __init__(self, registry: AdapterRegistry, mixture_dir: Path):
        self._registry = registry
        self.merges_computed = 0
        self._merge_lock = threading.Lock()  # one merge at a time: a recipe asked twice is merged once
        self._mixtures: OrderedDict[str, AdapterRecord] = OrderedDict()  # least recently used first
        self._mixture_dir = mixture_dir
        # A cache, emptied at start: the registry holds the data dir's lock, so no live server uses it.
        shutil.rmtree(self._mixture_dir, ignore_errors=True)
        self._mixture_dir.mkdir(parents=True)

    def get(self, recipe: MixtureRecipe) -> str:
        """The adapter id serving `recipe`: merged and registered on first use, reused after.

        Blocks while merging (call it off the event loop). Sources must be registered LoRA
        adapters: AdapterError 404 for an unknown one, 400 for prefix tuning or unmergeable ranks.
        """
        reg = self._registry
        if reg.spec.fused_checkpoint:    # a merge is written under our q/k/v names, which such a base lacks
            raise AdapterError(BAD_REQUEST, "mixtures are not supported on a base whose checkpoint fuses q/k/v "
                                            "and gate/up (Phi-3) yet", param="adapters")
        mix_id = recipe.adapter_id
        with reg._lock:
            if self._cached(mix_id, recipe):
                return mix_id
        with self._merge_lock:
            with reg._lock:
                if self._cached(mix_id, recipe):
                    return mix_id
            merged, sources = self._merge(recipe)
            folder = write_lora_folder(merged, self._mixture_dir / f"{mix_id}-{uuid.uuid4().hex[:8]}",
                                       reg.spec.num_layers)
            try:
                label = f"mixture {mix_id}"
                manifest = reg._inspect(folder, label)  # serve what we wrote, checked like any adapter
                try:
                    weights = load_adapter(folder, manifest, reg.spec, dtype=reg.dtype, device=reg.device, label=label)
                except AdapterError as e:   # e.g. the merged update can overflow: the recipe is at fault
                    e.param = "adapters"
                    raise
                with reg._lock:
                    if any(reg._live.get(s.adapter_id) is not s for s in sources):
                        raise AdapterError(CONFLICT, "a source adapter was removed or replaced during the merge; "
                                                     "retry", param="adapters")
                    reg._check_free(mix_id)
                    record = AdapterRecord(mix_id, folder, manifest, (folder / WEIGHTS_FILE).stat().st_size,
                                           persisted=False, recipe=recipe)
                    reg._serve(record)
                    reg._host_put(record, weights)
                    self._mixtures[mix_id] = record
                    self._trim()
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        return mix_id

    def save(self, adapter_id: str, recipe: MixtureRecipe) -> AdapterInfo:
        """Merge `recipe` (or reuse its cached merge) and register it as a persisted adapter."""
        reg = self._registry
        validate_adapter_id(adapter_id, reg.base_model_name)
        with reg._lock:
            reg._check_free(adapter_id)
        mix_id = self.get(recipe)
        with reg._lock:
            record = reg._get_live(mix_id)
            record.refcount += 1  # pinned (its folder stays) while we copy it
        try:  # a copy: later changes to the sources do not reach the saved adapter
            return reg._register(adapter_id, record.folder, copy=True, persist=True, label=f"mixture {adapter_id!r}")
        finally:
            with reg._lock:
                record.refcount -= 1
                if record.refcount == 0 and record.retired:
                    reg._drop(record)

    def merged_from(self, adapter_id: str) -> list[AdapterRecord]:
        """The live mixtures that have `adapter_id` among their sources (under the registry lock)."""
        return [m for m in self._mixtures.values() if not m.retired and adapter_id in m.recipe.ids]

    def forget(self, record: AdapterRecord) -> None:
        """A mixture record was dropped by the registry (under its lock): delete its folder."""
        if self._mixtures.get(record.adapter_id) is record:
            del self._mixtures[record.adapter_id]
        shutil.rmtree(record.folder, ignore_errors=True)

    def _cached(self, mix_id: str, recipe: MixtureRecipe) -> bool:
        record = self._registry._live.get(mix_id)
        if record is None:
            return False
        if record.recipe != recipe:
            raise AdapterError(CONFLICT, f"mixture id {mix_id!r} is taken by another adapter", param="adapters")
        self._mixtures.move_to_end(mix_id)
        return True

    def _trim(self) -> None:
        """Drop the least recently used idle mixtures beyond `max_mixtures` (merged again if asked)."""
        live = [r for r in self._mixtures.values() if not r.retired]  # oldest first
        idle = [r for r in live if r.refcount == 0]
        for record in idle[:max(0, len(live) - self._registry.config.max_mixtures)]:
            self._registry._withdraw(record)

    def _merge(self, recipe: MixtureRecipe) -> tuple[LoraWeights, list[AdapterRecord]]:
        reg = self._registry
        with reg._lock:
            sources = [self._source(aid) for aid in recipe.ids]
        weights = []
        for record in sources:
            with reg._lock:
                w = reg.residency.host.get(record)
            if w is None:
                w = reg._reload(record)
                with reg._lock:
                    if not record.retired:
                        reg._host_put(record, w)
            weights.append(w)
        try:
            merged = merge_lora(weights, recipe.weights, recipe.method, density=recipe.density,
                                majority_sign_method=recipe.majority_sign_method or "total",
                                generator=torch.Generator().manual_seed(recipe.seed or 0))
        except MergeError as e:
            raise AdapterError(BAD_REQUEST, f"cannot merge {', '.join(recipe.ids)}: {e}", param="adapters") from None
        if merged.manifest.rank > reg.config.max_lora_rank:
            raise AdapterError(BAD_REQUEST, f"the merged adapter's rank {merged.manifest.rank} exceeds the server's "
                                            f"maximum rank {reg.config.max_lora_rank}", param="adapters")
        with reg._lock:
            self.merges_computed += 1
        return merged, sources

    def _source(self, adapter_id: str) -> AdapterRecord:
        record = self._registry._live.get(adapter_id)
        if record is None:
            raise AdapterError(NOT_FOUND, f"mixture source adapter {adapter_id[:80]!r} does not exist",
                               param="adapters", code="adapter_not_found")
        if record.kind != "lora":
            raise AdapterError(BAD_REQUEST, f"adapter {adapter_id!r} is {record.kind} tuning: only LoRA adapters "
                                            f"can be merged", param="adapters")
        if getattr(record.manifest, "use_dora", False):
            # peft's add_weighted_adapter merges A and B only: the result takes the first source's config
            # and magnitudes re-initialized to the base's row norms, so every source's trained DoRA
            # magnitudes would be silently dropped.
            raise AdapterError(BAD_REQUEST, f"adapter {adapter_id!r} is a DoRA adapter: merges combine LoRA "
                                            f"A and B only and would drop its magnitude vectors, so DoRA "
                                            f"adapters cannot be mixed", param="adapters")
        if record.recipe is not None:
            raise AdapterError(BAD_REQUEST, f"adapter {adapter_id!r} is itself a per-request mixture: save it under "
                                            f"a name first (POST /v1/adapters with `mixture`)", param="adapters")
        return record
