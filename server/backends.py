"""What the HTTP routes need of whatever serves them: one set of routes, two ways of serving.

`loramux serve` answers from its own engine and adapter registry (server/local_backend.py); on Ray
Serve the ingress forwards to engine replicas and keeps adapters in the shared store
(server/ray_ingress.py, server/ray_admin.py). The routes (server/openai_routes.py,
server/admin_routes.py) parse and check requests, call one of these methods, and shape the answer,
so every route behaves the same in both modes.

Failures are raised as APIError or AdapterError (an OpenAI-shaped error either way).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import anyio
from starlette.requests import Request
from starlette.responses import Response

from loramux.adapters_registry.mixtures import MixtureRecipe


class Serving(Protocol):
    """The OpenAI routes' side: completions, the models served, health, metrics."""

    prep_limiter: anyio.CapacityLimiter       # threads that parse large request bodies

    async def complete(self, endpoint: str, req: Any, request: Request) -> Response:
        """Answer a parsed completion (`endpoint` "completions") or chat ("chat") request."""

    async def models(self) -> tuple[str, list[str]]:
        """The base model's name and the adapter ids served on it."""

    async def unhealthy(self) -> str | None:
        """Why nothing can be served now (answered 503), or None."""

    async def metrics(self) -> bytes:
        """The Prometheus exposition."""


class AdapterAdmin(Protocol):
    """The admin routes' side: adapters registered, listed and removed at runtime.

    Adapters are described as AdapterInfo dicts (adapters_registry/records.py).
    """

    upload_bytes: int                          # bound on one upload, both files together

    def staging_dir(self) -> Path:
        """Where an upload's files are written before `register_upload` (a `.staging-*` folder in it)."""

    async def register_path(self, adapter_id: str, raw_path: object) -> dict:
        """Register the adapter folder at a client-given path (confined to the allowed roots)."""

    async def register_upload(self, adapter_id: str, folder: Path) -> dict:
        """Register an upload the route staged in `folder` (under `staging_dir()`; removed after)."""

    async def save_mixture(self, adapter_id: str, recipe: MixtureRecipe) -> dict:
        """Merge registered LoRA adapters and register the result as a new adapter."""

    async def list(self) -> list[dict]: ...

    async def get(self, adapter_id: str) -> dict: ...

    async def delete(self, adapter_id: str) -> None:
        """Remove at once for new requests; requests running on it finish."""
