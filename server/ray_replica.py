"""One loramux engine as a Ray Serve replica (deployed by server/ray_app.py).

The replica owns a whole ServerState (model, adapter registry, scheduler) built by build_state and
answers through server.completions.run_request, the single server's request path. Its registry
follows the shared AdapterStore (server/store_follower.py). The ingress (server/ray_ingress.py,
server/ray_admin.py) calls the methods below; admin ones answer (status, body) so that an
adapter error reaches the client as the single server would word it.

Threads: a Ray worker's main thread is Ray's own, so the replica does what `loramux serve` does on
its main thread on one engine thread instead: build the model, then run the step loop (which gives
every other thread one torch thread: engine/cpu_threads.py). That thread is then the only one with
an OpenMP team of several threads. What made a step loop off the main thread 2-3x slower was a
second team beside it (the one that built the model), so libgomp stopped spinning between regions.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path

from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from loramux.adapters_registry.errors import AdapterError
from loramux.adapters_registry.mixtures import MixtureRecipe
from loramux.adapters_registry.records import AdapterInfo
from loramux.adapters_registry.store import AdapterStore
from loramux.server.app import bind_metrics
from loramux.server.bootstrap import ServeConfig, build_state
from loramux.server.completions import run_request
from loramux.server.errors import APIError, error_body
from loramux.server.json_body import parse_json
from loramux.server.protocol import ChatCompletionRequest, CompletionRequest
from loramux.server.state import ServerState
from loramux.server.store_follower import StoreFollower
from loramux.server.uploads import UPLOAD_PREFIX

REPLICA_HEADER = "x-loramux-replica"      # which replica answered


class EngineReplica:
    """One loramux engine (model, adapter registry, scheduler) as a Ray Serve replica."""

    def __init__(self, cfg: ServeConfig, store_dir: Path, adapters_per_replica: int) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        ctx = serve.get_replica_context()
        self.replica_id, self.actor_name = ctx.replica_tag, ctx.replica_id.to_full_id_str()
        self.store = AdapterStore(store_dir)
        if cfg.data_dir is not None:
            Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        # A private data dir: what this replica registers is a reference into the store, not a copy.
        self.work_dir = Path(tempfile.mkdtemp(prefix=f"replica-{self.replica_id}-", dir=cfg.data_dir))
        self.state, self.engine_thread = build_and_run(replace(cfg, data_dir=self.work_dir, adapters_dir=None))
        bind_metrics(self.state)
        self.requests: Counter[str] = Counter()
        self.adapters = StoreFollower(self.state.registry, self.store, adapters_per_replica)

    # -- requests ---------------------------------------------------------------------------------
    async def respond(self, endpoint: str, raw: bytes):
        """Yield {status, headers, media_type}, then the body in chunks (SSE events when streaming)."""
        try:
            req = await parse_json(ChatCompletionRequest if endpoint == "chat" else CompletionRequest, raw,
                                   self.state.prep_limiter)
        except APIError as e:
            yield self._head(e.status, "application/json")
            yield JSONResponse(error_body(e.status, e.message, e.param, e.code)).body
            return
        mixture = getattr(req, "adapters", None)
        name = req.adapter_id or req.model
        ids = [a.id for a in mixture] if mixture else [] if name == self.state.base_model_name else [name]
        async with self.adapters.pinned(ids):
            try:
                for adapter_id in ids:
                    await self.adapters.ensure(adapter_id)
                resp = await run_request(self.state, req, endpoint)
            except (APIError, AdapterError) as e:
                yield self._head(e.status, "application/json", getattr(e, "headers", None))
                yield JSONResponse(error_body(e.status, e.message, e.param, e.code)).body
                return
            self.requests[name] += 1
            yield self._head(resp.status_code, resp.media_type)
            if isinstance(resp, StreamingResponse):
                async for chunk in resp.body_iterator:
                    yield chunk if isinstance(chunk, bytes) else chunk.encode()
            else:
                yield resp.body

    def _head(self, status: int, media_type: str, headers: dict | None = None) -> dict:
        return {"status": status, "media_type": media_type, "headers": {**(headers or {}),
                                                                         REPLICA_HEADER: self.replica_id}}

    # -- adapters (the admin routes on Ray: server/ray_admin.py) ------------------------------------
    async def register(self, adapter_id: str, raw_path: object) -> tuple[int, dict]:
        """Copy an adapter from a client-given path (under an allowed root) into the store; load it here."""
        async def run() -> AdapterInfo:
            path = self.state.registry.resolve_allowed_path(raw_path)
            return await self.adapters.register(adapter_id, path, label=str(path))
        return await self._answer(run())

    async def register_upload(self, adapter_id: str, staged: str) -> tuple[int, dict]:
        """Register an upload the ingress wrote to the store's folder `staged` (removed by the ingress)."""
        folder = self.store.root / staged
        if not staged.startswith(UPLOAD_PREFIX) or folder.parent != self.store.root:
            return 400, error_body(400, f"{staged!r} is not an upload folder of the adapter store")
        return await self._answer(self.adapters.register(adapter_id, folder, label="upload"))

    async def save_mixture(self, adapter_id: str, recipe: MixtureRecipe) -> tuple[int, dict]:
        return await self._answer(self.adapters.save_mixture(adapter_id, recipe))

    async def describe(self, adapter_ids: list[str]) -> list[dict]:
        return [info.to_dict() for info in await asyncio.to_thread(self.adapters.describe, adapter_ids)]

    async def forget(self, adapter_id: str) -> None:
        """(broadcast on DELETE) drop an adapter the store no longer has."""
        await self.adapters.forget(adapter_id)

    async def _answer(self, work: Awaitable[AdapterInfo]) -> tuple[int, dict]:
        try:
            info = await work
        except AdapterError as e:
            return e.status, error_body(e.status, e.message, e.param, e.code)
        return 201, {**info.to_dict(), "replica": self.replica_id}

    # -- introspection ------------------------------------------------------------------------------
    def base_model_name(self) -> str:
        return self.state.base_model_name

    def stats(self) -> dict:
        engine = self.state.engine
        return {"replica": self.replica_id, "actor_name": self.actor_name, "requests": sum(self.requests.values()),
                "requests_by_model": dict(self.requests), "running": engine.num_running,
                "waiting": engine.num_waiting, "adapters": [i.to_dict() for i in self.state.registry.list()],
                "engine_thread": self.engine_thread}

    def metrics_text(self) -> tuple[str, str]:
        return self.replica_id, self.state.metrics.render().decode()

    def check_health(self) -> None:  # Serve restarts a replica whose engine loop died
        if self.state.engine.error is not None:
            raise RuntimeError(f"engine stopped: {self.state.engine.error!r}")

    def __del__(self) -> None:  # Serve's graceful stop (and a failed __init__)
        if hasattr(self, "state"):
            self.state.engine.shutdown()
        if hasattr(self, "work_dir"):
            shutil.rmtree(self.work_dir, ignore_errors=True)


def build_and_run(cfg: ServeConfig) -> tuple[ServerState, str]:
    """Build the server state on a new thread that then runs the engine's step loop (the module
    docstring says why both on one thread); returns the state and that thread's name once built."""
    built: queue.Queue = queue.Queue(maxsize=1)

    def engine_main() -> None:
        try:
            state = build_state(cfg)
        except BaseException as e:  # noqa: BLE001 - reported to the constructor, which raises it
            built.put(e)
            return
        built.put(state)
        state.engine.run()

    thread = threading.Thread(target=engine_main, name="loramux-engine", daemon=True)
    thread.start()
    result = built.get()
    if isinstance(result, BaseException):
        raise result
    return result, thread.name
