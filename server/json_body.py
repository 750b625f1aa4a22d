"""A request body -> a request model: strict, depth-bounded, and large bodies off the event loop.

pydantic's `model_validate_json` (jiter) refuses JSON nested deeper than 200 levels at once, where
Python's json module recurses; invalid UTF-8 and every other malformed body is a 400 with a code.
A body past PARSE_INLINE_BYTES is parsed in a worker thread: building the JSON tree holds the GIL
(about 10-60 ms per MiB, by shape, on a 2-core CPU), but the Python checks of long fields
(server/protocol.py) then let the event loop take turns.
"""
from __future__ import annotations

from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError

from loramux.server.errors import APIError, validation_error

M = TypeVar("M", bound=BaseModel)
PARSE_INLINE_BYTES = 64 * 1024     # below this, parsing takes well under a millisecond: not worth a thread hop


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _validate(model: type[M], raw: bytes) -> M:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


async def parse_json(model: type[M], raw: bytes, limiter: anyio.CapacityLimiter | None = None) -> M:
    if len(raw) <= PARSE_INLINE_BYTES:
        return _validate(model, raw)
    return await anyio.to_thread.run_sync(_validate, model, raw, limiter=limiter)


async def parse_request(request: Request, model: type[M], limiter: anyio.CapacityLimiter | None = None) -> M:
    """The body of `request` as `model` (a JSON body; no Content-Type is taken as JSON)."""
    ctype = request.headers.get("content-type")
    if ctype is not None and not _is_json(ctype):
        raise APIError(400, f"send the request body as application/json, not {ctype[:100]}",
                       code="unsupported_media_type")
    return await parse_json(model, await request.body(), limiter)


def json_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI `requestBody` of a route that parses its own body with `model` (see document_models)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def document_models(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Put `models` (and the models they use) in the app's OpenAPI components, where json_body_doc
    points: FastAPI adds only the models of parameters it parses itself."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()          # FastAPI keeps it as app.openapi_schema
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
        return app.openapi_schema
    app.openapi = openapi
