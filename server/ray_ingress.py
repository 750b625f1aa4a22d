"""The one endpoint of loramux on Ray Serve: the single server's HTTP API (server/api.py) over the
replicas. Completions are forwarded by adapter id (Serve's model multiplexing), adapters are managed
in the shared store (server/ray_admin.py), stats and metrics are gathered from every replica.

Deployed as `serve.ingress()(Ingress)` by server/ray_app.py: its FastAPI app is built in the
ingress replica (`__serve_build_asgi_app__`).
"""
from __future__ import annotations

import asyncio
import logging

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

from loramux.adapters_registry.store import AdapterStore
from loramux.server.api import build_api
from loramux.server.errors import error_response
from loramux.server.ray_admin import RayAdapters
from loramux.server.ray_config import RayConfig
from loramux.server.state import PREP_THREADS

RETRIES_HEADER = "x-loramux-retries"      # re-sends after the replica serving the request died
log = logging.getLogger("loramux.ray")
_RETRYABLE = (RayActorError, ReplicaUnavailableError)   # the replica died or vanished under the request


class Ingress:
    """The Serving backend (server/backends.py) over the engine replicas."""

    def __init__(self, engines, cfg: RayConfig) -> None:
        self.engines, self.cfg = engines, cfg
        self.store = AdapterStore(cfg.store_dir)
        self.prep_limiter = anyio.CapacityLimiter(PREP_THREADS)
        self._base: str | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        return ingress_app(self)

    async def base_name(self) -> str:
        if self._base is None:
            self._base = await self.engines.options(method_name="base_model_name").remote()
        return self._base

    async def gather(self, method: str, *args) -> list:
        """Call `method` on every live replica (Serve's broadcast); replicas that fail are left out."""
        results = await self.engines.broadcast(method, *args).results_async(timeout_s=60, return_exceptions=True)
        return [r for r in results if not isinstance(r, Exception)]

    # -- Serving ------------------------------------------------------------------------------------
    async def complete(self, endpoint: str, req, request: Request) -> Response:
        """Forward to a replica holding the adapter; re-send if it dies before answering."""
        raw = await request.body()
        name = req.adapter_id or req.model
        mux = {} if getattr(req, "adapters", None) or name == await self.base_name() else \
            {"multiplexed_model_id": name}
        handle = self.engines.options(method_name="respond", stream=True, **mux)
        for attempt in range(self.cfg.retries + 1):
            gen = handle.remote(endpoint, raw)
            try:
                head = await gen.__anext__()
                headers = {**head["headers"], **({RETRIES_HEADER: str(attempt)} if attempt else {})}
                if head["media_type"] != "text/event-stream":  # buffered whole: a replica death stays retryable
                    body = b"".join([chunk async for chunk in gen])
                    return Response(body, head["status"], headers, head["media_type"])
                return StreamingResponse(_rest(gen), head["status"], headers, head["media_type"])
            except _RETRYABLE as e:
                log.warning("%s request for %r: replica gone (%s); retry %d", endpoint, name, type(e).__name__,
                            attempt + 1)
                await asyncio.sleep(0.5 * (attempt + 1))
        return error_response(503, "no replica could answer; retry later", code="replica_unavailable",
                              headers={"Retry-After": "1"})

    async def models(self) -> tuple[str, list[str]]:
        return await self.base_name(), await asyncio.to_thread(self.store.list)

    async def unhealthy(self) -> str | None:
        return None

    async def metrics(self) -> bytes:
        return merge_metrics(dict(await self.gather("metrics_text")))


def ingress_app(ing: Ingress) -> FastAPI:
    serve_cfg = ing.cfg.serve
    admin = RayAdapters(ing, ing.store, serve_cfg.max_upload_bytes)
    app = build_api("loramux on Ray Serve", ing, admin, serve_cfg.admin_key, serve_cfg.max_request_bytes)

    @app.get("/v1/replicas")
    async def replicas():
        return {"object": "list", "data": sorted(await ing.gather("stats"), key=lambda s: s["replica"])}

    return app


async def _rest(gen):
    try:
        async for chunk in gen:
            yield chunk
    except _RETRYABLE:
        yield b'data: {"error": {"message": "the replica serving this stream died", "type": "server_error", ' \
              b'"param": null, "code": "replica_unavailable"}}\n\n'


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge_metrics(texts: dict[str, str]) -> bytes:
    """Every replica's Prometheus exposition as one, each sample labelled with its `replica`."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            merged = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            for s in fam.samples:
                merged.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
