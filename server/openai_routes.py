"""The OpenAI routes (completions, chat, models) with /health and /metrics, over a Serving backend
(server/backends.py): the same routes for `loramux serve` and the Ray ingress.

The completion routes parse their own bodies (server/json_body.py): strict, depth-bounded, large
ones off the event loop.
"""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from loramux.server.backends import Serving
from loramux.server.json_body import json_body_doc, parse_request
from loramux.server.protocol import ChatCompletionRequest, CompletionRequest

REQUEST_MODELS = [CompletionRequest, ChatCompletionRequest]   # documented in the app's OpenAPI components


def make_openai_router(serving: Serving) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/completions", openapi_extra=json_body_doc(CompletionRequest))
    async def completions(request: Request):
        req = await parse_request(request, CompletionRequest, serving.prep_limiter)
        return await serving.complete("completions", req, request)

    @router.post("/v1/chat/completions", openapi_extra=json_body_doc(ChatCompletionRequest))
    async def chat_completions(request: Request):
        req = await parse_request(request, ChatCompletionRequest, serving.prep_limiter)
        return await serving.complete("chat", req, request)

    @router.get("/v1/models")
    async def models():
        base, adapter_ids = await serving.models()
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "loramux", "root": base,
             "parent": None if name == base else base} for name in [base, *adapter_ids]]}

    @router.get("/health")
    async def health():
        reason = await serving.unhealthy()
        return {"status": "ok"} if reason is None else Response(status_code=503, content=reason)

    @router.get("/metrics")
    async def metrics():
        return Response(await serving.metrics(), media_type="text/plain; version=0.0.4")

    return router
