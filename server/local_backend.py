"""`loramux serve`'s backends (server/backends.py): its own engine, and its own adapter registry.

Registry work (file copies, validation, merges) runs in the thread pool, never on the event loop.
"""
from __future__ import annotations

from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from loramux.adapters_registry.mixtures import MixtureRecipe
from loramux.adapters_registry.registry import AdapterRegistry
from loramux.server.completions import run_request
from loramux.server.state import ServerState


class LocalServing:
    """Completions from this process's engine (server/completions.py)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.prep_limiter = state.prep_limiter

    async def complete(self, endpoint: str, req, request: Request) -> Response:
        return await run_request(self.state, req, endpoint, request)

    async def models(self) -> tuple[str, list[str]]:
        registry = self.state.registry
        return self.state.base_model_name, [info.id for info in registry.list()] if registry is not None else []

    async def unhealthy(self) -> str | None:
        return "engine stopped" if self.state.engine.error is not None else None

    async def metrics(self) -> bytes:
        return self.state.metrics.render()


class RegistryAdmin:
    """Adapters registered in this process's registry (and persisted in its data dir)."""

    def __init__(self, registry: AdapterRegistry) -> None:
        self.registry = registry
        self.upload_bytes = registry.config.max_upload_bytes

    def staging_dir(self) -> Path:
        return self.registry.scratch_dir

    async def register_path(self, adapter_id: str, raw_path: object) -> dict:
        path = self.registry.resolve_allowed_path(raw_path)
        return _info(await run_in_threadpool(self.registry.register, adapter_id, path, copy=True))

    async def register_upload(self, adapter_id: str, folder: Path) -> dict:
        return _info(await run_in_threadpool(self.registry.register, adapter_id, folder, copy=True, label="upload"))

    async def save_mixture(self, adapter_id: str, recipe: MixtureRecipe) -> dict:
        return _info(await run_in_threadpool(self.registry.save_mixture, adapter_id, recipe))

    async def list(self) -> list[dict]:
        return [_info(info) for info in self.registry.list()]

    async def get(self, adapter_id: str) -> dict:
        return _info(self.registry.get(adapter_id))

    async def delete(self, adapter_id: str) -> None:
        await run_in_threadpool(self.registry.unregister, adapter_id)


def _info(info) -> dict:
    return info.to_dict()
