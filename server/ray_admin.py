"""The admin routes' backend on Ray Serve (an AdapterAdmin, server/backends.py): adapters live in the
shared AdapterStore, and the replicas load them from there (server/store_follower.py).

- register (by path, upload, or a saved mixture) runs on one replica: it checks the adapter, copies
  it into the store and loads it (full validation; a refused adapter leaves the store). Others load
  it lazily on first use. An upload is first written by the ingress to a folder under the store's
  root, which every replica can read; a mixture is merged on a replica holding its first source.
- delete removes it from the store, then is broadcast to every live replica, freeing it at once
  (running requests finish).
- list / get describe what the store holds: from the replicas holding an adapter (their counters
  summed), else from its files.
"""
from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from loramux.adapters_registry.mixtures import MixtureRecipe
from loramux.adapters_registry.store import AdapterStore
from loramux.server.errors import APIError

if TYPE_CHECKING:
    from loramux.server.ray_ingress import Ingress

_TIERS = ("disk", "host", "device")        # worst to best


class RayAdapters:
    def __init__(self, ingress: Ingress, store: AdapterStore, upload_bytes: int) -> None:
        self.ingress, self.store, self.upload_bytes = ingress, store, upload_bytes

    def staging_dir(self) -> Path:
        return self.store.root

    def _on_one(self, method: str, adapter_id: str | None = None):
        """A call to one replica: one holding `adapter_id` if any (Serve's multiplexed routing)."""
        mux = {"multiplexed_model_id": adapter_id} if adapter_id else {}
        return self.ingress.engines.options(method_name=method, **mux)

    async def register_path(self, adapter_id: str, raw_path: object) -> dict:
        return _unwrap(await self._on_one("register", adapter_id).remote(adapter_id, raw_path))

    async def register_upload(self, adapter_id: str, folder: Path) -> dict:
        return _unwrap(await self._on_one("register_upload", adapter_id).remote(adapter_id, folder.name))

    async def save_mixture(self, adapter_id: str, recipe: MixtureRecipe) -> dict:
        return _unwrap(await self._on_one("save_mixture", recipe.ids[0]).remote(adapter_id, recipe))

    async def list(self) -> list[dict]:
        return await self._describe(await asyncio.to_thread(self.store.list))

    async def get(self, adapter_id: str) -> dict:
        found = await self._describe([adapter_id])
        if not found:
            raise AdapterStore.not_found(adapter_id)
        return found[0]

    async def delete(self, adapter_id: str) -> None:
        await asyncio.to_thread(self.store.delete, adapter_id)
        await self.ingress.gather("forget", adapter_id)    # every live replica drops it now

    async def _describe(self, adapter_ids: list[str]) -> list[dict]:
        current = await asyncio.to_thread(self._current, adapter_ids)
        held: dict[str, list[tuple[str, dict]]] = defaultdict(list)
        for rep in await self.ingress.gather("stats"):
            for info in rep["adapters"]:
                if current.get(info["id"]) == info["source"]:      # the store's current version
                    held[info["id"]].append((rep["replica"], info))
        missing = [i for i in current if i not in held]
        described = {d["id"]: d for d in await self._on_one("describe").remote(missing)} if missing else {}
        return [_merge(held[i]) if i in held else {**described[i], "replicas": []}
                for i in current if i in held or i in described]

    def _current(self, adapter_ids: list[str]) -> dict[str, str]:
        """(thread) id -> folder of its current version, for the ids the store holds."""
        return {i: str(self.store.path_for(i)) for i in adapter_ids if i in self.store}


def _merge(holders: list[tuple[str, dict]]) -> dict:
    """One adapter as several replicas hold it: counters summed, the best tier, the latest use."""
    infos = [info for _, info in holders]
    used = [i["last_used"] for i in infos if i["last_used"] is not None]
    return {**infos[0], "tier": max((i["tier"] for i in infos), key=_TIERS.index),
            "last_used": max(used, default=None), "requests_served": sum(i["requests_served"] for i in infos),
            "active_leases": sum(i["active_leases"] for i in infos), "replicas": sorted(r for r, _ in holders)}


def _unwrap(answer: tuple[int, dict]) -> dict:
    """A replica's (status, body) as the adapter it describes, or the error it reports, raised."""
    status, body = answer
    if status >= 400:
        err = body["error"]
        raise APIError(status, err["message"], param=err["param"], code=err["code"])
    return body
