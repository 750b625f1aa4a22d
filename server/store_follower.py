"""A Ray replica's adapter registry, following the shared AdapterStore (used by server/ray_replica.py).

`@serve.multiplexed` loads an adapter from the store on first use (Serve then routes that adapter's
requests to this replica), Serve's LRU eviction unregisters it again once no running request holds
it, and every use checks that the folder served is still the store's current version, so an adapter
deleted, or deleted and registered again, is never served stale. Adapters enter the store through
here: checked, copied in, then loaded on this replica, which validates them completely (a refused
adapter leaves the store again).
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from ray import serve

from loramux.adapters_registry.errors import AdapterError
from loramux.adapters_registry.ids import validate_adapter_id
from loramux.adapters_registry.mixtures import MixtureRecipe
from loramux.adapters_registry.records import AdapterInfo
from loramux.adapters_registry.registry import AdapterRegistry
from loramux.adapters_registry.store import AdapterStore

log = logging.getLogger("loramux.ray")


class _Resident:
    """What Serve's multiplexing LRU holds per adapter; its eviction unregisters the adapter."""

    def __init__(self, owner: StoreFollower, adapter_id: str, generation: int) -> None:
        self.owner, self.adapter_id, self.generation, self.gone = owner, adapter_id, generation, False

    def __del__(self) -> None:  # Serve calls it on eviction (from a thread), Python again at collection
        if not self.gone:
            self.gone = True
            self.owner.evicted(self.adapter_id, self.generation)


class StoreFollower:
    def __init__(self, registry: AdapterRegistry, store: AdapterStore, adapters_per_replica: int) -> None:
        self.registry, self.store = registry, store
        # Event-loop state: adapters running requests hold (pins), adapters Serve evicted that wait for
        # their pins to drop, and a load count per id so a late eviction of an old load is ignored.
        self._pins: Counter[str] = Counter()
        self._evicted: set[str] = set()
        self._generation: Counter[str] = Counter()
        self._lock = asyncio.Lock()             # one registry change at a time
        self._loop: asyncio.AbstractEventLoop | None = None

        async def load_adapter_from_store(adapter_id: str) -> _Resident:
            self._loop = asyncio.get_running_loop()
            self._generation[adapter_id] += 1
            self._evicted.discard(adapter_id)
            await self._sync(adapter_id)
            return _Resident(self, adapter_id, self._generation[adapter_id])
        self._load = serve.multiplexed(max_num_models_per_replica=adapters_per_replica)(load_adapter_from_store)

    # -- serving what the store holds ---------------------------------------------------------------
    def _served(self, adapter_id: str) -> str | None:
        try:
            return self.registry.get(adapter_id).source
        except AdapterError:
            return None

    def _stored(self, adapter_id: str) -> str | None:
        try:
            return str(self.store.path_for(adapter_id))
        except AdapterError:
            return None

    def _sync_now(self, adapter_id: str, keep: bool = True, label: str | None = None) -> None:
        """(thread) Make the registry serve the store's current version of `adapter_id`, or nothing."""
        want = self._stored(adapter_id) if keep else None
        have = self._served(adapter_id)
        if have != want:
            if have is not None:
                self.registry.unregister(adapter_id)
            if want is not None:
                self.registry.register(adapter_id, Path(want), copy=False, label=label)

    async def _sync(self, adapter_id: str, keep: bool = True, label: str | None = None) -> None:
        async with self._lock:
            await asyncio.to_thread(self._sync_now, adapter_id, keep, label)

    async def ensure(self, adapter_id: str) -> None:
        """Have `adapter_id` resident (Serve's multiplexing) and current (version check on use)."""
        if adapter_id in self.store:        # unknown ids fall through to the registry's 404
            await self._load(adapter_id)
        if self._served(adapter_id) != self._stored(adapter_id):
            await self._sync(adapter_id)

    @asynccontextmanager
    async def pinned(self, adapter_ids: Iterable[str]) -> AsyncIterator[None]:
        """Hold adapters resident (Serve's LRU may evict them meanwhile: they go when released)."""
        ids = list(adapter_ids)
        self._pins.update(ids)
        try:
            yield
        finally:
            self._pins.subtract(ids)
            for adapter_id in ids:
                if not self._pins[adapter_id]:
                    self._pins.pop(adapter_id, None)
                    if adapter_id in self._evicted:
                        await self._drop_if_idle(adapter_id)

    def evicted(self, adapter_id: str, generation: int) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._evict, adapter_id, generation)

    def _evict(self, adapter_id: str, generation: int) -> None:
        if generation == self._generation[adapter_id]:   # not loaded again since
            self._evicted.add(adapter_id)
            asyncio.ensure_future(self._drop_if_idle(adapter_id))

    async def _drop_if_idle(self, adapter_id: str) -> None:
        async with self._lock:
            if adapter_id in self._evicted and not self._pins[adapter_id]:
                self._evicted.discard(adapter_id)
                await asyncio.to_thread(self._sync_now, adapter_id, False)
                log.info("adapter %r unloaded: least recently used of this replica's adapters", adapter_id)

    async def forget(self, adapter_id: str) -> None:
        """(broadcast on DELETE) drop an adapter the store no longer has."""
        await self._sync(adapter_id)

    # -- adapters entering the store ----------------------------------------------------------------
    async def register(self, adapter_id: str, source: Path, label: str) -> AdapterInfo:
        """Copy the adapter folder `source` into the store and load it here. Refused as the single
        server refuses it (`label` names it in messages); a refused adapter leaves the store."""
        validate_adapter_id(adapter_id, self.registry.base_model_name)
        self.store.check_free(adapter_id)
        await asyncio.to_thread(self.registry.describe, adapter_id, source, label=label)   # refused before copying
        await asyncio.to_thread(self.store.put, adapter_id, source)
        try:
            await self._sync(adapter_id, label=label)      # the full validation, on the stored copy
            await self._load(adapter_id)                   # Serve learns that this replica holds it
        except AdapterError:
            await asyncio.to_thread(self.store.delete, adapter_id)
            raise
        return self.registry.get(adapter_id)

    async def save_mixture(self, adapter_id: str, recipe: MixtureRecipe) -> AdapterInfo:
        """Merge `recipe` here (its sources loaded from the store), then store the result like any
        registered adapter. The merge is saved locally under a scratch id first: no request can
        name it, so none sees the adapter before the store has it."""
        validate_adapter_id(adapter_id, self.registry.base_model_name)
        self.store.check_free(adapter_id)
        scratch_id = f"saving-{uuid.uuid4().hex[:16]}"
        async with self.pinned(recipe.ids):
            for source in recipe.ids:
                await self.ensure(source)
            merged = await asyncio.to_thread(self.registry.save_mixture, scratch_id, recipe)
        try:
            return await self.register(adapter_id, Path(merged.source), label=f"mixture {adapter_id!r}")
        finally:
            await asyncio.to_thread(self.registry.unregister, scratch_id)

    def describe(self, adapter_ids: list[str]) -> list[AdapterInfo]:
        """Stored adapters as registering them would serve them (nothing loaded); unknown ids left out."""
        out = []
        for adapter_id in adapter_ids:
            try:
                out.append(self.registry.describe(adapter_id, self.store.path_for(adapter_id)))
            except AdapterError:
                continue
        return out
