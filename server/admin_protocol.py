"""The admin routes' JSON bodies (ours and vLLM's), and their OpenAPI description.

The routes parse their own bodies (strict and bounded, server/json_body.py), so FastAPI cannot
infer what they take: `body_doc` writes it into the schema, which documents the API and lets a
schema-driven fuzzer reach the validation behind it.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from loramux.adapters_registry.adapter_files import ADAPTER_FILES
from loramux.server.protocol import AdapterWeight, MixtureFields


class RegisterByPath(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    path: str


class MixtureSpec(MixtureFields):
    model_config = ConfigDict(extra="forbid")
    adapters: list[AdapterWeight]


class RegisterMixture(BaseModel):
    """Save a mixture of registered adapters as a new persisted adapter (see MixtureFields)."""
    model_config = ConfigDict(extra="forbid")
    id: str
    mixture: MixtureSpec


class VllmLoad(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM clients may send load_inplace etc.
    lora_name: str
    lora_path: str


class VllmUnload(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its `$defs` inlined, to embed in the OpenAPI document."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node
    return resolve(schema)


def body_doc(json_models: list[type[BaseModel]], multipart: bool = False) -> dict[str, Any]:
    """OpenAPI `requestBody` of a route taking any of `json_models` (and an adapter upload if `multipart`)."""
    schemas = [_inline_schema(m) for m in json_models]
    content: dict[str, Any] = {"application/json": {"schema": schemas[0] if len(schemas) == 1
                                                    else {"anyOf": schemas}}}
    if multipart:
        content["multipart/form-data"] = {"schema": {
            "type": "object", "required": ["id", *ADAPTER_FILES],
            "properties": {"id": {"type": "string"},
                           **{name: {"type": "string", "format": "binary"} for name in ADAPTER_FILES}}}}
    return {"requestBody": {"required": True, "content": content}}
