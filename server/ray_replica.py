"""One loramux engine as a Ray Serve replica (deployed by server/ray_app.py).

The replica owns a whole ServerState (model, adapter registry, scheduler) built by build_state and
answers through server.completions.run_request, the single server's request path. Its registry
follows the shared AdapterStore: `@serve.multiplexed` loads an adapter from the store on first use
(Serve then routes that adapter's requests here), Serve's LRU eviction unregisters it again, and
every use checks that the folder served is still the store's current version, so an adapter
deleted, or deleted and registered again, is never served stale.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from loramux.adapters_registry import AdapterError, validate_adapter_id
from loramux.adapters_registry.store import AdapterStore
from loramux.server.app import create_app
from loramux.server.bootstrap import ServeConfig, build_state
from loramux.server.completions import run_request
from loramux.server.errors import APIError, error_body
from loramux.server.json_body import parse_json
from loramux.server.protocol import ChatCompletionRequest, CompletionRequest

REPLICA_HEADER = "x-loramux-replica"      # which replica answered
log = logging.getLogger("loramux.ray")


class _Resident:
    """What Serve's multiplexing LRU holds per adapter; its eviction unregisters the adapter."""

    def __init__(self, owner: EngineReplica, adapter_id: str, generation: int) -> None:
        self.owner, self.adapter_id, self.generation, self.gone = owner, adapter_id, generation, False

    def __del__(self) -> None:  # Serve calls it on eviction (from a thread), Python again at collection
        if not self.gone:
            self.gone = True
            self.owner.evicted(self.adapter_id, self.generation)


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
        self.state = build_state(replace(cfg, data_dir=self.work_dir, adapters_dir=None))
        create_app(self.state)            # binds the engine's live gauges into state.metrics; app unused
        self.state.engine.start()
        self.requests: Counter[str] = Counter()
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
        self.load_adapter = serve.multiplexed(max_num_models_per_replica=adapters_per_replica)(
            load_adapter_from_store)

    # -- adapters: the registry follows the store ---------------------------------------------------
    def _served(self, adapter_id: str) -> str | None:
        try:
            return self.state.registry.get(adapter_id).source
        except AdapterError:
            return None

    def _stored(self, adapter_id: str) -> str | None:
        try:
            return str(self.store.path_for(adapter_id))
        except AdapterError:
            return None

    def _sync_now(self, adapter_id: str, keep: bool = True) -> None:
        """(thread) Make the registry serve the store's current version of `adapter_id`, or nothing."""
        want = self._stored(adapter_id) if keep else None
        have = self._served(adapter_id)
        if have != want:
            if have is not None:
                self.state.registry.unregister(adapter_id)
            if want is not None:
                self.state.registry.register(adapter_id, Path(want), copy=False)

    async def _sync(self, adapter_id: str, keep: bool = True) -> None:
        async with self._lock:
            await asyncio.to_thread(self._sync_now, adapter_id, keep)

    async def _ensure(self, adapter_id: str) -> None:
        """Have `adapter_id` resident (Serve's multiplexing) and current (version check on use)."""
        if adapter_id in self.store:        # unknown ids fall through to run_request's 404
            await self.load_adapter(adapter_id)
        if self._served(adapter_id) != self._stored(adapter_id):
            await self._sync(adapter_id)

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
        self._pins.update(ids)
        try:
            try:
                for adapter_id in ids:
                    await self._ensure(adapter_id)
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
        finally:
            self._pins.subtract(ids)
            for adapter_id in ids:
                if not self._pins[adapter_id]:
                    self._pins.pop(adapter_id, None)
                    if adapter_id in self._evicted:
                        await self._drop_if_idle(adapter_id)

    def _head(self, status: int, media_type: str, headers: dict | None = None) -> dict:
        return {"status": status, "media_type": media_type, "headers": {**(headers or {}),
                                                                         REPLICA_HEADER: self.replica_id}}

    async def register(self, adapter_id: str, raw_path: object) -> tuple[int, dict]:
        """Copy an adapter into the store and load it here (validating it); refused -> not stored."""
        registry = self.state.registry
        try:
            validate_adapter_id(adapter_id, self.state.base_model_name)
            await asyncio.to_thread(self.store.put, adapter_id, registry.resolve_allowed_path(raw_path))
            try:
                await self._ensure(adapter_id)
            except AdapterError:
                await asyncio.to_thread(self.store.delete, adapter_id)
                raise
            return 201, {"object": "adapter", **registry.get(adapter_id).to_dict(), "replica": self.replica_id}
        except AdapterError as e:
            return e.status, error_body(e.status, e.message, e.param, e.code)

    # -- introspection ------------------------------------------------------------------------------
    def base_model_name(self) -> str:
        return self.state.base_model_name

    def stats(self) -> dict:
        engine = self.state.engine
        return {"replica": self.replica_id, "actor_name": self.actor_name, "requests": sum(self.requests.values()),
                "requests_by_model": dict(self.requests), "running": engine.num_running,
                "waiting": engine.num_waiting, "adapters": [i.to_dict() for i in self.state.registry.list()]}

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
