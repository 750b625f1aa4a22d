"""A request body -> a request model: strict, bounded in work, and large bodies off the event loop.

pydantic's `model_validate_json` (jiter) parses without recursing in Python; invalid UTF-8 and every
other malformed body is a 400 with a code.
Parsing holds the GIL, whatever thread it runs in, for a time that grows with the number of values
the body makes: a body past the one JSON bound of engine/json_bounds.py (MAX_JSON_CONTAINERS arrays
and objects, MAX_JSON_DEPTH levels) is refused before parsing, after a count in C. What is
left costs ~25 ms of CPU per MiB at worst (a million token ids) on a 2-core CPU. A body past
PARSE_INLINE_BYTES is parsed in a worker thread, where the Python checks of long fields
(server/protocol.py) let the event loop take turns.
"""
from __future__ import annotations

from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError

from loramux.engine.json_bounds import json_problem
from loramux.server.errors import APIError, validation_error

M = TypeVar("M", bound=BaseModel)
PARSE_INLINE_BYTES = 64 * 1024     # below this, parsing takes well under a millisecond: not worth a thread hop


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def too_complex(raw: bytes) -> bool:
    return json_problem(raw) is not None


def validate_json(model: type[M], raw: bytes) -> M:
    """`raw` as `model`, or an APIError(400) with a code (json_too_complex, invalid_json, invalid_value)."""
    problem = json_problem(raw)
    if problem is not None:
        raise APIError(400, f"the request body is refused: {problem}", code="json_too_complex")
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False), model) from None


async def parse_json(model: type[M], raw: bytes, limiter: anyio.CapacityLimiter | None = None) -> M:
    if len(raw) <= PARSE_INLINE_BYTES:
        return validate_json(model, raw)
    return await anyio.to_thread.run_sync(validate_json, model, raw, limiter=limiter)


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
