"""Admin routes: register, list and remove adapters at runtime (ours + vLLM's load/unload API).

Self-contained: every route checks the admin key and turns AdapterError into an OpenAI-shaped
error itself, so the router behaves the same in any app. Registry work (file copies, validation)
runs in the thread pool, never on the event loop.
"""
from __future__ import annotations

import hmac
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pydantic_core
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from loramux.adapters_registry import AdapterError, AdapterRegistry
from loramux.adapters_registry.adapter_files import ADAPTER_FILES
from loramux.adapters_registry.mixtures import MixtureRecipe
from loramux.server.errors import APIError, error_response
from loramux.server.json_body import too_complex, validate_json
from loramux.server.protocol import AdapterWeight, MixtureFields

_MULTIPART_SLACK = 64 * 1024  # boundaries and part headers on top of the two files
_CHUNK = 1 << 20


class _RegisterByPath(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    path: str


class _MixtureSpec(MixtureFields):
    model_config = ConfigDict(extra="forbid")
    adapters: list[AdapterWeight]


class _RegisterMixture(BaseModel):
    """Save a mixture of registered adapters as a new persisted adapter (see MixtureFields)."""
    model_config = ConfigDict(extra="forbid")
    id: str
    mixture: _MixtureSpec


class _VllmLoad(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM clients may send load_inplace etc.
    lora_name: str
    lora_path: str


class _VllmUnload(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str


def _error(e: AdapterError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return error_response(e.status, e.message, e.param, e.code, headers=headers)


def _info_json(info) -> dict[str, Any]:
    return {"object": "adapter", **info.to_dict()}


def _names_mixture(raw: bytes) -> bool:
    """A JSON body {"id", "mixture"} saves a mixture; anything else is a register-by-path body."""
    if too_complex(raw):
        return False
    try:
        body = pydantic_core.from_json(raw)      # depth-bounded, unlike json.loads
    except ValueError:
        return False
    return isinstance(body, dict) and "mixture" in body


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


def _body_doc(json_models: list[type[BaseModel]], multipart: bool = False) -> dict[str, Any]:
    """OpenAPI `requestBody` of a route that parses its own body (FastAPI cannot infer it): documents
    the API, and lets a schema-driven fuzzer reach the validation behind it."""
    schemas = [_inline_schema(m) for m in json_models]
    content: dict[str, Any] = {"application/json": {"schema": schemas[0] if len(schemas) == 1
                                                    else {"anyOf": schemas}}}
    if multipart:
        content["multipart/form-data"] = {"schema": {
            "type": "object", "required": ["id", *ADAPTER_FILES],
            "properties": {"id": {"type": "string"},
                           **{name: {"type": "string", "format": "binary"} for name in ADAPTER_FILES}}}}
    return {"requestBody": {"required": True, "content": content}}


async def _json_body(request: Request, model: type[BaseModel]) -> Any:
    try:
        return validate_json(model, await request.body())
    except APIError as e:
        raise AdapterError(e.status, e.message, param=e.param, code=e.code) from None


def make_admin_router(registry: AdapterRegistry, admin_key: str | None) -> APIRouter:
    router = APIRouter()
    limit = registry.config.max_upload_bytes

    def check_auth(request: Request) -> None:
        if admin_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), admin_key.encode()):
            raise AdapterError(401, "admin routes need `Authorization: Bearer <admin key>`", code="invalid_api_key")

    async def register_by_path(adapter_id: str, raw_path: str):
        path = registry.resolve_allowed_path(raw_path)
        return await run_in_threadpool(registry.register, adapter_id, path, copy=True)

    async def register_upload(request: Request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + _MULTIPART_SLACK:
            raise AdapterError(413, f"upload of {declared} bytes exceeds the limit of {limit} bytes")

        async def bounded():
            total = 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit + _MULTIPART_SLACK:
                    raise AdapterError(413, f"upload exceeds the limit of {limit} bytes")
                yield chunk

        try:
            form = await MultiPartParser(request.headers, bounded(), max_files=len(ADAPTER_FILES),
                                         max_fields=4, max_part_size=1024).parse()
        except MultiPartException as e:
            raise AdapterError(400, f"malformed multipart upload: {e.message}") from None
        try:
            adapter_id = form.get("id")
            if not isinstance(adapter_id, str):
                raise AdapterError(400, "multipart upload needs a text field `id`", param="id")
            files: dict[str, UploadFile] = {}
            for field, value in form.multi_items():
                if field == "id":
                    continue
                name = field if field in ADAPTER_FILES else getattr(value, "filename", None)
                if not isinstance(value, UploadFile) or name not in ADAPTER_FILES:
                    raise AdapterError(400, f"unexpected form field {field!r}: upload exactly "
                                            f"{' and '.join(ADAPTER_FILES)} (pickled .bin weights are never accepted)")
                files[name] = value
            return await run_in_threadpool(_register_files, adapter_id, files)
        finally:
            await form.close()

    def _register_files(adapter_id: str, files: dict[str, UploadFile]):
        """(thread pool) Write the uploaded parts to a scratch folder and register that."""
        with tempfile.TemporaryDirectory(prefix=".staging-upload-", dir=registry.scratch_dir) as tmp:
            for name, upload in files.items():
                upload.file.seek(0)
                with open(Path(tmp) / name, "wb") as out:
                    shutil.copyfileobj(upload.file, out, _CHUNK)
            try:
                return registry.register(adapter_id, Path(tmp), copy=True, label="upload")
            except AdapterError as e:
                if e.param == "path":     # the registry's word for "the adapter's files": none was sent
                    e.param = None
                raise

    @router.post("/v1/adapters", openapi_extra=_body_doc([_RegisterByPath, _RegisterMixture], multipart=True))
    async def create_adapter(request: Request) -> Response:
        try:
            check_auth(request)
            ctype = request.headers.get("content-type", "")
            if ctype.startswith("multipart/form-data"):
                info = await register_upload(request)
            elif ctype.startswith("application/json") and _names_mixture(await request.body()):
                body = await _json_body(request, _RegisterMixture)
                recipe = MixtureRecipe.create(**body.mixture.recipe_args())
                info = await run_in_threadpool(registry.save_mixture, body.id, recipe)
            elif ctype.startswith("application/json"):
                body = await _json_body(request, _RegisterByPath)
                info = await register_by_path(body.id, body.path)
            else:
                raise AdapterError(415, "send JSON {\"id\", \"path\"} or {\"id\", \"mixture\"}, or a multipart "
                                        "upload with `id`, "
                                        "adapter_config.json and adapter_model.safetensors")
            return JSONResponse(_info_json(info), status_code=201)
        except AdapterError as e:
            return _error(e)

    @router.get("/v1/adapters")
    async def list_adapters(request: Request) -> Response:
        try:
            check_auth(request)
            return JSONResponse({"object": "list", "data": [_info_json(i) for i in registry.list()]})
        except AdapterError as e:
            return _error(e)

    @router.get("/v1/adapters/{adapter_id}")
    async def get_adapter(adapter_id: str, request: Request) -> Response:
        try:
            check_auth(request)
            return JSONResponse(_info_json(registry.get(adapter_id)))
        except AdapterError as e:
            return _error(e)

    @router.delete("/v1/adapters/{adapter_id}")
    async def delete_adapter(adapter_id: str, request: Request) -> Response:
        try:
            check_auth(request)
            await run_in_threadpool(registry.unregister, adapter_id)
            return JSONResponse({"id": adapter_id, "object": "adapter", "deleted": True})
        except AdapterError as e:
            return _error(e)

    # vLLM's dynamic LoRA API (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`): same semantics, plain-text success.
    @router.post("/v1/load_lora_adapter", openapi_extra=_body_doc([_VllmLoad]))
    async def vllm_load(request: Request) -> Response:
        try:
            check_auth(request)
            body = await _json_body(request, _VllmLoad)
            await register_by_path(body.lora_name, body.lora_path)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")
        except AdapterError as e:
            return _error(e)

    @router.post("/v1/unload_lora_adapter", openapi_extra=_body_doc([_VllmUnload]))
    async def vllm_unload(request: Request) -> Response:
        try:
            check_auth(request)
            body = await _json_body(request, _VllmUnload)
            await run_in_threadpool(registry.unregister, body.lora_name)
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
        except AdapterError as e:
            return _error(e)

    return router
