"""The FastAPI app: OpenAI routes, health, metrics; admin routes when a registry is present."""
from __future__ import annotations

import gc
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from loramux.server.body_limit import BodyLimit
from loramux.server.completions import run_request
from loramux.server.errors import install_error_handlers
from loramux.server.json_body import document_models, json_body_doc, parse_request
from loramux.server.protocol import ChatCompletionRequest, CompletionRequest
from loramux.server.state import ServerState


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.engine.start()
        # What startup built (model, tokenizer, modules) leaves the collector's scans: a request body
        # that makes many lists then costs collections over its own objects, not over the whole process.
        gc.freeze()
        yield
        state.engine.shutdown()      # drains in-flight requests before the process exits

    app = FastAPI(title="loramux", version="0.1.0", lifespan=lifespan)
    app.state.loramux = state
    install_error_handlers(app)
    upload_bytes = state.registry.config.max_upload_bytes if state.registry is not None else None
    app.add_middleware(BodyLimit, max_bytes=state.max_request_bytes, upload_bytes=upload_bytes)
    document_models(app, [CompletionRequest, ChatCompletionRequest])
    engine = state.engine
    state.metrics.bind(
        queue_depth=lambda: engine.num_waiting,
        running=lambda: engine.num_running,
        memory={"base_weights": lambda: engine.engine.weight_bytes, "kv_cache": lambda: engine.engine.kv.nbytes,
                "adapter_slots": lambda: getattr(state.registry, "slot_bytes", 0) if state.registry else 0},
        drain_batch_sizes=lambda: _drain(engine.engine.stats.batch_sizes))
    # Zero when idle: what finished, failed, timed out or was abandoned by its client was freed.
    blocks = engine.engine.blocks
    state.metrics.gauge_from("loramux_kv_blocks_used", "KV cache blocks held by sequences",
                             lambda: blocks.num_used)
    state.metrics.gauge_from("loramux_kv_blocks_total", "KV cache blocks", lambda: blocks.num_blocks)
    state.metrics.gauge_from("loramux_engine_requests", "Requests the engine is serving (running or queued)",
                             lambda: engine.num_requests)
    if state.registry is not None:
        state.metrics.count_from("loramux_adapter_merges", "Adapter mixtures merged (per-request and saved)",
                                 lambda: state.registry.merges_computed)

    # The routes parse their own bodies (server/json_body.py): strict, depth-bounded, large ones off the loop.
    @app.post("/v1/completions", openapi_extra=json_body_doc(CompletionRequest))
    async def completions(request: Request):
        req = await parse_request(request, CompletionRequest, state.prep_limiter)
        return await run_request(state, req, "completions", request)

    @app.post("/v1/chat/completions", openapi_extra=json_body_doc(ChatCompletionRequest))
    async def chat_completions(request: Request):
        req = await parse_request(request, ChatCompletionRequest, state.prep_limiter)
        return await run_request(state, req, "chat", request)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": state.base_model_name, "object": "model", "created": created, "owned_by": "loramux",
                 "root": state.base_model_name, "parent": None}]
        if state.registry is not None:
            data += [{"id": info.id, "object": "model", "created": created, "owned_by": "loramux",
                      "root": state.base_model_name, "parent": state.base_model_name}
                     for info in state.registry.list()]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return Response(status_code=503, content="engine stopped")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    if state.registry is not None:
        from loramux.server.admin_routes import make_admin_router
        app.include_router(make_admin_router(state.registry, state.admin_key))
    return app


def _drain(items: list[int]) -> list[int]:
    out = items[:]
    del items[:len(out)]
    return out
